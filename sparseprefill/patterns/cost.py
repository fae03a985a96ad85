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

All constants were measured on one H200 (bf16, warm, ``triton.testing.do_bench`` medians) by
``experiments/real_density.py --part mass`` on Qwen2.5-Coder-0.5B q/k/v at 32K and by ``sparseprefill
bench kernels`` on Llama-3.1-8B shapes (docs/benchmarks.md); ``typical_density`` is what each
estimator kept on the real model's natural text at 16K-64K. Other GPUs shift the fixed costs (launch
overhead) and the rates; the model is deliberately conservative (sparse must be predicted
``MIN_PREDICTED_SPEEDUP`` faster). There is no cost model for the CPU: its sparse path is the fp32
reference, slower than dense at every measured density, so the default runs dense there.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from ..config import PatternName
from ..kernels.geometry import causal_pairs_total

__all__ = [
    "DENSE_FLOPS_PER_MS_LARGE_HEAD",
    "DENSE_FLOPS_PER_MS_SMALL_HEAD",
    "MIN_PREDICTED_SPEEDUP",
    "PatternCost",
    "PATTERN_COSTS",
    "dense_attention_ms",
    "kernel_time_ratio",
    "sparse_attention_ms",
    "predicted_speedup",
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
        typical_density: share of causal pairs the pattern keeps on real attention.
    """

    estimate_fixed_ms: float
    estimate_ms_per_head_key: float
    estimate_dense_fraction: float
    efficiency_small_head: float
    efficiency_large_head: float
    typical_density: float


# Vertical-slash (and auto): 3.0 ms per layer at 32K on Qwen (14 heads), 1.75 / 2.60 / 9.75 ms at
# 8K / 32K / 128K on 32 heads; kernel at 0.76 of cuDNN per pair at head_dim 64, 0.45 at 128; density
# 0.36-0.43 on Qwen's natural text at 16K-64K (auto, mass 0.95).
_VERTICAL_SLASH = PatternCost(2.0, 2.1e-6, 0.0, 0.75, 0.45, 0.40)
PATTERN_COSTS: dict[PatternName, PatternCost] = {
    PatternName.AUTO: _VERTICAL_SLASH,
    PatternName.VERTICAL_SLASH: _VERTICAL_SLASH,
    # Pooled block scores: 1.36 ms per layer at 32K on Qwen; kernel at 0.90 (dim 64) / 0.75 (dim 128)
    # of cuDNN per pair; density 0.20-0.26 (mass 0.95).
    PatternName.BLOCK_SPARSE: PatternCost(0.4, 2.1e-6, 0.0, 0.90, 0.75, 0.25),
    # Antidiagonal scoring reads 1/S of Q K^T twice: 0.36 of dense at 128K on Llama shapes (89.5 of
    # 247 ms), 1.77 ms per layer at 32K on Qwen; density 0.15-0.20 (mass 0.90).
    PatternName.ANTIDIAGONAL: PatternCost(0.5, 0.0, 0.36, 0.90, 0.75, 0.20),
    # A fixed sink + window index: 0.87 ms per layer to build at 32K on Qwen; vertical-slash kernel;
    # density 0.24 at 32K with the default 4K of sink and window.
    PatternName.A_SHAPE: PatternCost(0.9, 0.0, 0.0, 0.75, 0.45, 0.25),
}


def dense_attention_ms(q_len: int, k_len: int, heads: int, head_dim: int) -> float:
    """Predicted dense causal attention time of ``heads`` query heads on the GPU."""
    rate = DENSE_FLOPS_PER_MS_SMALL_HEAD if head_dim <= SMALL_HEAD_DIM else DENSE_FLOPS_PER_MS_LARGE_HEAD
    return 4.0 * heads * head_dim * causal_pairs_total(q_len, k_len) / rate


def sparse_attention_ms(pattern: PatternName, q_len: int, k_len: int, heads: int, head_dim: int) -> float:
    """Predicted estimate + sparse attention time; the dense time for the dense pattern (such heads
    run dense either way, so they weigh the same on both sides of the comparison)."""
    dense = dense_attention_ms(q_len, k_len, heads, head_dim)
    cost = PATTERN_COSTS.get(PatternName(pattern))
    if cost is None:  # the dense pattern
        return dense
    efficiency = cost.efficiency_small_head if head_dim <= SMALL_HEAD_DIM else cost.efficiency_large_head
    estimate = (cost.estimate_fixed_ms + cost.estimate_ms_per_head_key * heads * k_len
                + cost.estimate_dense_fraction * dense)
    return estimate + cost.typical_density * dense / efficiency


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


def predicted_speedup(groups: Sequence[tuple[PatternName, int, int]], q_len: int, k_len: int, device_type: str) -> float:
    """Predicted dense time / sparse time of one prefill: ``groups`` lists (pattern, query heads,
    head_dim) of every head group, over all layers, that would run sparse. 0 on devices without a cost
    model (the CPU) and when no group would run sparse."""
    if device_type != "cuda" or not groups:
        return 0.0
    dense = sum(dense_attention_ms(q_len, k_len, heads, head_dim) for _, heads, head_dim in groups)
    sparse = sum(sparse_attention_ms(pattern, q_len, k_len, heads, head_dim) for pattern, heads, head_dim in groups)
    return dense / sparse
