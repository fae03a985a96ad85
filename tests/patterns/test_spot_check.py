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
