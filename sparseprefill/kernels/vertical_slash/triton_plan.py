"""The per-head plan of the vertical-slash index builders (Triton): from each head's ascending diagonals,
the prefix count of kept diagonals below every key (``column_cover``), the bounds that size the index's
tables (runs and range pieces at the full and the last block's width, the vertical count: one launch,
one host read), and the slot of each run's last diagonal at a block width. ``triton_index.py`` and
``triton_head_ranges.py`` build on them.
"""

from __future__ import annotations

import triton
import triton.language as tl

PLAN_TILE = 1024  # diagonals / thresholds per step of the per-head plan (prefix counts, run bounds)


@triton.jit
def slash_plan_kernel(
    SlashOffset, SlashCount, VerticalCount, Bounds, n_slash_slots, full_width, last_width, piece_keys,
    TILE: tl.constexpr,
):
    """Per batch x head, from its ascending diagonals: ``Bounds[bh] = (runs at the full block width, runs at the last block's
    width, vertical count, range pieces at the full width, at the last width)``: a block's visible
    diagonals are a prefix of the list and clipping at key 0 only merges runs, so the whole list's run
    count at a block's width bounds every block's. Likewise a block's range from run ``[d_a .. d_b]``
    spans at most ``d_b - d_a + width`` keys (one merged at key 0 no more than the run holding its
    first diagonal), so ``sum over runs of ceil((d_b - d_a + width) / piece_keys)``, bounded above by
    ``(sum d_b - sum d_a + runs * (width + piece_keys - 1)) // piece_keys``, bounds its pieces."""
    bh = tl.program_id(0).to(tl.int64)
    lanes = tl.arange(0, TILE)
    n = tl.load(SlashCount + bh)
    slash_base = SlashOffset + bh * n_slash_slots
    runs_full = tl.zeros([], dtype=tl.int32)
    runs_last = tl.zeros([], dtype=tl.int32)
    span_full = tl.zeros([], dtype=tl.int64)  # sum over runs of d_b - d_a
    span_last = tl.zeros([], dtype=tl.int64)
    for j0 in range(0, n, TILE):
        j = j0 + lanes
        ok = j < n
        has_next = (j + 1) < n
        d = tl.load(slash_base + j, mask=ok, other=0)
        gap = tl.load(slash_base + j + 1, mask=has_next, other=0) - d
        gap_before = d - tl.load(slash_base + j - 1, mask=ok & (j > 0), other=0)
        ends_full = ok & (~has_next | (gap > full_width))
        ends_last = ok & (~has_next | (gap > last_width))
        starts_full = ok & ((j == 0) | (gap_before > full_width))
        starts_last = ok & ((j == 0) | (gap_before > last_width))
        runs_full += tl.sum(ends_full.to(tl.int32), 0)
        runs_last += tl.sum(ends_last.to(tl.int32), 0)
        d_wide = d.to(tl.int64)
        span_full += tl.sum(tl.where(ends_full, d_wide, 0) - tl.where(starts_full, d_wide, 0), 0)
        span_last += tl.sum(tl.where(ends_last, d_wide, 0) - tl.where(starts_last, d_wide, 0), 0)
    tl.store(Bounds + bh * 5, runs_full)
    tl.store(Bounds + bh * 5 + 1, runs_last)
    tl.store(Bounds + bh * 5 + 2, tl.load(VerticalCount + bh))
    pieces_full = (span_full + runs_full.to(tl.int64) * (full_width + piece_keys - 1)) // piece_keys
    pieces_last = (span_last + runs_last.to(tl.int64) * (last_width + piece_keys - 1)) // piece_keys
    tl.store(Bounds + bh * 5 + 3, pieces_full.to(tl.int32))
    tl.store(Bounds + bh * 5 + 4, pieces_last.to(tl.int32))


@triton.jit
def slash_prefix_kernel(SlashOffset, SlashCount, SlashPrefix, k_len, n_slash_slots, TILE: tl.constexpr,
                         SEARCH_STEPS: tl.constexpr):
    """Per batch x head and tile of thresholds ``t``: ``prefix[t]`` = diagonals below ``t``, for ``t`` in
    ``[0, k_len + 1]`` (a binary search per ``t``; repeats counted, the kernel only asks "any in
    [lo, hi]?"). A program per tile: one per head walked 128 tiles of 18 dependent loads at 128K."""
    bh = tl.program_id(0).to(tl.int64)
    t = tl.program_id(1) * TILE + tl.arange(0, TILE)
    n = tl.load(SlashCount + bh)
    slash_base = SlashOffset + bh * n_slash_slots
    lo = tl.zeros([TILE], dtype=tl.int32)
    hi = tl.zeros([TILE], dtype=tl.int32) + n
    for _ in tl.static_range(SEARCH_STEPS):  # first slot whose diagonal is >= t
        active = lo < hi
        mid = (lo + hi) // 2
        below = active & (tl.load(slash_base + mid, mask=active, other=0) < t)
        lo = tl.where(below, mid + 1, lo)
        hi = tl.where(active & ~below, mid, hi)
    tl.store(SlashPrefix + bh * (k_len + 2) + t, lo, mask=t < k_len + 2)


@triton.jit
def head_runs_kernel(SlashOffset, SlashCount, RunEnd, n_slash_slots, stride_run_end_bh, width, TILE: tl.constexpr):
    """Per batch x head: the slot of each run's last diagonal at block width ``width`` (runs of
    neighbours whose bands overlap or touch, ``d_next - d <= width``; no clipping), ascending, from
    ``RunEnd + bh * stride_run_end_bh``."""
    bh = tl.program_id(0).to(tl.int64)
    n = tl.load(SlashCount + bh)
    slash_base = SlashOffset + bh * n_slash_slots
    written = 0
    for j0 in range(0, n, TILE):
        j = j0 + tl.arange(0, TILE)
        ok = j < n
        has_next = (j + 1) < n
        d = tl.load(slash_base + j, mask=ok, other=0)
        gap = tl.load(slash_base + j + 1, mask=has_next, other=0) - d
        ends = (ok & (~has_next | (gap > width))).to(tl.int32)
        slot = written + tl.cumsum(ends, 0) - 1
        tl.store(RunEnd + bh * stride_run_end_bh + slot, j, mask=ends > 0)
        written += tl.sum(ends, 0)


__all__ = ["PLAN_TILE", "head_runs_kernel", "slash_plan_kernel", "slash_prefix_kernel"]
