"""``AntidiagonalConfig.spot_check_recall`` / ``BlockSparseConfig.spot_check_recall``: a head whose kept
blocks miss the exact attention of the spot-checked query blocks is flagged for dense routing; a head
whose blocks hold it is not; the check is off by default."""

import pytest
import torch

from sparseprefill import AntidiagonalConfig, BlockSparseConfig, SparseConfig
from sparseprefill.config import SPOT_CHECK_BLOCKS
from sparseprefill.kernels import select_blocks
from sparseprefill.kernels.block_sparse import block_sparse_block_recall
from sparseprefill.patterns import build_pattern
from sparseprefill.patterns.block_sparse import misjudged_heads, spot_check_blocks

LENGTH, HEAD_DIM, BLOCK = 512, 32, 32
MATCH_LOGIT = 20.0  # a query's score on the key it matches: the rest of its row is ~e^-20 of it


def _far_and_local_heads():
    """Head 0: every query attends to key 5 (block 0, far from most rows' diagonal block). Head 1: every
    query attends to its own key (always in its diagonal block)."""
    g = torch.Generator().manual_seed(0)
    k = torch.nn.functional.normalize(torch.randn(1, 2, LENGTH, HEAD_DIM, generator=g), dim=-1)
    scale = HEAD_DIM**-0.5
    q = torch.empty(1, 2, LENGTH, HEAD_DIM)
    q[0, 0] = k[0, 0, 5] * MATCH_LOGIT / scale
    q[0, 1] = k[0, 1] * MATCH_LOGIT / scale
    return q, k, scale


def _diagonal_only_index(heads: int) -> "object":
    n = LENGTH // BLOCK
    return select_blocks(torch.rand(1, heads, n, n), q_len=LENGTH, k_len=LENGTH, block_size_q=BLOCK,
                         block_size_k=BLOCK, mass=0.0, sink_blocks=0)


def test_spot_check_blocks_spread_over_the_prompt_and_end_at_its_last_block():
    blocks = spot_check_blocks(131072, 128)
    assert len(blocks) == SPOT_CHECK_BLOCKS and blocks[-1] == 1023 and blocks == sorted(set(blocks))
    assert spot_check_blocks(100, 128) == [0]  # one block: the whole prompt
    assert spot_check_blocks(LENGTH, BLOCK)[-1] == LENGTH // BLOCK - 1


def test_a_head_whose_blocks_miss_its_attention_is_flagged_and_one_whose_blocks_hold_it_is_not():
    q, k, scale = _far_and_local_heads()
    kvh = torch.arange(2)
    index = _diagonal_only_index(2)
    recall = block_sparse_block_recall(q, k, index, spot_check_blocks(LENGTH, BLOCK), scale=scale, kv_head_index=kvh)
    assert float(recall[0, 0, 1:].max()) < 0.01  # key 5 sits outside every later row's diagonal block
    assert float(recall[0, 1].min()) > 0.99
    flagged = misjudged_heads(q, k, index, 0.9, scale=scale, softcap=None, kv_head_index=kvh)
    assert flagged.tolist() == [[True, False]]
    assert misjudged_heads(q, k, index, None, scale=scale, softcap=None, kv_head_index=kvh) is None


@pytest.mark.parametrize("pattern", ["antidiagonal", "block_sparse"])
def test_the_block_patterns_check_only_when_asked(pattern):
    q, k, scale = _far_and_local_heads()
    kvh = torch.arange(2)
    off = build_pattern(pattern, SparseConfig(pattern=pattern))
    index = off.estimate(q, k, scale=scale, softcap=None, kv_head_index=kvh)
    assert off.unpredictable_heads(q, k, index, scale=scale, softcap=None, kv_head_index=kvh) is None
    section = dict(block_size=BLOCK, spot_check_recall=0.9)
    cfg = (SparseConfig(pattern=pattern, antidiagonal=AntidiagonalConfig(**section)) if pattern == "antidiagonal"
           else SparseConfig(pattern=pattern, block_sparse=BlockSparseConfig(**section)))
    on = build_pattern(pattern, cfg)
    index = on.estimate(q, k, scale=scale, softcap=None, kv_head_index=kvh)
    flagged = on.unpredictable_heads(q, k, index, scale=scale, softcap=None, kv_head_index=kvh)
    expected = block_sparse_block_recall(q, k, index, spot_check_blocks(LENGTH, BLOCK), scale=scale,
                                         kv_head_index=kvh).amin(-1) < 0.9
    assert flagged.shape == (1, 2) and torch.equal(flagged, expected)


@pytest.mark.parametrize("value", [0.0, -0.1, 1.5])
def test_spot_check_recall_outside_the_unit_interval_is_refused(value):
    with pytest.raises(ValueError, match="spot_check_recall"):
        AntidiagonalConfig(spot_check_recall=value)
    with pytest.raises(ValueError, match="spot_check_recall"):
        BlockSparseConfig(spot_check_recall=value)


