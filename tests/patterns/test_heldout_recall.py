"""``VerticalSlashConfig.heldout_recall``: a head whose selected keys miss the attention of query rows
the estimate did not score is routed dense; a head whose pattern holds everywhere is not."""

import pytest
import torch

from sparseprefill import SparseConfig, VerticalSlashConfig
from sparseprefill.kernels import fast_dense_attention
from sparseprefill.kernels.common import default_kv_head_index
from sparseprefill.patterns import build_pattern
from sparseprefill.kernels.geometry import spread_window_ends
from sparseprefill.patterns.vertical_slash import heldout_window_ends

LENGTH, HEAD_DIM, REGION = 4096, 64, 512
SINK_LOGIT, LOCAL_LOGIT, TOPIC_LOGIT = 8.0, 6.0, 14.0
NOISE = 0.1  # per element: q.k noise of ~0.1 logit, so the planted structure decides what is kept


def _two_heads(seed: int = 0):
    """Head 0: a sink and a local band, the same for every row. Head 1: the same, plus, for each region
    of ``REGION`` rows, one earlier key column the region's rows attend to strongly (a different column
    per region), so rows outside the scored windows attend where no scored row does."""
    g = torch.Generator().manual_seed(seed)
    q = NOISE * torch.randn(1, 2, LENGTH, HEAD_DIM, generator=g)
    k = NOISE * torch.randn(1, 2, LENGTH, HEAD_DIM, generator=g)
    v = torch.randn(1, 2, LENGTH, HEAD_DIM, generator=g)
    scale = HEAD_DIM**-0.5
    q[..., 0], k[..., 0] = 1.0, 0.0
    k[:, :, 0, 0] = SINK_LOGIT / scale
    positions = torch.arange(LENGTH, dtype=torch.float32)
    for dim, fn in ((1, torch.cos), (2, torch.sin)):  # local band: q.k ~ cos(omega * distance)
        q[..., dim] = (LOCAL_LOGIT / scale) ** 0.5 * fn(positions / 40.0)
        k[..., dim] = (LOCAL_LOGIT / scale) ** 0.5 * fn(positions / 40.0)
    first_topic_dim = 4
    q[..., first_topic_dim:first_topic_dim + LENGTH // REGION] = 0.0  # no noise leaks another region's topic
    for region in range(1, LENGTH // REGION):
        dim = first_topic_dim + region - 1
        rows = slice(region * REGION, (region + 1) * REGION)
        topic = int(torch.randint(1, region * REGION - 1, (1,), generator=g))
        q[0, 1, rows, dim] = 1.0
        k[0, 1, topic, dim] = TOPIC_LOGIT / scale
    return q, k, v, scale


def _pattern(heldout_recall):
    config = SparseConfig(min_sparse_len=0, vertical_slash=VerticalSlashConfig(heldout_recall=heldout_recall))
    return build_pattern("auto", config)


def test_heldout_windows_are_between_the_scored_ones():
    scored = spread_window_ends(LENGTH, 64, 4)
    heldout = heldout_window_ends(LENGTH, 64, 4)
    assert scored == [1024, 2048, 3072, 4096] and heldout == [512, 1536, 2560, 3584]
    assert heldout_window_ends(100, 64, 4) == []  # no room for a second window


def test_the_region_specific_head_is_flagged_and_the_steady_one_is_not():
    q, k, v, scale = _two_heads()
    kv_head_index = default_kv_head_index(2, 2, q.device)
    pattern = _pattern(0.9)
    kw = dict(scale=scale, softcap=None, kv_head_index=kv_head_index)
    index = pattern.estimate(q, k, **kw)
    flagged = pattern.unpredictable_heads(q, k, index, **kw)
    assert flagged.tolist() == [[False, True]]
    assert _pattern(None).unpredictable_heads(q, k, index, **kw) is None


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_flagged_heads_run_exact_and_the_others_sparse(dtype):
    q, k, v, scale = (t.to(dtype) if torch.is_tensor(t) else t for t in _two_heads(seed=1))
    kv_head_index = default_kv_head_index(2, 2, q.device)
    kw = dict(scale=scale, softcap=None, kv_head_index=kv_head_index)
    dense = fast_dense_attention(q, k, v, scale=scale)
    never_by_density = 2.0  # above any density: only the held-out check routes
    checked = torch.full_like(q, float("nan"))
    result = _pattern(0.9).run(q, k, v, out=checked, dense_above=never_by_density, **kw)
    unchecked = torch.full_like(q, float("nan"))
    _pattern(None).run(q, k, v, out=unchecked, dense_above=never_by_density, **kw)
    assert result.dense_heads == 1
    # Dense attention of one head alone and of both heads together may take different SDPA paths, and
    # the reference batches heads, so emptying one moves fp32 sums by ulps: compare within the kernel
    # tests' tolerances. The flagged head is dense; the steady head is the sparse result.
    tolerance = dict(atol=1e-5, rtol=1e-5) if dtype == torch.float32 else dict(atol=1.6e-2, rtol=1.6e-2)
    torch.testing.assert_close(checked[:, 1], dense[:, 1], **tolerance)
    torch.testing.assert_close(checked[:, 0], unchecked[:, 0], **tolerance)
    # The check is worth having here: unchecked, the region head misses mass and drifts from dense.
    assert (unchecked[:, 1].float() - dense[:, 1].float()).abs().max() > 0.1


def test_heldout_recall_is_validated():
    with pytest.raises(ValueError, match="heldout_recall"):
        VerticalSlashConfig(heldout_recall=0.0)
    with pytest.raises(ValueError, match="heldout_recall"):
        VerticalSlashConfig(heldout_recall=1.5)


def test_block_recall_matches_window_recall_per_block():
    """The dispatching function's CPU path against ``window_recall`` directly, on the index's blocks."""
    from sparseprefill.kernels.recall import window_recall
    from sparseprefill.kernels.vertical_slash import vertical_slash_block_recall

    q, k, v, scale = _two_heads()
    kv_head_index = default_kv_head_index(2, 2, q.device)
    kw = dict(scale=scale, softcap=None, kv_head_index=kv_head_index)
    index = _pattern(0.9).estimate(q, k, **kw)
    blocks = torch.tensor([0, 7, 55, LENGTH // 64 - 1])
    got = vertical_slash_block_recall(q, k, index, blocks, **kw)
    for i, block in enumerate(blocks.tolist()):
        (expected,) = window_recall([index], q, k, block * 64, block * 64 + 64, **kw)
        torch.testing.assert_close(got[..., i], expected.mean(-1))
    with pytest.raises(ValueError, match="query blocks of the index"):
        vertical_slash_block_recall(q, k, index, torch.tensor([LENGTH // 64]), **kw)
