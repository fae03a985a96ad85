"""When sparse prefill pays: a cost model of estimate + sparse attention against dense attention.

``SparseConfig(min_sparse_len=None)`` (the default) runs a prefill sparse only where this model
predicts it faster than dense for the shape at hand: the layers' head counts, head_dim, the key and
query lengths, and each head group's pattern. A prompt length alone cannot decide it: on
Qwen2.5-Coder-0.5B (14 query heads of dim 64) the default estimate costs 3.0 ms per layer at 32K
against 4.1 ms for the whole dense layer, so sparse lost there (0.85x end to end) while on
Llama-3.1-8B shapes (32 heads of dim 128) the same length gained.

Per layer and head group, on the GPU::

    dense_ms  = 4 * heads * head_dim * causal_pairs / cuDNN's rate at this head_dim
    sparse_ms = estimate_fixed_ms + estimate_ms_per_head_key * heads * k_len
                + estimate_dense_fraction * dense_ms                  # estimators that score blocks
                + typical_density * dense_ms / kernel_efficiency     # the sparse kernel

All constants were measured on one H200 or H100 (bf16, warm, ``triton.testing.do_bench`` medians) by
``experiments/real_speed.py --parts timing`` and ``experiments/real_density.py --part mass`` on
Qwen2.5-Coder-0.5B q/k/v at 32K-128K and by ``sparseprefill bench kernels`` on Llama-3.1-8B shapes
(docs/benchmarks.md); ``typical_density`` is what each estimator kept on the real model's natural text
at 16K-128K. The prefill-level decision is made before any estimate, so it prices a typical density;
inside a sparse prefill each head whose own estimate keeps past its kernel's break-even runs dense
(``dense_break_even``), which bounds a layer's loss to the estimate's cost. Other GPUs shift the fixed costs (launch
overhead) and the rates; the model is deliberately conservative (sparse must be predicted
``MIN_PREDICTED_SPEEDUP`` faster). There is no cost model for the CPU: its sparse path is the fp32
reference, slower than dense at every measured density, so the default runs dense there.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, replace

from ..config import PatternName
from ..kernels.geometry import causal_pairs_total

__all__ = [
    "DENSE_FLOPS_PER_MS_LARGE_HEAD",
    "DENSE_FLOPS_PER_MS_SMALL_HEAD",
    "ANTIDIAGONAL_DENSITY_BY_MASS",
    "EstimateExtras",
    "NO_EXTRAS",
    "MIN_PREDICTED_SPEEDUP",
    "SAMPLED_SCORING_COST_FACTOR",
    "PatternCost",
    "PATTERN_COSTS",
    "dense_attention_ms",
    "dense_break_even",
    "kernel_time_ratio",
    "sparse_attention_ms",
    "predicted_speedup",
    "antidiagonal_extras",
    "antidiagonal_mass_density",
    "vertical_share_extras",
]

# cuDNN's causal attention rate on the H200 (FLOP per ms): 470 TFLOP/s measured at head_dim 64
# (Qwen, 32K), 546-568 at head_dim 128 (Llama shapes, 8K-128K; ../shared/docs/gpu.md).
DENSE_FLOPS_PER_MS_SMALL_HEAD = 4.7e11
DENSE_FLOPS_PER_MS_LARGE_HEAD = 5.5e11
# Sparse must be predicted this much faster than dense to run: the model's error on the measured
# points is about 10-25%, and a wrong "sparse" costs more than a wrong "dense" (which costs nothing
# against unpatched).
MIN_PREDICTED_SPEEDUP = 1.25
# Head dims up to this use the small-head kernel efficiencies (64-row programs fit more warps).
SMALL_HEAD_DIM = 64
# The antidiagonal estimate's sampled scoring (S exponentials per output, a GEMM per antidiagonal slot)
# against the mean-logit scoring, same tiles: 0.352-0.365 / 0.107-0.111 of dense on Qwen shapes (d 64),
# 0.243-0.246 / 0.118-0.121 on Llama shapes (d 128), H200, experiments/antidiagonal_tiles.py. The
# larger ratio, so that the cost model never prices the sampled scoring below what it costs.
SAMPLED_SCORING_COST_FACTOR = 3.3


@dataclass(frozen=True)
class PatternCost:
    """Measured costs of one pattern's estimate and kernel (module docstring for the formula).

    Attributes:
        estimate_fixed_ms: launches, host reads and small ops per layer, whatever the length.
        estimate_ms_per_head_key: the part of the estimate that grows with heads x keys.
        estimate_dense_fraction: the part that grows like dense attention (block scoring), as a
            fraction of the dense time.
        efficiency_small_head / efficiency_large_head: the sparse kernel's rate per computed pair as a
            fraction of cuDNN's, for head_dim <= ``SMALL_HEAD_DIM`` and above.
        typical_density: share of causal pairs the pattern keeps on real attention (one scoring window).
        extra_window_ms_per_head_key / extra_window_density: what each query window past the first
            adds (vertical-slash ``query_windows``): estimate time per head and key, kept density.
    """

    estimate_fixed_ms: float
    estimate_ms_per_head_key: float
    estimate_dense_fraction: float
    efficiency_small_head: float
    efficiency_large_head: float
    typical_density: float
    extra_window_ms_per_head_key: float = 0.0
    extra_window_density: float = 0.0


# Vertical-slash (and auto), estimate + per-block index: 1.61-1.73 ms per layer at 32K and 2.5-4.5 ms
# at 128K on Qwen's real q/k (14 heads, H100; 8.9 ms on its most diffuse layer), 1.75 / 2.60 / 9.75 ms
# at 8K / 32K / 128K on 32 heads (H200); the index kernel computes a pair at 0.65-0.73 of cuDNN's rate
# at head_dim 64 on real q/k (H100; 0.76 on the H200), 0.45 at 128 (H200); density 0.31-0.43 on Qwen's
# natural text at 16K-128K (auto, mass 0.95). experiments/real_speed.py, docs/benchmarks.md.
# Each extra query window: 4 windows against 1 cost 1.1 / 1.8 ms more estimate per layer at 64K / 128K
# (end to end, less the extra density's attention) and kept 0.03-0.08 more of the pairs.
_VERTICAL_SLASH = PatternCost(0.75, 2.0e-6, 0.0, 0.70, 0.45, 0.37, extra_window_ms_per_head_key=3.7e-7,
                              extra_window_density=0.02)
PATTERN_COSTS: dict[PatternName, PatternCost] = {
    PatternName.AUTO: _VERTICAL_SLASH,
    PatternName.VERTICAL_SLASH: _VERTICAL_SLASH,
    # Pooled block scores: 1.36 ms per layer at 32K on Qwen; kernel at 0.90 (dim 64) / 0.75 (dim 128)
    # of cuDNN per pair; density 0.20-0.26 (mass 0.95).
    PatternName.BLOCK_SPARSE: PatternCost(0.4, 2.1e-6, 0.0, 0.90, 0.75, 0.25),
    # Antidiagonal scoring computes 1/S of Q K^T once (one sweep, 64 x 128 tiles): 0.11-0.14 of dense at
    # 32K-128K on Qwen and Llama shapes (H100; 0.107-0.121 on the H200; experiments/antidiagonal_tiles.py;
    # two sweeps over 64 x 64 tiles took 0.24-0.50), plus the block selection, which without a sort is
    # under 0.01 of dense (H200: 0.036 / 0.233 ms at 32K / 128K on Qwen shapes, 0.077 / 0.520 on Llama;
    # the sort took 0.53-3.9 ms, 0.02-0.14 of dense); density 0.232 / 0.217 at 32K / 64K with its
    # default mass 0.95 (H100, experiments/real_density.py; 0.15-0.20 at mass 0.90 on the H200). The
    # sampled scoring (AntidiagonalConfig.scoring) costs more: SAMPLED_SCORING_COST_FACTOR.
    PatternName.ANTIDIAGONAL: PatternCost(0.5, 0.0, 0.13, 0.90, 0.75, 0.22),
    # A fixed sink + window index: 0.87 ms per layer to build at 32K on Qwen; vertical-slash kernel;
    # density 0.24 at 32K with the default 4K of sink and window.
    PatternName.A_SHAPE: PatternCost(0.9, 0.0, 0.0, 0.75, 0.45, 0.25),
}


@dataclass(frozen=True)
class EstimateExtras:
    """What an option adds to its pattern's measured cost, per layer: ``fixed_ms``, ``ms_per_head_key``
    (times query heads x keys) and ``density`` (kept pairs, as a share of the causal ones)."""

    fixed_ms: float = 0.0
    ms_per_head_key: float = 0.0
    density: float = 0.0


NO_EXTRAS = EstimateExtras()

# AntidiagonalConfig.vertical_share: the last 64 queries' column scores, a top-k per head and the per-block
# column lists cost 1.1-1.9 ms more estimate per layer at 32K and 2.6 ms at 128K on Qwen's real q/k (14
# heads, H100, experiments/real_speed.py --parts timing, benchmarks/results/real_qwen_h100/run15_block_columns);
# the whole layer took 0.6-2.3 / 2.8-4.6 ms more. Most of the 32K part is launches (0.5 ms more when the
# layer replays from a CUDA graph). The kept columns add at most ``share`` of the pairs.
VERTICAL_SHARE_FIXED_MS = 1.0
VERTICAL_SHARE_MS_PER_HEAD_KEY = 1.4e-6


# What the antidiagonal estimate keeps on Qwen2.5-Coder-0.5B's natural text by its ``mass`` (mean of 32K and
# 64K, H100/H200; docs/benchmarks.md): 0.15-0.20 at 0.90, 0.232 / 0.217 at 0.95 (the pattern's typical
# density), 0.335 / 0.310 at 0.98, 0.415 / 0.382 at 0.99. Between the points the model interpolates;
# below the lowest it keeps the lowest (no measurement says how far it falls), above the highest it
# rises to every pair at mass 1.
ANTIDIAGONAL_DENSITY_BY_MASS = ((0.90, 0.175), (0.95, 0.22), (0.98, 0.31), (0.99, 0.40), (1.0, 1.0))


def antidiagonal_mass_density(mass: float) -> float:
    """The typical density the antidiagonal estimate keeps at ``mass`` (``ANTIDIAGONAL_DENSITY_BY_MASS``)."""
    points = ANTIDIAGONAL_DENSITY_BY_MASS
    if mass <= points[0][0]:
        return points[0][1]
    for (m0, d0), (m1, d1) in zip(points, points[1:]):
        if mass <= m1:
            return d0 + (d1 - d0) * (mass - m0) / (m1 - m0)
    return points[-1][1]


def antidiagonal_extras(mass: float, vertical_share: float) -> EstimateExtras:
    """What the antidiagonal options add to its measured cost: the density its ``mass`` keeps beyond the
    pattern's typical one (negative below it), and the columns of ``vertical_share``."""
    columns = vertical_share_extras(vertical_share)
    extra_density = antidiagonal_mass_density(mass) - PATTERN_COSTS[PatternName.ANTIDIAGONAL].typical_density
    return replace(columns, density=columns.density + extra_density)


