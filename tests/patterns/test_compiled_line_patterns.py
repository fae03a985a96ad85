"""The line patterns (vertical-slash, the default, and A-shape) under ``torch.compile(fullgraph=True)``: the whole
``run`` is one op (``patterns/compiled.py``), so a traced run computes what the eager one does, heads routed
dense and the held-out check included, with no graph break. Traced and eager runs must agree on every output
element, the pairs counted and the heads routed."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch

from sparseprefill.config import AShapeConfig, VerticalSlashConfig
from sparseprefill.kernels.vertical_slash import vertical_slash_block_recall
from sparseprefill.patterns import AShapePattern, VerticalSlashPattern
from sparseprefill.patterns.compiled import register_pattern, run_pattern_op
from sparseprefill.patterns.vertical_slash import heldout_window_ends

from tests import reference as ref
from tests.reference import torch_single_thread  # noqa: F401  (autouse fixture)

VERTICAL_SLASH = VerticalSlashConfig(block_size=16, last_queries=16, sink_tokens=4, local_tokens=16,
                                     vertical_mass=0.6, slash_mass=0.6, query_windows=2, heldout_recall=None)
CONFIGS = {
    "vertical_slash": (VerticalSlashPattern, VERTICAL_SLASH),
    # The held-out check on, its threshold set per case so that it flags some heads (see below).
    "heldout_check": (VerticalSlashPattern, VERTICAL_SLASH),
    "fused": (VerticalSlashPattern, replace(VERTICAL_SLASH, fused=True)),
    "a_shape": (AShapePattern, AShapeConfig(block_size=16, sink_tokens=4, local_tokens=24)),
}


@pytest.mark.parametrize("q_len,k_len", ref.ROUTING_LENGTHS)
@pytest.mark.parametrize("name", list(CONFIGS))
def test_a_compiled_line_pattern_runs_as_one_op_and_matches_eager(name, q_len, k_len):
    pattern_cls, config = CONFIGS[name]
    pattern, q, k, v, kv_head_index, _, density = ref.routing_case(23, pattern_cls, config, q_len, k_len)
    b, hq, _, d = q.shape
    # About half the heads routed dense by density (the fused path and A-shape do not route).
    threshold = ref.median(density)
    if name == "heldout_check":
        scale = d**-0.5
        index = pattern.estimate(q, k, scale=scale, softcap=None, kv_head_index=kv_head_index)
        ends = heldout_window_ends(q_len, config.last_queries, config.query_windows)
        blocks = sorted({(end - 1) // config.block_size for end in ends})
        recall = vertical_slash_block_recall(q, k, index, torch.tensor(blocks), scale=scale,
                                             kv_head_index=kv_head_index).amin(-1)
        pattern = pattern_cls(replace(config, heldout_recall=ref.median(recall)))
        threshold = 1.01  # routed by the check alone
    eager_out, eager_pairs, eager_dense = ref.run_pattern(pattern, q, k, v, kv_head_index, threshold)
    if name in ("vertical_slash", "heldout_check"):
        assert 0 < int(eager_dense) < b * hq, (name, eager_pairs)

    out, pairs, dense = ref.run_fullgraph(lambda *a: ref.run_pattern(pattern, *a, threshold), q, k, v, kv_head_index)
    assert not torch.isnan(out).any(), "some output rows were never written"
    assert int(dense) == int(eager_dense)
    assert torch.equal(pairs, eager_pairs)
    assert torch.equal(out, eager_out)  # the op's body is the eager run: the same kernels on the same index


def test_the_op_finds_its_pattern_by_class_and_config_and_refuses_an_unknown_key():
    first, second = VerticalSlashPattern(VERTICAL_SLASH), VerticalSlashPattern(replace(VERTICAL_SLASH))
    assert first.op_key == second.op_key == register_pattern(first)
    assert VerticalSlashPattern(replace(VERTICAL_SLASH, vertical_mass=0.7)).op_key != first.op_key
    assert AShapePattern(AShapeConfig()).op_key != VerticalSlashPattern(VerticalSlashConfig()).op_key
    q = torch.zeros(1, 2, 8, 16)
    k = v = torch.zeros(1, 1, 8, 16)
    with pytest.raises(RuntimeError, match="no pattern registered as 'nonesuch'"):
        torch.ops.sparseprefill.pattern_run(q, k, v, torch.zeros(2, dtype=torch.long), torch.empty_like(q),
                                                 "nonesuch", 0.25, 0.0, -1.0)


def test_the_index_of_a_compiled_run_is_refused_to_inspectors_with_the_reason():
    q, k, v = ref.make_qkv(5, 1, 2, 1, 64, 64, 16, spread=2.0)
    pattern = VerticalSlashPattern(VERTICAL_SLASH)
    result = run_pattern_op(pattern, q, k, v, scale=0.25, softcap=None, kv_head_index=torch.zeros(2, dtype=torch.long),
                                 out=torch.empty_like(q), dense_above=None)
    assert result.index is None and not bool(result.per_head_columns)
    with pytest.raises(RuntimeError, match="ran inside torch.compile"):
        result.inspected_index()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_capturing_the_index_path_in_a_cuda_graph_is_refused_with_the_way_out():
    """The index path reads its sizes on the host: a capture is refused up front, naming the capturable
    options, instead of failing inside the builder with a CUDA error."""
    q, k, v = (t.cuda().to(torch.bfloat16) for t in ref.make_qkv(3, 1, 4, 2, 256, 256, 64, spread=2.0))
    kv_head_index = (torch.arange(4) // 2).cuda()
    pattern = VerticalSlashPattern(replace(VERTICAL_SLASH, block_size=64))
    out = torch.empty_like(q)
    pattern.run(q, k, v, scale=0.125, softcap=None, kv_head_index=kv_head_index, out=out)  # compiles outside
    graph = torch.cuda.CUDAGraph()
    with pytest.raises(RuntimeError, match="fused=True"):
        with torch.cuda.graph(graph):
            pattern.run(q, k, v, scale=0.125, softcap=None, kv_head_index=kv_head_index, out=out)
