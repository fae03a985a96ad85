"""Triton line selection: the cumulative-mass rule of ``select.select_line_kinds`` after one sort.

The torch version is about 25 small ops per estimate (gather, cumsum, compares, a second sort to put
the kept lines back in ascending order), and on the GPU each op costs host time whatever its size:
at 32K the vertical-slash estimate is bound by that host time, not by the device. Here one
``torch.sort`` orders every row (forced lines first, then by score, ties by line index), and one
program per row and kind does the rest:

1. the row's total mass (scores clamped at 0), and its scratch marks cleared;
2. along the sort order, the forced lines and the others whose preceding mass is still short of
   ``mass x total`` (a prefix of the others, since scores are non-negative), capped: the kept count;
3. the kept prefix marked at its line ids;
4. the marks compacted in line order (a running cumulative sum), so the list comes out ascending,
   and the slots past the count set to -1.

Steps 2-4 read what earlier steps of the same program wrote, across its threads: a barrier separates
them. Sums run in fp32 like the torch version's, in another order, so a line whose preceding mass
lies within rounding of the target may fall on the other side (tests allow exactly that line).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

SELECT_TILE = 2048  # lines per vectorised step of a row program
SELECT_WARPS = 8


@triton.jit
def _select_kernel(
    Scores, SortedKeys, Order, Marks, Count, Index, n_lines, rows_per_kind,
    mass_first, mass_second, cap_first, cap_second, keep_all_first, keep_all_second, TILE: tl.constexpr,
):
    """One program per row of two kinds of lines (rows ``[0, rows_per_kind)`` the first kind's): each
    kind's mass, cap (``n_lines`` when none) and keep-all flag arrive as scalars, so both kinds run in
    one launch and no per-kind table is copied to the device."""
    row = tl.program_id(0).to(tl.int64)
    first_kind = row < rows_per_kind
    mass = tl.where(first_kind, mass_first, mass_second)
    cap = tl.where(first_kind, cap_first, cap_second)
    keep_all = tl.where(first_kind, keep_all_first, keep_all_second) != 0
    base = row * n_lines
    lanes = tl.arange(0, TILE)

    total = tl.zeros([], dtype=tl.float32)
    for i0 in range(0, n_lines, TILE):
        i = i0 + lanes
        ok = i < n_lines
        total += tl.sum(tl.maximum(tl.load(Scores + base + i, mask=ok, other=0.0), 0.0), 0)
        tl.store(Marks + base + i, tl.zeros([TILE], dtype=tl.int8), mask=ok)

    target = mass * total
    mass_seen = tl.zeros([], dtype=tl.float32)
    n_forced = tl.zeros([], dtype=tl.int32)
    n_short = tl.zeros([], dtype=tl.int32)
    for i0 in range(0, n_lines, TILE):
        i = i0 + lanes
        ok = i < n_lines
        key = tl.load(SortedKeys + base + i, mask=ok, other=0.0)
        forced = ok & (key == float("inf"))
        # A forced line's key is +inf: its mass is read back from its score.
        line = tl.load(Order + base + i, mask=forced, other=0)
        forced_score = tl.maximum(tl.load(Scores + base + line, mask=forced, other=0.0), 0.0)
        score = tl.where(forced, forced_score, tl.where(ok, key, 0.0))
        mass_before = mass_seen + tl.cumsum(score, 0) - score
        n_forced += tl.sum(forced.to(tl.int32), 0)
        n_short += tl.sum((ok & ~forced & (mass_before < target)).to(tl.int32), 0)
        mass_seen += tl.sum(score, 0)
    count = n_forced + tl.minimum(tl.where(keep_all, n_lines - n_forced, n_short), cap)
    tl.store(Count + row, count)
    tl.debug_barrier()  # the marks were cleared by other threads of this program

    for i0 in range(0, count, TILE):
        i = i0 + lanes
        kept = i < count
        line = tl.load(Order + base + i, mask=kept, other=0)
        tl.store(Marks + base + line, tl.full([TILE], 1, dtype=tl.int8), mask=kept)
    tl.debug_barrier()  # the marks are read back by other threads than those that set them

    position = tl.zeros([], dtype=tl.int32)
    for i0 in range(0, n_lines, TILE):
        i = i0 + lanes
        ok = i < n_lines
        marked = tl.load(Marks + base + i, mask=ok, other=0).to(tl.int32)
        slot = position + tl.cumsum(marked, 0) - 1
        tl.store(Index + base + slot, i, mask=ok & (marked > 0))
        position += tl.sum(marked, 0)
    for i0 in range(0, n_lines, TILE):
        i = i0 + lanes
        tl.store(Index + base + i, tl.full([TILE], -1, dtype=tl.int32), mask=(i < n_lines) & (i >= count))


def select_line_kinds_triton(
    scores: torch.Tensor,
    forced: torch.Tensor,
    masses: list[float],
    max_counts: list[int | None],
    keep_all_mass: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """GPU ``select_line_kinds`` without trimming: ``scores [K, ..., N]``, ``forced`` broadcastable ->
    ``(count [K, ...] int32, index [K, ..., N] int32)``, kept line ids ascending, padding -1."""
    kinds, n = scores.shape[0], scores.shape[-1]
    clamped = scores.float().clamp_min(0.0)
    keys, order = torch.sort(torch.where(forced, float("inf"), clamped), dim=-1, descending=True, stable=True)
    rows_per_kind = clamped[0].numel() // max(n, 1)
    marks = torch.empty(clamped.shape, dtype=torch.int8, device=scores.device)
    count = torch.empty(clamped.shape[:-1], dtype=torch.int32, device=scores.device)
    index = torch.empty(clamped.shape, dtype=torch.int32, device=scores.device)
    for first in range(0, kinds if rows_per_kind else 0, 2):  # two kinds per launch
        pair = slice(first, min(first + 2, kinds))
        second = min(first + 1, kinds - 1)
        caps = [n if max_counts[i] is None else int(max_counts[i]) for i in (first, second)]
        _select_kernel[((pair.stop - pair.start) * rows_per_kind,)](
            clamped[pair], keys[pair], order[pair], marks[pair], count[pair], index[pair], n, rows_per_kind,
            float(masses[first]), float(masses[second]), *caps,
            int(masses[first] >= keep_all_mass), int(masses[second] >= keep_all_mass),
            TILE=SELECT_TILE, num_warps=SELECT_WARPS,
        )
    return count, index


__all__ = ["select_line_kinds_triton"]