def vertical_share_extras(share: float) -> EstimateExtras:
    """The cost of the head's best ``share`` of key columns beside the kept blocks (none at 0)."""
    if share == 0:
        return NO_EXTRAS
    return EstimateExtras(VERTICAL_SHARE_FIXED_MS, VERTICAL_SHARE_MS_PER_HEAD_KEY, share)


def dense_attention_ms(q_len: int, k_len: int, heads: int, head_dim: int) -> float:
    """Predicted dense causal attention time of ``heads`` query heads on the GPU."""
    rate = DENSE_FLOPS_PER_MS_SMALL_HEAD if head_dim <= SMALL_HEAD_DIM else DENSE_FLOPS_PER_MS_LARGE_HEAD
    return 4.0 * heads * head_dim * causal_pairs_total(q_len, k_len) / rate


def sparse_attention_ms(pattern: PatternName, q_len: int, k_len: int, heads: int, head_dim: int,
                        query_windows: int = 1, estimate_cost_factor: float = 1.0,
                        extras: EstimateExtras = NO_EXTRAS) -> float:
    """Predicted estimate + sparse attention time; the dense time for the dense pattern (such heads
    run dense either way, so they weigh the same on both sides of the comparison). ``query_windows``:
    the vertical-slash estimate's scoring windows (each past the first adds its cost and density);
    ``estimate_cost_factor``: scales the estimate's dense-like part (``SparsePattern.estimate_cost_factor``);
    ``extras``: what the pattern's options add (``SparsePattern.cost_extras``)."""
    dense = dense_attention_ms(q_len, k_len, heads, head_dim)
    cost = PATTERN_COSTS.get(PatternName(pattern))
    if cost is None:  # the dense pattern
        return dense
    efficiency = cost.efficiency_small_head if head_dim <= SMALL_HEAD_DIM else cost.efficiency_large_head
    extra_windows = max(query_windows, 1) - 1
    estimate = (cost.estimate_fixed_ms
                + (cost.estimate_ms_per_head_key + extra_windows * cost.extra_window_ms_per_head_key) * heads * k_len
                + cost.estimate_dense_fraction * estimate_cost_factor * dense)
    estimate += extras.fixed_ms + extras.ms_per_head_key * heads * k_len
    density = min(cost.typical_density + extra_windows * cost.extra_window_density + extras.density, 1.0)
    return estimate + density * dense / efficiency


