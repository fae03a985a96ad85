"""The block patterns (antidiagonal, pooled) traced by torch.compile (``fullgraph=True``): each estimate is
one op of fixed output shapes, and routing heads dense runs inside the graph (the routed heads list every visible block;
the block kernel computes them exactly). Traced and eager runs must agree on every output element, the
pairs counted and the heads routed; the routed heads must equal exact attention."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch

from sparseprefill.config import AntidiagonalConfig, BlockSparseConfig
from sparseprefill.kernels.block_sparse import block_sparse_block_recall, select_blocks
from sparseprefill.kernels.indices import BlockSparseIndex
from sparseprefill.patterns import AntidiagonalPattern, BlockSparsePattern
from sparseprefill.patterns.block_sparse import spot_check_blocks

from tests import reference as ref
from tests.reference import torch_single_thread  # noqa: F401  (autouse fixture)

CONFIGS = {
    "blocks": (AntidiagonalPattern, AntidiagonalConfig(block_size=16, stride=4, mass=0.7)),
    # The spot check's threshold is set per case to the median head's checked recall.
    "columns_and_spot_check": (AntidiagonalPattern,
                               AntidiagonalConfig(block_size=16, stride=4, mass=0.7, vertical_share=0.04)),
    "pooled_blocks": (BlockSparsePattern, BlockSparseConfig(block_size=16, mass=0.7)),
    # The check on a quantile of the checked rows' recall; its threshold too is the median head's.
    "row_quantile_spot_check": (AntidiagonalPattern, AntidiagonalConfig(block_size=16, stride=4, mass=0.7)),
}
ROW_QUANTILE = 0.1
# The CUDA-graph test also captures a routed run with the spot check on (its checked block numbers live on
# the device, cached: a host-to-device copy cannot run inside a capture). The threshold is low so that
# routing by density still decides most heads and the test keeps some heads sparse.
GRAPH_CONFIGS = dict(CONFIGS, spot_checked=(AntidiagonalPattern, AntidiagonalConfig(
    block_size=16, stride=4, mass=0.7, vertical_share=0.04, spot_check_recall=0.05, spot_check_quantile=0.05)))


@pytest.mark.parametrize("q_len,k_len", ref.ROUTING_LENGTHS)
@pytest.mark.parametrize("name", list(CONFIGS))
def test_traced_run_matches_eager_and_routes_inside_the_graph(name, q_len, k_len):
    pattern_cls, config = CONFIGS[name]
    pattern, q, k, v, kv_head_index, causal, density = ref.routing_case(17, pattern_cls, config, q_len, k_len)
    b, hq, _, d = q.shape
    threshold = ref.median(density)  # about half the heads
    if name == "columns_and_spot_check":  # about half the heads by the check instead
        index = pattern.estimate(q, k, scale=d**-0.5, softcap=None, kv_head_index=kv_head_index)
        recall = block_sparse_block_recall(q, k, index, spot_check_blocks(q_len, config.block_size),
                                           scale=d**-0.5, kv_head_index=kv_head_index).amin(-1)
        pattern = AntidiagonalPattern(replace(config, spot_check_recall=ref.median(recall)))
        threshold = 1.01
    if name == "row_quantile_spot_check":
        index = pattern.estimate(q, k, scale=d**-0.5, softcap=None, kv_head_index=kv_head_index)
        rows = block_sparse_block_recall(q, k, index, spot_check_blocks(q_len, config.block_size), per_row=True,
                                         scale=d**-0.5, kv_head_index=kv_head_index)
        statistic = torch.nanquantile(rows.flatten(-2), ROW_QUANTILE, dim=-1)
        pattern = AntidiagonalPattern(replace(config, spot_check_recall=ref.median(statistic),
                                              spot_check_quantile=ROW_QUANTILE))
        threshold = 1.01
    eager_out, eager_pairs, eager_dense = ref.run_pattern(pattern, q, k, v, kv_head_index, threshold)
    assert 0 < int(eager_dense) < b * hq, density

    out, pairs, dense = ref.run_fullgraph(lambda *a: ref.run_pattern(pattern, *a, threshold), q, k, v, kv_head_index)
    assert not torch.isnan(out).any(), "some output rows were never written"
    assert int(dense) == int(eager_dense)
    assert torch.equal(pairs, eager_pairs)
    torch.testing.assert_close(out, eager_out, atol=2e-6, rtol=2e-6)
    routed = eager_pairs == causal
    exact = ref.attention_reference(q, k, v, scale=d**-0.5, kv_head_index=kv_head_index)
    torch.testing.assert_close(out[routed].double(), exact[routed], atol=2e-5, rtol=2e-5)


@pytest.mark.parametrize("q_len,k_len,block_q,block_k", [(97, 97, 16, 32), (40, 130, 16, 16), (64, 64, 32, 32)])
def test_heads_whole_list_every_visible_key_and_leave_the_others(q_len, k_len, block_q, block_k):
    b, h = 2, 3
    g = torch.Generator().manual_seed(q_len)
    scores = torch.rand(b, h, -(-q_len // block_q), -(-k_len // block_k), generator=g)
    index = select_blocks(scores, q_len=q_len, k_len=k_len, block_size_q=block_q, block_size_k=block_k, mass=0.3)
    columns = torch.randint(0, k_len, (b, h, index.block_count.shape[-1], 3), generator=g, dtype=torch.int32)
    index = BlockSparseIndex(block_count=index.block_count, block_index=index.block_index, block_size_q=block_q,
                             block_size_k=block_k, q_len=q_len, k_len=k_len,
                             column_count=torch.full_like(index.block_count, 3), column_index=columns)
    full = index.at_full_width()
    assert full.block_index.shape[-1] == -(-k_len // block_k)
    assert torch.equal(full.to_dense_mask(), index.to_dense_mask())
    assert torch.equal(full.computed_pairs(), index.computed_pairs())
    heads = torch.tensor([[True, False, True], [False, False, True]])
    whole = index.with_heads_whole(heads)
    causal = torch.ones(q_len, k_len, dtype=torch.bool).tril(k_len - q_len)
    listed = whole.to_dense_mask()
    for row in range(b):
        for head in range(h):
            if heads[row, head]:
                assert bool((listed[row, head] | ~causal).all())
                assert int(whole.computed_pairs()[row, head]) == int(causal.sum())
                assert int(whole.column_count[row, head].sum()) == 0
            else:
                assert torch.equal(listed[row, head], index.to_dense_mask()[row, head])


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("routed", [False, True], ids=["unrouted", "routed"])
@pytest.mark.parametrize("name", list(GRAPH_CONFIGS))
def test_a_block_estimate_and_its_attention_capture_in_a_cuda_graph(name, routed):
    """No host read between the estimate and the attention on the GPU: the whole run, heads routed dense
    included, captures in a CUDA graph, and replaying it on new q/k/v gives the eager result for those
    inputs (the routed heads through the block kernel instead of SDPA)."""
    b, hq, hkv, length, d = 1, 4, 2, 700, 64
    # Queries sharper head by head, so the heads keep different shares of their blocks (on these random
    # inputs unscaled, pooled scores are near uniform and every head keeps as many).
    sharpness = torch.tensor([1.0, 4.0, 16.0, 64.0]).view(1, hq, 1, 1)
    inputs = [tuple(t.cuda().to(torch.bfloat16) for t in ref.make_qkv(seed, b, hq, hkv, length, length, d, spread=2.0))
              for seed in (3, 4)]
    inputs = [(q * sharpness.to(q), k, v) for q, k, v in inputs]
    kv_head_index = (torch.arange(hq) // (hq // hkv)).cuda()
    pattern_cls, config = GRAPH_CONFIGS[name]
    pattern = pattern_cls(replace(config, block_size=64))
    static = [t.clone() for t in inputs[0]]
    out = torch.empty_like(static[0])
    # Routing by density inside the capture: the routed heads list every block. The threshold lies midway
    # between the least and the most dense head of the captured input, so that input routes some heads and
    # not others (a median could equal the densest head, and route all of them when heads tie).
    plain = pattern.run(*static, scale=d**-0.5, softcap=None, kv_head_index=kv_head_index, out=out)
    density = plain.computed_pairs.double() / int(ref.pair_count(None, length, length))
    threshold = None
    kw = dict(scale=d**-0.5, softcap=None, kv_head_index=kv_head_index)
    if routed:
        # Heads the spot check flags run dense whatever their density: the density threshold is placed
        # among the others, so the captured input routes some heads and not all.
        flagged = pattern.unpredictable_heads(*static[:2], pattern.estimate(*static[:2], **kw), **kw)
        free = density[~flagged] if flagged is not None else density.flatten()
        assert free.numel() > 0, f"the spot check flags every head of the captured input ({flagged.tolist()})"
        if flagged is None or not bool(flagged.any()):
            assert free.max() > free.min(), "the input's heads must differ in density for routing to be tested"
        threshold = float((free.max() + free.min()) / 2) if free.max() > free.min() else float(free.max()) + 1e-6
    run = lambda: pattern.run(*static, scale=d**-0.5, softcap=None, kv_head_index=kv_head_index, out=out,  # noqa: E731
                              dense_above=threshold)
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        run()  # compiles the Triton kernels outside the capture
        if routed:  # and the block kernel on the routed (whole-head) lists
            index = pattern.estimate(*static[:2], **kw)
            pattern.attend(*static, index.with_heads_whole(density >= threshold), out=out, **kw)
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        result = run()
    for step, (q, k, v) in enumerate(inputs):
        for target, source in zip(static, (q, k, v)):
            target.copy_(source)
        out.fill_(float("nan"))
        graph.replay()
        expected = torch.full_like(q, float("nan"))
        eager = pattern.run(q, k, v, scale=d**-0.5, softcap=None, kv_head_index=kv_head_index, out=expected,
                            dense_above=threshold)
        assert torch.equal(result.computed_pairs, eager.computed_pairs)
        if not routed:
            assert eager.dense_heads == 0
        elif step == 0:  # the captured input itself; the other may route all heads or none at this threshold
            assert 0 < int(eager.dense_heads) < b * hq
        dense = eager.computed_pairs == int(ref.pair_count(None, length, length)) if routed else \
            torch.zeros(b, hq, dtype=torch.bool, device="cuda")
        assert not torch.isnan(out).any()
        torch.testing.assert_close(out[~dense], expected[~dense], atol=0, rtol=0)
        # Eager routes through SDPA, the capture through the block kernel: the same exact attention in bf16.
        torch.testing.assert_close(out[dense], expected[dense], atol=2e-2, rtol=2e-2)
