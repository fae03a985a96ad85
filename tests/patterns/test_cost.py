"""The cost model that decides where the default runs sparse (``patterns/cost.py``), and the routing
that follows it: checked against the H200 measurements it was fitted to, and on tiny models for
which phase each decision sends a prefill to."""

from __future__ import annotations

import pytest
import torch

import sparseprefill
from sparseprefill import PatternName, SparseConfig
from sparseprefill.patchers.state import FallbackReason
from sparseprefill.patterns import cost

from tests.tiny_models import tiny_model

QWEN = {"heads": 14, "head_dim": 64, "layers": 24}
LLAMA_8B = {"heads": 32, "head_dim": 128, "layers": 32}


def _speedup(shape, length, pattern=PatternName.AUTO, device="cuda"):
    groups = [(pattern, shape["heads"], shape["head_dim"])] * shape["layers"]
    return cost.predicted_speedup(groups, length, length, device)


def test_dense_time_matches_the_measured_cudnn_layer():
    # Qwen2.5-Coder-0.5B, 32K, one layer: 24.56 ms over 6 timed layers (experiments/real_density.py).
    assert cost.dense_attention_ms(32768, 32768, 14, 64) == pytest.approx(24.56 / 6, rel=0.05)
    # Llama-3.1-8B shapes, 128K: 246.7 ms measured (docs/benchmarks.md).
    assert cost.dense_attention_ms(131072, 131072, 32, 128) == pytest.approx(246.7, rel=0.05)


def test_sparse_time_matches_the_measured_vertical_slash_layer():
    # Qwen at 32K, auto: estimate 3.03 ms + attention 1.86 ms per layer at density 0.345.
    predicted = cost.sparse_attention_ms(PatternName.AUTO, 32768, 32768, 14, 64)
    assert predicted == pytest.approx(3.03 + 1.86 * 0.40 / 0.345, rel=0.2)


def test_the_measured_real_model_slowdowns_are_predicted():
    # Measured end to end on the H200 with auto forced: 0.61x at 16K and 0.85x at 32K, 1.18x at 64K.
    assert _speedup(QWEN, 16384) < 1.0
    assert _speedup(QWEN, 32768) < 1.0
    assert _speedup(QWEN, 65536) >= cost.MIN_PREDICTED_SPEEDUP
    assert _speedup(QWEN, 131072) > _speedup(QWEN, 65536)


def test_the_speedup_grows_with_length_for_every_sparse_pattern():
    for pattern in cost.PATTERN_COSTS:
        speedups = [_speedup(LLAMA_8B, n, pattern) for n in (8192, 32768, 131072)]
        assert speedups == sorted(speedups), (pattern, speedups)


def test_no_cost_model_means_dense():
    assert _speedup(QWEN, 131072, device="cpu") == 0.0
    assert cost.predicted_speedup([], 131072, 131072, "cuda") == 0.0
    # Dense heads cost the same either way: all-dense never runs sparse, and a few dense heads in a
    # profile only dilute the gain of the others.
    assert cost.sparse_attention_ms(PatternName.DENSE, 4096, 4096, 8, 64) == cost.dense_attention_ms(4096, 4096, 8, 64)
    assert _speedup(QWEN, 131072, PatternName.DENSE) == pytest.approx(1.0)
    mixed = [(PatternName.AUTO, 12, 64), (PatternName.DENSE, 2, 64)] * 24
    assert 1.0 < cost.predicted_speedup(mixed, 131072, 131072, "cuda") < _speedup(QWEN, 131072)


def _state(model):
    return model._sparseprefill_state


def test_default_routing_follows_the_cost_model():
    model = tiny_model("llama")
    sparseprefill.patch(model, SparseConfig())
    try:
        state = _state(model)
        assert set(state.head_dims) == set(range(model.config.num_hidden_layers))
        # The CPU has no cost model; on a GPU a tiny model never gains either (a few heads).
        assert state.prefill_dense_reason(256, 256, "cpu") is FallbackReason.COST_MODEL
        assert state.prefill_dense_reason(131072, 131072, "cuda") is FallbackReason.COST_MODEL
    finally:
        sparseprefill.unpatch(model)


def test_an_explicit_min_sparse_len_forces_the_length_rule():
    model = tiny_model("llama")
    sparseprefill.patch(model, SparseConfig(min_sparse_len=100))
    try:
        state = _state(model)
        assert state.prefill_dense_reason(99, 99, "cpu") is FallbackReason.SHORT
        assert state.prefill_dense_reason(100, 100, "cpu") is None
    finally:
        sparseprefill.unpatch(model)


def test_a_cost_model_fallback_is_exactly_unpatched_and_visible_in_stats():
    model = tiny_model("qwen2", windowed=False)
    ids = torch.randint(3, model.config.vocab_size, (1, 200), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = model(ids).logits
    sparseprefill.patch(model)
    try:
        with torch.no_grad():
            got = model(ids).logits
        stats = sparseprefill.stats(model)
    finally:
        sparseprefill.unpatch(model)
    assert torch.equal(got, expected)
    assert stats.fallbacks["cost_model"] == model.config.num_hidden_layers, dict(stats.fallbacks)
    assert stats.phases.get("sparse_prefill", 0) == 0