def kernel_time_ratio(pattern: PatternName | str, density: float, head_dim: int) -> float:
    """Predicted time of one head's sparse kernel at ``density`` over the same head's dense time (1.0 for
    the dense pattern). Above 1 the head is faster dense even with its estimate for free: the sparse
    kernels compute a pair at ``efficiency`` of cuDNN's rate, so a head keeping more than that share of
    its pairs loses. The estimate is left out: it is paid once per layer, shrinks relative to attention
    as the prompt grows, and the per-prefill cost model above charges it."""
    cost = PATTERN_COSTS.get(PatternName(pattern))
    if cost is None:
        return 1.0
    efficiency = cost.efficiency_small_head if head_dim <= SMALL_HEAD_DIM else cost.efficiency_large_head
    return density / efficiency


def dense_break_even(pattern: PatternName | str, head_dim: int) -> float | None:
    """The density from which one head of ``pattern`` is faster dense than on its sparse kernel (the
    kernel's rate per computed pair relative to cuDNN's: ``kernel_time_ratio`` reaches 1 there), or
    None for the dense pattern. The sparse path routes heads whose estimate keeps at least this share
    of their causal pairs to dense attention (``SparseConfig.route_dense_heads``)."""
    cost = PATTERN_COSTS.get(PatternName(pattern))
    if cost is None:
        return None
    return cost.efficiency_small_head if head_dim <= SMALL_HEAD_DIM else cost.efficiency_large_head


def predicted_speedup(groups: Sequence[tuple], q_len: int, k_len: int, device_type: str) -> float:
    """Predicted dense time / sparse time of one prefill: ``groups`` lists (pattern, query heads,
    head_dim[, query_windows[, estimate_cost_factor[, extras]]]) of every head group, over all layers, that would run sparse. 0 on devices
    without a cost model (the CPU) and when no group would run sparse."""
    if device_type != "cuda" or not groups:
        return 0.0
    dense = sum(dense_attention_ms(q_len, k_len, group[1], group[2]) for group in groups)
    sparse = sum(sparse_attention_ms(group[0], q_len, k_len, group[1], group[2], *group[3:]) for group in groups)
    return dense / sparse
