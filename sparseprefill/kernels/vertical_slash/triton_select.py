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
def _row_rule(rows_per_kind, mass_first, mass_second, cap_first, cap_second, keep_all_first, keep_all_second):
    """This program's row and its kind's rule: ``(row, first kind?, mass, cap, keep-all)``. Two kinds of
    lines share a launch (rows ``[0, rows_per_kind)`` the first kind's), their rules passed as scalars."""
    row = tl.program_id(0).to(tl.int64)
    first_kind = row < rows_per_kind
    mass = tl.where(first_kind, mass_first, mass_second)
    cap = tl.where(first_kind, cap_first, cap_second)
    keep_all = tl.where(first_kind, keep_all_first, keep_all_second) != 0
    return row, first_kind, mass, cap, keep_all


@triton.jit
def _select_kernel(
    Scores, SortedKeys, Order, Marks, Count, Index, n_lines, rows_per_kind,
    mass_first, mass_second, cap_first, cap_second, keep_all_first, keep_all_second, TILE: tl.constexpr,
):
    """One program per row of two kinds of lines (rows ``[0, rows_per_kind)`` the first kind's): each
    kind's mass, cap (``n_lines`` when none) and keep-all flag arrive as scalars, so both kinds run in
    one launch and no per-kind table is copied to the device."""
    row, first_kind, mass, cap, keep_all = _row_rule(rows_per_kind, mass_first, mass_second, cap_first, cap_second,
                                                     keep_all_first, keep_all_second)
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


# fp32 bit patterns of the values a clamped score can take, [0, +inf): non-negative floats order as their
# bit patterns (as int32), so a threshold can be searched over integers.
_FP32_INF_BITS = tl.constexpr(0x7F800000)
# Thresholds tried per pass of the sort-free search: 64 probes narrow the 31-bit range 64-fold, so a
# search takes ceil(31 / 6) = 6 passes over the row. A pass compares a [SEARCH_TILE, SEARCH_PROBES]
# tile (32K lanes, like SELECT_TILE x 16): wider probes cut passes but not work per pass.
SEARCH_PROBES = 64
SEARCH_TILE = 512

# Line selection by threshold search instead of a sort (``select_line_kinds_triton(method=...)``): no
# ``torch.sort`` of every row, so the estimate's transient memory is its scores and the output list
# (the sort's keys, int64 order, scratch and the selection's copies were ~0.9x a Llama-3.1-8B layer's
# KV cache at 128K, ``experiments/index_memory.py``), and four fewer torch ops per estimate.
# Off: timed on real Qwen q/k (H100, stop 39) it is 2.2-3.6x slower than the sort (32K: 0.52 against 0.23 ms
# per layer; 128K: 2.3 against 0.7), and one case of ``test_triton_select.py`` (exact sums) crashes Triton's
# compiler on the H100 (an assertion in its TritonGPUCoalesce pass).
LINE_SELECT_BY_SEARCH = False


@triton.jit
def _line_tile(Scores, Forced, base, forced_base, i, n_lines):
    """Scores of lines ``i`` clamped at 0, with forced and out-of-row lines at -1 (below every
    threshold the search tries, never equal to one), and the forced flags."""
    ok = i < n_lines
    forced = ok & (tl.load(Forced + forced_base + i, mask=ok, other=0) != 0)
    score = tl.maximum(tl.load(Scores + base + i, mask=ok, other=0.0), 0.0)
    return tl.where(forced | ~ok, -1.0, score), score, forced


# A threshold below every real line's clamped score (>= 0) and above the -1 of forced and out-of-row lanes:
# ``_line_sums`` at it counts and sums every non-forced line.
_BELOW_EVERY_SCORE = tl.constexpr(-0.5)


