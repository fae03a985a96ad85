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


def _speedup(shape, length, pattern=PatternName.AUTO, device="cuda", windows=1, estimate_factor=1.0):
    groups = [(pattern, shape["heads"], shape["head_dim"], windows, estimate_factor)] * shape["layers"]
    return cost.predicted_speedup(groups, length, length, device)


def test_dense_time_matches_the_measured_cudnn_layer():
    # Qwen2.5-Coder-0.5B, 32K, one layer: 24.56 ms over 6 timed layers (experiments/real_density.py).
    assert cost.dense_attention_ms(32768, 32768, 14, 64) == pytest.approx(24.56 / 6, rel=0.05)
    # Llama-3.1-8B shapes, 128K: 246.7 ms measured (docs/benchmarks.md).
    assert cost.dense_attention_ms(131072, 131072, 32, 128) == pytest.approx(246.7, rel=0.05)


def test_sparse_time_matches_the_measured_vertical_slash_layer():
    # Qwen's real q/k on an H100 (experiments/real_speed.py --parts timing), auto, estimate + per-block
    # index then the index kernel, per layer: 32K layer 6, 1.61 + 1.83 ms at density 0.258; 128K layer
    # 6, 4.49 + 17.61 ms at density 0.169. Scaled to the model's typical density.
    typical = cost.PATTERN_COSTS[PatternName.AUTO].typical_density
    for length, estimate, attend, density in ((32768, 1.61, 1.83, 0.258), (131072, 4.49, 17.61, 0.169)):
        predicted = cost.sparse_attention_ms(PatternName.AUTO, length, length, 14, 64)
        assert predicted == pytest.approx(estimate + attend * typical / density, rel=0.2), length


def test_the_crossover_on_the_real_model():
    # Per layer on the H100 at the typical density: the estimate (1.6 ms at 32K) eats the gain below
    # ~48K, while at 64K and 128K sparse is predicted well ahead.
    assert _speedup(QWEN, 16384) < 1.0
    assert _speedup(QWEN, 32768) < cost.MIN_PREDICTED_SPEEDUP
    assert _speedup(QWEN, 65536) >= cost.MIN_PREDICTED_SPEEDUP
    assert _speedup(QWEN, 131072) > _speedup(QWEN, 65536)


def test_four_query_windows_move_the_crossover_past_64k():
    # The default's 4 windows (H100, forced sparse end to end): 1.07x of cuDNN at 64K, 1.48x at 128K;
    # attention alone about 1.11x and 1.64x. The model charges their estimate and density: dense at 64K
    # (inside the 1.25 margin), sparse at 128K.
    assert _speedup(QWEN, 65536, windows=4) < cost.MIN_PREDICTED_SPEEDUP <= _speedup(QWEN, 131072, windows=4)
    assert _speedup(QWEN, 131072, windows=4) < _speedup(QWEN, 131072)
    # The patch prices each group with its own pattern's windows.
    model = tiny_model("llama")
    sparseprefill.patch(model, SparseConfig())
    try:
        assert all(group.pattern.query_windows == 4 for plan in _state(model).plans.values() for group in plan.groups)
    finally:
        sparseprefill.unpatch(model)


def test_sampled_antidiagonal_scoring_is_priced_at_its_measured_cost():
    # H200, Qwen shapes: the mean-logit estimate 0.107-0.111 of dense, the sampled one 0.352-0.365
    # (experiments/antidiagonal_tiles.py); the model charges the larger share, so it predicts less.
    antidiagonal = cost.PATTERN_COSTS[PatternName.ANTIDIAGONAL]
    assert antidiagonal.estimate_dense_fraction * cost.SAMPLED_SCORING_COST_FACTOR >= 0.365
    for length in (32768, 131072):
        mean_logit = _speedup(QWEN, length, PatternName.ANTIDIAGONAL)
        sampled = _speedup(QWEN, length, PatternName.ANTIDIAGONAL, estimate_factor=cost.SAMPLED_SCORING_COST_FACTOR)
        assert sampled < mean_logit, length
    # The patch prices each group with its own pattern's estimate factor.
    model = tiny_model("llama")
    sparseprefill.patch(model, SparseConfig(pattern="antidiagonal", antidiagonal={"scoring": "sampled_mass"}))
    try:
        factors = {group.pattern.estimate_cost_factor for plan in _state(model).plans.values() for group in plan.groups}
        assert factors == {cost.SAMPLED_SCORING_COST_FACTOR}
    finally:
        sparseprefill.unpatch(model)