def _mostly_local_head_with_a_few_far_rows(far_every: int):
    """One head: every query attends to its own key, except every ``far_every``-th row, which attends to
    key 5 (block 0): the few far rows lose their mass under a diagonal-only index, the others keep it."""
    g = torch.Generator().manual_seed(1)
    k = torch.nn.functional.normalize(torch.randn(1, 1, LENGTH, HEAD_DIM, generator=g), dim=-1)
    scale = HEAD_DIM**-0.5
    targets = torch.arange(LENGTH)
    targets[far_every - 1::far_every] = 5
    q = (k[0, 0, targets] * MATCH_LOGIT / scale)[None, None]
    return q, k, scale


def test_a_quantile_of_the_rows_catches_a_head_whose_block_means_hide_a_few_lost_rows():
    q, k, scale = _mostly_local_head_with_a_few_far_rows(far_every=16)  # 2 of each 32-row block
    kvh = torch.arange(1)
    index = _diagonal_only_index(1)
    kw = dict(scale=scale, softcap=None, kv_head_index=kvh)
    blocks = spot_check_blocks(LENGTH, BLOCK)
    means = block_sparse_block_recall(q, k, index, blocks, **kw)
    assert 0.9 < float(means[0, 0, 1:].min()) < 0.95  # 30 of 32 rows keep everything
    assert not bool(misjudged_heads(q, k, index, 0.9, **kw))
    rows = block_sparse_block_recall(q, k, index, blocks, per_row=True, **kw)
    assert rows.shape == (1, 1, len(blocks), BLOCK) and float(rows.nan_to_num(1.0).amin()) < 0.01
    assert bool(misjudged_heads(q, k, index, 0.9, quantile=0.0, **kw))  # the worst row
    assert bool(misjudged_heads(q, k, index, 0.9, quantile=0.05, **kw))  # 6% of rows are lost
    assert not bool(misjudged_heads(q, k, index, 0.9, quantile=0.5, **kw))


def test_a_quantile_ignores_the_rows_past_a_partial_last_block():
    """On a prompt that ends inside a block the kernel's rows past the end are NaN; the quantile is over
    the real rows only (a NaN among them would make every comparison False and pass every head)."""
    q, k, scale = _mostly_local_head_with_a_few_far_rows(far_every=4)
    length = LENGTH - 7
    q, k = q[:, :, :length], k[:, :, :length]
    n = -(-length // BLOCK)
    index = select_blocks(torch.rand(1, 1, n, n), q_len=length, k_len=length, block_size_q=BLOCK, block_size_k=BLOCK,
                          mass=0.0, sink_blocks=0)
    kw = dict(scale=scale, softcap=None, kv_head_index=torch.arange(1))
    assert bool(misjudged_heads(q, k, index, 0.9, quantile=0.1, **kw))  # a quarter of the rows are lost
    assert not bool(misjudged_heads(q, k, index, 0.9, quantile=0.5, **kw))


def test_the_patterns_pass_their_quantile_to_the_check():
    q, k, scale = _mostly_local_head_with_a_few_far_rows(far_every=16)
    kvh = torch.arange(1)
    for quantile, flagged in ((None, False), (0.0, True)):
        cfg = SparseConfig(pattern="block_sparse", block_sparse=BlockSparseConfig(
            block_size=BLOCK, mass=0.0, sink_blocks=0, spot_check_recall=0.9, spot_check_quantile=quantile))
        pattern = build_pattern("block_sparse", cfg)
        index = pattern.estimate(q, k, scale=scale, softcap=None, kv_head_index=kvh)
        got = pattern.unpredictable_heads(q, k, index, scale=scale, softcap=None, kv_head_index=kvh)
        assert bool(got) is flagged


def test_a_quantile_without_a_recall_threshold_or_outside_the_unit_interval_is_refused():
    for section in (AntidiagonalConfig, BlockSparseConfig):
        with pytest.raises(ValueError, match="spot_check_quantile is 0.05 but .*spot_check_recall is None"):
            section(spot_check_quantile=0.05)
        with pytest.raises(ValueError, match="spot_check_quantile must be in"):
            section(spot_check_recall=0.9, spot_check_quantile=1.5)
        assert section(spot_check_recall=0.9, spot_check_quantile=0.0).spot_check_quantile == 0.0


@pytest.mark.parametrize("quantile", [0.0, 0.05, 0.37, 0.5, 1.0])
def test_the_traceable_quantile_equals_torch_quantile(quantile):
    from sparseprefill.patterns.block_sparse import _quantile_last_dim

    values = torch.rand(2, 3, 101, generator=torch.Generator().manual_seed(5))
    torch.testing.assert_close(_quantile_last_dim(values, quantile), torch.quantile(values, quantile, dim=-1))