@triton.jit
def _line_sums(Scores, Forced, base, forced_base, n_lines, threshold, TILE: tl.constexpr):
    """One pass over a row: the non-forced lines strictly above ``threshold`` (count and mass), those
    equal to it (count), and the forced lines (count and mass)."""
    lanes = tl.arange(0, TILE)
    count = tl.zeros([], dtype=tl.int32)
    equal = tl.zeros([], dtype=tl.int32)
    mass = tl.zeros([], dtype=tl.float32)
    forced_count = tl.zeros([], dtype=tl.int32)
    forced_mass = tl.zeros([], dtype=tl.float32)
    for i0 in range(0, n_lines, TILE):
        s, score, forced = _line_tile(Scores, Forced, base, forced_base, i0 + lanes, n_lines)
        above = s > threshold
        count += tl.sum(above.to(tl.int32), 0)
        equal += tl.sum((s == threshold).to(tl.int32), 0)
        mass += tl.sum(tl.where(above, s, 0.0), 0)
        forced_count += tl.sum(forced.to(tl.int32), 0)
        forced_mass += tl.sum(tl.where(forced, score, 0.0), 0)
    return count, mass, equal, forced_count, forced_mass


@triton.jit
def _search_threshold(Scores, Forced, base, forced_base, n_lines, lo, hi, forced_mass, target, kept_lines,
                      BY_MASS: tl.constexpr, TILE: tl.constexpr, PROBES: tl.constexpr):
    """The smallest fp32 bit pattern ``u`` in ``[lo, hi]`` where fewer non-forced lines lie strictly above
    ``float(u)`` than the rule allows (``BY_MASS``: ``forced_mass`` + their mass < ``target``; else their
    count < ``kept_lines``). The predicate is monotone in ``u`` and true at ``hi``; it only changes at a
    line's score, so the answer is one (or ``lo`` where it is true everywhere). ``lo == hi``: no search."""
    lanes = tl.arange(0, TILE)
    probe_id = tl.arange(0, PROBES)
    # Loop-carried bounds must be int32 tensors (a caller may pass the constexpr +inf pattern).
    lo = lo + tl.zeros([], dtype=tl.int32)
    hi = hi + tl.zeros([], dtype=tl.int32)
    while lo < hi:
        step = (hi - lo + PROBES) // PROBES  # ceil((hi - lo + 1) / PROBES): the probes span [lo, hi]
        probes = tl.minimum(lo + probe_id * step, hi)
        threshold = probes.to(tl.float32, bitcast=True)
        above = tl.zeros([PROBES], dtype=tl.float32)
        for i0 in range(0, n_lines, TILE):
            s, score, forced = _line_tile(Scores, Forced, base, forced_base, i0 + lanes, n_lines)
            over = s[:, None] > threshold[None, :]
            if BY_MASS:
                above += tl.sum(tl.where(over, s[:, None], 0.0), 0)
            else:
                above += tl.sum(over.to(tl.float32), 0)
        if BY_MASS:
            holds = forced_mass + above < target
        else:
            holds = above < kept_lines
        # Monotone: the first probe that holds is the number that fail.
        failing = tl.sum((~holds).to(tl.int32), 0)
        new_hi = tl.minimum(lo + failing * step, hi)
        lo = tl.where(failing > 0, lo + (failing - 1) * step + 1, lo)
        hi = new_hi
    return lo


