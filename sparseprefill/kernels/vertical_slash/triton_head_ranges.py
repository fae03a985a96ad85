"""Triton kernels of the per-head range layout (``head_ranges.py`` has the layout and its torch twin).

``head_range_tables``: one program per (batch x head, table row) turns the head's runs of diagonals at
the row's block width (``triton_plan.head_runs_kernel``: the slot of each run's last diagonal) into
relative ranges, right-aligned and ascending in keys (farthest run first), and, with range pieces, the
same ranges cut into pieces. ``ranges_from_head_table`` is what a block of the index kernel does with
them: find the first run it sees (a binary search: the table ascends in ends), count the pieces it will
read and the causal pairs they hold, and the column limit of per-head columns. A block walks only the
runs it sees and writes nothing per range, so the per-block work is a read of the head's few runs.
"""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def keys_below_pairs(c, p0, p1):
    """``F(c) = sum_{r=p0..p1} min(c, r + 1)`` in int64, for ``c >= 0``: rows up to ``m = c - 1``
    see ``r + 1`` keys below ``c``, later rows all ``c`` of them."""
    c = c.to(tl.int64)
    m = tl.minimum(tl.maximum(c - 1, p0 - 1), p1)
    return (p0 + 1 + m + 1) * (m - p0 + 1) // 2 + c * (p1 - m)


@triton.jit
def head_range_table_kernel(
    SlashOffset, HeadRunEnd, RunCount, RunStart, RunEnd, PieceStart, PieceEnd,
    n_slash_slots, max_runs, max_pieces, stride_run_count_bh, stride_run_count_row, full_width, last_width,
    PIECE_KEYS: tl.constexpr, TILE: tl.constexpr,
):
    """Program (bh, row): runs ``k`` (nearest first) of ``HeadRunEnd[bh, row]`` -> ``RunStart / RunEnd
    [bh, row, max_runs - 1 - k] = (-hi, width - lo)``; with ``PIECE_KEYS`` the pieces of run ``k`` fill
    the slots just left of the nearer runs' pieces in ``PieceStart / PieceEnd [bh, row, :max_pieces]``."""
    bh = tl.program_id(0).to(tl.int64)
    row = tl.program_id(1)
    width = tl.where(row == 0, full_width, last_width)
    table = bh * 2 + row
    n_runs = tl.load(RunCount + bh * stride_run_count_bh + row * stride_run_count_row)
    slash_base = SlashOffset + bh * n_slash_slots
    run_end_base = HeadRunEnd + table * max_runs
    written = 0  # pieces of the runs nearer than this tile's
    for k0 in range(0, n_runs, TILE):
        k = k0 + tl.arange(0, TILE)
        ok = k < n_runs
        first_slot = tl.load(run_end_base + k - 1, mask=ok & (k > 0), other=-1) + 1
        lo = tl.load(slash_base + first_slot, mask=ok, other=0)
        hi = tl.load(slash_base + tl.load(run_end_base + k, mask=ok, other=0), mask=ok, other=0)
        rel_start = -hi
        rel_end = width - lo
        tl.store(RunStart + table * max_runs + max_runs - 1 - k, rel_start, mask=ok)
        tl.store(RunEnd + table * max_runs + max_runs - 1 - k, rel_end, mask=ok)
        if PIECE_KEYS > 0:
            pieces = tl.where(ok, (rel_end - rel_start + PIECE_KEYS - 1) // PIECE_KEYS, 0)
            first = max_pieces - (written + tl.cumsum(pieces, 0))  # this run's first piece slot
            for i in range(0, tl.max(pieces, 0)):
                # The plan's bound keeps first >= 0; the mask keeps a broken bound inside the row.
                has = (i < pieces) & (first + i >= 0)
                piece_start = rel_start + i * PIECE_KEYS
                slot = table * max_pieces + first + i
                tl.store(PieceStart + slot, piece_start, mask=has)
                tl.store(PieceEnd + slot, tl.minimum(piece_start + PIECE_KEYS, rel_end), mask=has)
            written += tl.sum(pieces, 0)


@triton.jit
def ranges_from_head_table(RunStartRow, RunEndRow, n_runs, max_runs, p0, p1, p0_wide, p1_wide,
                           PIECE_KEYS: tl.constexpr, TILE: tl.constexpr, RUN_SEARCH_STEPS: tl.constexpr):
    """For the block of rows ``[p0, p1]`` reading a table row (``RunStartRow / RunEndRow``: its ``n_runs``
    runs right-aligned in ``max_runs`` slots, relative to ``p0``): ``(pieces it reads, causal pairs they
    hold (int64), column limit)``. The pieces are the last ones of the piece row, as many as its visible
    runs cut into, less those wholly below key 0 in a run that reaches below it."""
    lo = max_runs - n_runs
    hi = max_runs + 0 * n_runs  # a tensor, as the search updates it
    for _ in tl.static_range(RUN_SEARCH_STEPS):  # first run ending above key 0: runs ascend in ends
        active = lo < hi
        mid = (lo + hi) // 2
        seen = active & (tl.load(RunEndRow + mid, mask=active, other=0) + p0 > 0)
        hi = tl.where(seen, mid, hi)
        lo = tl.where(active & ~seen, mid + 1, lo)
    n_pieces = 0
    pairs = tl.zeros([], dtype=tl.int64)
    for s0 in range(lo, max_runs, TILE):
        s = s0 + tl.arange(0, TILE)
        ok = s < max_runs
        start = tl.load(RunStartRow + s, mask=ok, other=0) + p0
        end = tl.load(RunEndRow + s, mask=ok, other=0) + p0
        if PIECE_KEYS > 0:
            below_zero = tl.maximum(-start, 0)
            pieces = (end - start + PIECE_KEYS - 1) // PIECE_KEYS - below_zero // PIECE_KEYS
        else:
            pieces = tl.full([TILE], 1, dtype=tl.int32)
        clipped = tl.maximum(start, 0)
        n_pieces += tl.sum(tl.where(ok, pieces, 0), 0)
        pairs += tl.sum(tl.where(ok, keys_below_pairs(end, p0_wide, p1_wide)
                                 - keys_below_pairs(clipped, p0_wide, p1_wide), 0), 0)
    # The nearest run holds diagonal 0 iff it ends at the block's last position: columns from its start
    # up lie inside its band.
    has_runs = n_runs > 0
    nearest_start = tl.load(RunStartRow + max_runs - 1, mask=has_runs, other=0)
    nearest_end = tl.load(RunEndRow + max_runs - 1, mask=has_runs, other=0)
    reaches_last_row = has_runs & (nearest_end + p0 == p1 + 1)
    limit = tl.where(reaches_last_row, tl.maximum(nearest_start + p0, 0), p1 + 1)
    return n_pieces, pairs, limit


def run_search_steps(max_runs: int) -> int:
    """Binary-search steps that find a slot among ``max_runs``."""
    return max(1, int(max_runs).bit_length())


__all__ = ["head_range_table_kernel", "keys_below_pairs", "ranges_from_head_table", "run_search_steps"]