def test_vertical_share_is_priced_at_its_measured_cost():
    # H100, Qwen's real q/k, per layer (run15_block_columns/timing.csv): the columns (share 0.01) took
    # 1.1-1.9 ms more estimate at 32K and 2.6 ms at 128K, and the whole layer 0.6-2.3 / 2.8-4.6 ms more.
    def extra(length):
        plain = cost.sparse_attention_ms(PatternName.ANTIDIAGONAL, length, length, 14, 64)
        return cost.sparse_attention_ms(PatternName.ANTIDIAGONAL, length, length, 14, 64,
                                        extras=cost.vertical_share_extras(0.01)) - plain
    assert 1.1 <= extra(32768) <= 2.3
    assert 2.8 <= extra(131072) <= 4.6
    assert cost.vertical_share_extras(0.0) == cost.NO_EXTRAS
    # The patch prices each group with its own pattern's extras.
    model = tiny_model("llama")
    sparseprefill.patch(model, SparseConfig(pattern="antidiagonal", antidiagonal={"vertical_share": 0.02}))
    try:
        extras = {group.pattern.cost_extras for plan in _state(model).plans.values() for group in plan.groups}
        assert extras == {cost.vertical_share_extras(0.02)} and cost.vertical_share_extras(0.02).density == 0.02
    finally:
        sparseprefill.unpatch(model)


def test_the_antidiagonal_mass_is_priced_at_the_density_it_keeps():
    # Qwen's natural text, mean of 32K and 64K: 0.22 at mass 0.95 (the pattern's typical density), 0.31
    # at 0.98, 0.40 at 0.99 (docs/benchmarks.md); every pair at mass 1; the lowest measured below 0.90.
    density = cost.antidiagonal_mass_density
    assert density(0.95) == cost.PATTERN_COSTS[PatternName.ANTIDIAGONAL].typical_density
    assert density(0.98) == pytest.approx(0.31) and density(0.99) == pytest.approx(0.40) and density(1.0) == 1.0
    assert density(0.5) == density(0.90) and 0.22 < density(0.965) < 0.31
    masses = [0.5, 0.9, 0.93, 0.95, 0.97, 0.98, 0.985, 0.99, 0.995, 1.0]
    assert [density(m) for m in masses] == sorted(density(m) for m in masses)
    assert cost.antidiagonal_extras(0.95, 0.0) == cost.NO_EXTRAS

    def speedup(mass):
        extras = cost.antidiagonal_extras(mass, 0.0)
        groups = [(PatternName.ANTIDIAGONAL, QWEN["heads"], QWEN["head_dim"], 1, 1.0, extras)] * QWEN["layers"]
        return cost.predicted_speedup(groups, 131072, 131072, "cuda")
    # End to end at 128K (H100, stop 30): mass 0.95 2.13x, 0.98 1.84x; attention alone is faster still.
    assert speedup(0.98) < speedup(0.95) and speedup(0.98) > 1.84
    model = tiny_model("llama")
    sparseprefill.patch(model, SparseConfig(pattern="antidiagonal", antidiagonal={"mass": 0.98}))
    try:
        extras = {group.pattern.cost_extras for plan in _state(model).plans.values() for group in plan.groups}
        assert extras == {cost.antidiagonal_extras(0.98, 0.0)}
    finally:
        sparseprefill.unpatch(model)


def test_dense_break_even_is_the_kernel_rate():
    for pattern, cfg in cost.PATTERN_COSTS.items():
        for head_dim, efficiency in ((64, cfg.efficiency_small_head), (128, cfg.efficiency_large_head)):
            break_even = cost.dense_break_even(pattern, head_dim)
            assert break_even == efficiency
            assert cost.kernel_time_ratio(pattern, break_even, head_dim) == pytest.approx(1.0)
    assert cost.dense_break_even(PatternName.DENSE, 64) is None


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