@triton.jit
def _search_select_kernel(
    Scores, Forced, Count, Index, n_lines, rows_per_kind, stride_forced_kind, stride_forced_row,
    mass_first, mass_second, cap_first, cap_second, keep_all_first, keep_all_second,
    TILE: tl.constexpr, SEARCH_TILE: tl.constexpr, PROBES: tl.constexpr,
):
    """``_select_kernel``'s rule without a sort. In the rule's order (forced lines, then score
    descending, ties by line index) the kept non-forced lines are a prefix of ``K`` lines: those above a
    threshold value ``v`` and the first ``t`` (by line index) of those equal to it. ``v`` is found by
    searching fp32 bit patterns (``_search_threshold``), first by mass, then, where the cap or keep-all
    sets ``K``, by count; one last pass writes the kept lines in ascending order."""
    row, first_kind, mass, cap, keep_all = _row_rule(rows_per_kind, mass_first, mass_second, cap_first, cap_second,
                                                     keep_all_first, keep_all_second)
    base = row * n_lines
    kind = tl.where(first_kind, 0, 1).to(tl.int64)
    forced_base = kind * stride_forced_kind + (row - kind * rows_per_kind) * stride_forced_row
    lanes = tl.arange(0, TILE)

    # Every non-forced line lies above _BELOW_EVERY_SCORE (none equal to it).
    others, others_mass, none_equal, n_forced, forced_mass = _line_sums(Scores, Forced, base, forced_base, n_lines,
                                                                        _BELOW_EVERY_SCORE, SEARCH_TILE)
    target = mass * (others_mass + forced_mass)

    # By mass: lines strictly above v* hold less than target - forced_mass; ties at v* are kept while
    # the mass before them stays short of the target. No search where keep-all or the forced lines
    # already reach it (v* = +inf: no other line kept).
    by_mass = ~keep_all & (forced_mass < target)
    v_bits = _search_threshold(Scores, Forced, base, forced_base, n_lines, tl.where(by_mass, 0, _FP32_INF_BITS),
                               _FP32_INF_BITS, forced_mass, target, 0, True, SEARCH_TILE, PROBES)
    v = v_bits.to(tl.float32, bitcast=True)
    n_above, mass_above, n_equal, forced_again, forced_mass_again = _line_sums(Scores, Forced, base, forced_base,
                                                                               n_lines, v, SEARCH_TILE)
    before = forced_mass + mass_above
    # Ties: the m-th (from 0) has mass before it ``before + m * v``; kept while that is < target.
    ties = tl.where(v > 0, tl.ceil((target - before) / tl.where(v > 0, v, 1.0)), n_equal.to(tl.float32))
    ties = tl.minimum(tl.maximum(ties, 0.0), n_equal.to(tl.float32)).to(tl.int32)
    # The quotient's rounding can put ceil one off: settle it on the rule's own comparison (v is +inf,
    # with no line equal to it, where no search ran).
    finite_v = tl.where(v_bits < _FP32_INF_BITS, v, 0.0)
    ties = tl.where((ties > 0) & (before + (ties - 1).to(tl.float32) * finite_v >= target), ties - 1, ties)
    ties = tl.where((ties < n_equal) & (before + ties.to(tl.float32) * finite_v < target), ties + 1, ties)
    n_short = n_above + ties

    kept = tl.minimum(tl.where(keep_all, others, n_short), cap)
    # By count, where the cap or keep-all moved the kept count: the kept-th largest value.
    by_count = (kept > 0) & (keep_all | (kept != n_short))
    v_bits = _search_threshold(Scores, Forced, base, forced_base, n_lines, tl.where(by_count, 0, v_bits),
                               tl.where(by_count, _FP32_INF_BITS, v_bits), forced_mass, target, kept, False,
                               SEARCH_TILE, PROBES)
    v = v_bits.to(tl.float32, bitcast=True)
    n_above, mass_above, n_equal, forced_again, forced_mass_again = _line_sums(Scores, Forced, base, forced_base,
                                                                               n_lines, v, SEARCH_TILE)
    ties = tl.where(by_count, kept - n_above, tl.where(kept > 0, ties, 0))

    position = tl.zeros([], dtype=tl.int32)
    equal_seen = tl.zeros([], dtype=tl.int32)
    for i0 in range(0, n_lines, TILE):
        i = i0 + lanes
        s, score, forced = _line_tile(Scores, Forced, base, forced_base, i, n_lines)
        equal = (s == v).to(tl.int32)
        tie_rank = equal_seen + tl.cumsum(equal, 0) - equal
        keep = (forced | (s > v) | ((equal > 0) & (tie_rank < ties))).to(tl.int32)
        slot = position + tl.cumsum(keep, 0) - 1
        tl.store(Index + base + slot, i, mask=keep > 0)
        position += tl.sum(keep, 0)
        equal_seen += tl.sum(equal, 0)
    tl.store(Count + row, position)
    for i0 in range(0, n_lines, TILE):
        i = i0 + lanes
        tl.store(Index + base + i, tl.full([TILE], -1, dtype=tl.int32), mask=(i < n_lines) & (i >= position))


