"""A fixed sparse budget: a ``SparseConfig`` whose index computes a chosen share of the causal pairs.

Random weights give near-uniform attention, on which the dynamic estimator keeps an unrepresentative
share of the keys, so the end-to-end benchmark (and ``bench layer``) size the default pattern's kernels
to a target density instead: ``fixed_budget_config``.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Callable

import torch

from ..config import BlockSparseConfig, SparseConfig, VerticalSlashConfig

# Share of the non-forced pair budget given to vertical columns; the rest goes to slashes (diagonal
# bands). An arbitrary fixed split, so that both halves of the vertical-slash kernel do work.
DEFAULT_VERTICAL_SHARE = 0.25
# Lines drawn per head when sizing a budget: a few heads average out where random lines fall.
CALIBRATION_HEADS = 4


def _causal_pairs(length: int) -> int:
    return length * (length + 1) // 2


def _vertical_slash_density(length: int, n_vertical: int, n_slash: int, cfg: VerticalSlashConfig,
                            device: torch.device, seed: int) -> float:
    """Density of a vertical-slash index with the forced sink columns / local diagonals plus
    ``n_vertical`` columns and ``n_slash`` diagonals at random positions (``CALIBRATION_HEADS`` heads)."""
    from ..kernels import build_vertical_slash_index
    from ..kernels.common import compact

    g = torch.Generator(device="cpu").manual_seed(seed)
    heads = CALIBRATION_HEADS
    lines = torch.arange(length)

    def pick(forced: int, extra: int) -> torch.Tensor:
        keep = (lines < forced).expand(heads, length).clone()
        free = length - min(forced, length)
        extra = min(extra, free)
        for h in range(heads):
            chosen = torch.randperm(free, generator=g)[:extra] + min(forced, length)
            keep[h, chosen] = True
        return keep[None].to(device)

    v_count, v_index = compact(pick(cfg.sink_tokens, n_vertical))
    s_count, s_index = compact(pick(cfg.local_tokens, n_slash))
    index = build_vertical_slash_index(v_index, v_count, s_index, s_count, q_len=length, k_len=length,
                                       block_size_q=cfg.block_size)
    return float(index.computed_pairs().sum()) / (_causal_pairs(length) * heads)


def _block_sparse_density(length: int, top_k: int, cfg: BlockSparseConfig, device: torch.device) -> float:
    """Density of a block-sparse index keeping sink + diagonal + ``top_k`` other blocks per row (exact
    whatever the scores: every non-forced causal block is a full block)."""
    from ..kernels import select_blocks

    n = -(-length // cfg.block_size)
    scores = torch.rand(1, 1, n, n, generator=torch.Generator(device="cpu").manual_seed(0)).to(device)
    index = select_blocks(scores, q_len=length, k_len=length, block_size_q=cfg.block_size,
                          block_size_k=cfg.block_size, mass=cfg.mass, top_k=top_k, sink_blocks=cfg.sink_blocks,
                          local_blocks=cfg.local_blocks)
    return float(index.computed_pairs().sum()) / _causal_pairs(length)


def _bisect(fn: Callable[[int], float], target: float, lo: int, hi: int) -> tuple[int, float]:
    """Smallest integer x in [lo, hi] with fn(x) >= target (fn non-decreasing), or hi; with its value.
    Returns the closer of that x and x - 1."""
    values: dict[int, float] = {}

    def f(x: int) -> float:
        if x not in values:
            values[x] = fn(x)
        return values[x]

    if f(lo) >= target:
        return lo, f(lo)
    a, b = lo, hi
    while b - a > 1:
        mid = (a + b) // 2
        if f(mid) >= target:
            b = mid
        else:
            a = mid
    best = b if abs(f(b) - target) <= abs(f(a) - target) else a
    return best, f(best)


def fixed_budget_config(pattern: str, length: int, density: float, *, min_sparse_len: int,
                        device: torch.device, vertical_share: float = DEFAULT_VERTICAL_SHARE,
                        base: SparseConfig | None = None, seed: int = 0) -> tuple[SparseConfig, float, str]:
    """A ``SparseConfig`` whose index computes about ``density`` of the causal pairs at ``length``.

    ``vertical_slash`` (the default pattern's kernels): mass targets 1.0, so ``keep_by_cumulative_mass``
    keeps the forced lines plus exactly ``max_vertical`` columns / ``max_slash`` diagonals (a fixed
    top-k). Columns get ``vertical_share`` of the non-forced budget (a random column covers 1/L of the
    pairs on average); the slash count is then bisected on indices of random lines, which accounts for
    bands merging. ``block_sparse``: ``top_k`` other blocks per query-block row, bisected exactly.

    Returns ``(config, predicted density, note)``; the note says when the target is below the
    pattern's floor (forced sink and local lines alone exceed it) and the floor was used.
    """
    base = base if base is not None else SparseConfig()
    base = replace(base, min_sparse_len=min_sparse_len)
    note = ""
    if pattern in ("vertical_slash", "auto"):
        vs = base.vertical_slash

        def with_lines(n_vertical: int, n_slash: int) -> float:
            return _vertical_slash_density(length, n_vertical, n_slash, vs, device, seed)

        floor = with_lines(1, 1)
        n_vertical = max(1, round(vertical_share * max(density - floor, 0.0) * length))
        n_vertical = min(n_vertical, max(length - vs.sink_tokens, 1))
        n_slash, predicted = _bisect(lambda s: with_lines(n_vertical, s), density, 1,
                                     max(length - vs.local_tokens, 1))
        if floor > density:
            note = f"target {density:g} below this pattern's floor {floor:.3f} at {length} tokens"
        cfg = replace(base, pattern="vertical_slash", vertical_slash=replace(
            vs, vertical_mass=1.0, slash_mass=1.0, max_vertical=n_vertical, max_slash=n_slash))
        return cfg, predicted, note
    if pattern == "block_sparse":
        bs = base.block_sparse
        n_blocks = -(-length // bs.block_size)
        top_k, predicted = _bisect(lambda t: _block_sparse_density(length, t, bs, device), density, 0, n_blocks)
        if top_k == 0 and predicted > density:
            note = f"target {density:g} below this pattern's floor {predicted:.3f} at {length} tokens"
        return replace(base, pattern="block_sparse", block_sparse=replace(bs, top_k=top_k)), predicted, note
    raise ValueError(f"fixed budgets exist for 'vertical_slash' and 'block_sparse', not {pattern!r}")