def _kind_row_forced(forced: torch.Tensor, scores: torch.Tensor) -> tuple[torch.Tensor, int, int]:
    """``forced`` (broadcastable to ``scores [K, ..., N]``) as int8 rows the search kernel reads:
    ``(tensor, kind stride, row stride)``, without materialising ``[K, rows, N]`` where the mask is the
    same for every row of a kind (the estimate's sink and local prefixes)."""
    kinds, n = scores.shape[0], scores.shape[-1]
    expanded = forced.expand_as(scores)
    if all(expanded.stride(d) == 0 for d in range(1, scores.dim() - 1)):
        per_kind = expanded[(slice(None),) + (0,) * (scores.dim() - 2)].to(torch.int8).contiguous()
        return per_kind, n, 0
    rows = expanded.reshape(kinds, -1, n).to(torch.int8).contiguous()
    return rows, rows.stride(0), n


def select_line_kinds_triton(
    scores: torch.Tensor,
    forced: torch.Tensor,
    masses: list[float],
    max_counts: list[int | None],
    keep_all_mass: float,
    *,
    method: str | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """GPU ``select_line_kinds`` without trimming: ``scores [K, ..., N]``, ``forced`` broadcastable ->
    ``(count [K, ...] int32, index [K, ..., N] int32)``, kept line ids ascending, padding -1.
    ``method``: ``"sort"`` (one ``torch.sort`` of every row, then ``_select_kernel``) or ``"search"``
    (``_search_select_kernel``, no sort); None: ``LINE_SELECT_BY_SEARCH``."""
    if method is None:
        method = "search" if LINE_SELECT_BY_SEARCH else "sort"
    if method not in ("sort", "search"):
        raise ValueError(f"method must be 'sort' or 'search', got {method!r}")
    if method == "search":
        return _select_by_search(scores, forced, masses, max_counts, keep_all_mass)
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


def _select_by_search(scores, forced, masses, max_counts, keep_all_mass):
    kinds, n = scores.shape[0], scores.shape[-1]
    rows = scores.reshape(kinds, -1, n).float().contiguous() if n else scores.float()
    rows_per_kind = rows[0].numel() // max(n, 1)
    count = torch.zeros(scores.shape[:-1], dtype=torch.int32, device=scores.device)
    index = torch.empty(scores.shape, dtype=torch.int32, device=scores.device)
    if not rows_per_kind:  # no lines (every count 0) or no rows
        return count, index
    forced_rows, stride_kind, stride_row = _kind_row_forced(forced, scores)
    for first in range(0, kinds, 2):  # two kinds per launch
        pair = slice(first, min(first + 2, kinds))
        second = min(first + 1, kinds - 1)
        caps = [n if max_counts[i] is None else int(max_counts[i]) for i in (first, second)]
        _search_select_kernel[((pair.stop - pair.start) * rows_per_kind,)](
            rows[pair], forced_rows[pair], count[pair], index[pair], n, rows_per_kind, stride_kind, stride_row,
            float(masses[first]), float(masses[second]), *caps,
            int(masses[first] >= keep_all_mass), int(masses[second] >= keep_all_mass),
            TILE=SELECT_TILE, SEARCH_TILE=SEARCH_TILE, PROBES=SEARCH_PROBES, num_warps=SELECT_WARPS,
        )
    return count, index


__all__ = ["LINE_SELECT_BY_SEARCH", "select_line_kinds_triton"]
