"""Triton index conversion for vertical-slash attention; same output as ``naive.py``.

One program per (query block, batch x head), vectorised over tiles of lines (no scalar loop over
lines: at 128K a head keeps thousands of them).

Ranges. Query block ``r`` spans positions ``[p0, p1]`` (``w = p1 - p0 + 1`` rows). Diagonal ``d``
covers keys ``[max(p0 - d, 0), p1 - d]``; it is visible iff ``d <= p1``. With offsets sorted
ascending, the bands of two neighbours ``d_j < d_{j+1}`` overlap or touch iff
``d_{j+1} - d_j <= w``, or if band ``j`` is already clipped at key 0 (``d_j >= p0``: every later band
is clipped too and they all start at 0). So the merged ranges are runs of neighbours, found by
marking run boundaries and counting them with a cumulative sum; a run ``[d_a .. d_b]`` becomes the
range ``[max(p0 - d_b, 0), p1 - d_a + 1)``. Ranges come out in descending start order and are
written back to front (one counting pass first sizes the row).

Columns. Column ``c <= p1`` lies inside a range iff some kept diagonal is in
``[max(p0 - c, 0), p1 - c]``. A per-head prefix count of kept diagonals answers that with two
loads per column. Surviving columns are compacted in order with a cumulative sum.

Computed pairs. The kernel also counts the causal (query, key) pairs its block lists
(``VerticalSlashIndex.block_pairs``), so density statistics never re-read the ``[B, H, Rq, V]``
column table (gigabytes of int64 temporaries at 128K). A range ``[s, e)`` holds ``F(e) - F(s)`` pairs
with ``F(c) = sum_{r=p0..p1} min(c, r + 1)`` (keys below ``c`` visible to row ``r``), so each run's end
lane adds ``F(end)`` and its start lane subtracts ``F(start)``; a column ``c`` holds ``p1 - max(p0, c) + 1``.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ..indices import RANGE_TABLE_ROWS, VerticalSlashIndex
from .head_columns import ColumnLayout, resolve_column_layout, to_head_columns, to_head_columns_below
from .head_ranges import resolve_ranges_per_head
from .triton_head_ranges import head_range_table_kernel, keys_below_pairs, ranges_from_head_table, run_search_steps
from .triton_plan import PLAN_TILE, head_runs_kernel, slash_plan_kernel, slash_prefix_kernel

LINE_TILE = 128  # lines per vectorised step; a tile of int32 offsets and its neighbours fits registers
SPLIT_TILE = 64  # ranges per step of the range split (a block holds a few hundred at 128K)
_UNUSED_SLOT = torch.iinfo(torch.int32).max  # sorts padding slots after every real offset

# Full-width blocks build their ranges from their head's runs (``_ranges_from_head_runs``: a few runs
# per block) instead of two passes over every visible diagonal (tens of thousands per block at 128K on
# real q/k, the same output). Timed on real Qwen2.5-Coder q/k (H100, stop 39, 10 layers at 32K and 128K,
# ``experiments/conversion_variants.py``): the same index everywhere, the conversion 1.6-3.7x faster (128K:
# 0.65-3.14 instead of 1.71-11.59 ms per layer); the 1,000-case GPU builder fuzz draws both and passed.
INDEX_FROM_HEAD_RUNS = True


@triton.jit
def _run_ends(slash_base, j, n_visible, width, p0):
    """Offsets ``d_j`` of the tile ``j`` and whether each ends a run (its band and the next one's
    neither overlap nor touch, and it is not clipped at key 0)."""
    ok = j < n_visible
    d = tl.load(slash_base + j, mask=ok, other=0)
    d_next = tl.load(slash_base + j + 1, mask=(j + 1) < n_visible, other=0)
    return d, ok & (((j + 1) >= n_visible) | ((d_next - d > width) & (d < p0)))


@triton.jit
def _ranges_from_visible_diagonals(slash_base, n_visible, width, p0, p1, p0_wide, p1_wide, RangeCountRow,
                                   RangeStartRow, RangeEndRow, TILE: tl.constexpr):
    """A block's merged ranges from its visible diagonals, two passes over them (any block width):
    count the runs, so ranges can be written in ascending start order, then write them. Returns the
    causal pairs they hold."""
    n_runs = 0
    for j0 in range(0, n_visible, TILE):
        _, ends_run = _run_ends(slash_base, j0 + tl.arange(0, TILE), n_visible, width, p0)
        n_runs += tl.sum(ends_run.to(tl.int32), 0)
    tl.store(RangeCountRow, n_runs)

    # Run j's first offset gives its range end, its last offset its range start.
    runs_before = 0
    pairs = tl.zeros([], dtype=tl.int64)
    for j0 in range(0, n_visible, TILE):
        j = j0 + tl.arange(0, TILE)
        ok = j < n_visible
        d, ends_run = _run_ends(slash_base, j, n_visible, width, p0)
        d_prev = tl.load(slash_base + j - 1, mask=ok & (j > 0), other=0)
        starts_run = ok & ((j == 0) | ((d - d_prev > width) & (d_prev < p0)))
        ends = ends_run.to(tl.int32)
        run_id = runs_before + tl.cumsum(ends, 0) - ends  # runs finished before offset j
        slot = n_runs - 1 - run_id
        tl.store(RangeEndRow + slot, p1 - d + 1, mask=starts_run)
        tl.store(RangeStartRow + slot, tl.maximum(p0 - d, 0), mask=ends_run)
        runs_before += tl.sum(ends, 0)
        pairs += tl.sum(tl.where(starts_run, keys_below_pairs(p1 - d + 1, p0_wide, p1_wide), 0), 0)
        pairs -= tl.sum(tl.where(ends_run, keys_below_pairs(tl.maximum(p0 - d, 0), p0_wide, p1_wide), 0), 0)
    return pairs


@triton.jit
def _ranges_from_head_runs(slash_base, run_end_base, n_head_runs, n_visible, p0, p1, p0_wide, p1_wide,
                           RangeCountRow, RangeStartRow, RangeEndRow, TILE: tl.constexpr):
    """The same ranges for a block of the full width, from the head's runs at that width (``run_end_base``:
    the slot of each run's last diagonal, ascending): in a block, runs whose last diagonal lies below p0
    end as they do in the whole list (their bands are not clipped at key 0); the first run reaching p0,
    if any of it is visible, merges with every later visible diagonal (all clipped bands start at key 0)
    into one range. So a block walks its head's few runs instead of every visible diagonal."""
    lanes = tl.arange(0, TILE)
    complete = 0  # runs ending below p0: a prefix of the head's runs
    for k0 in range(0, n_head_runs, TILE):
        k = k0 + lanes
        ok = k < n_head_runs
        last_d = tl.load(slash_base + tl.load(run_end_base + k, mask=ok, other=0), mask=ok, other=0)
        complete += tl.sum((ok & (last_d < p0)).to(tl.int32), 0)
    tail_first = tl.where(complete > 0, tl.load(run_end_base + complete - 1, mask=complete > 0, other=-1) + 1, 0)
    has_tail = (complete < n_head_runs) & (tail_first < n_visible)
    n_runs = complete + has_tail.to(tl.int32)
    tl.store(RangeCountRow, n_runs)

    pairs = tl.zeros([], dtype=tl.int64)
    for k0 in range(0, complete, TILE):
        k = k0 + lanes
        ok = k < complete
        first_slot = tl.load(run_end_base + k - 1, mask=ok & (k > 0), other=-1) + 1
        d_first = tl.load(slash_base + first_slot, mask=ok, other=0)
        d_last = tl.load(slash_base + tl.load(run_end_base + k, mask=ok, other=0), mask=ok, other=0)
        start = p0 - d_last
        end = p1 - d_first + 1
        tl.store(RangeStartRow + n_runs - 1 - k, start, mask=ok)
        tl.store(RangeEndRow + n_runs - 1 - k, end, mask=ok)
        pairs += tl.sum(tl.where(ok, keys_below_pairs(end, p0_wide, p1_wide)
                                 - keys_below_pairs(start, p0_wide, p1_wide), 0), 0)
    if has_tail:
        d_first = tl.load(slash_base + tail_first)
        d_last = tl.load(slash_base + n_visible - 1)
        start = tl.maximum(p0 - d_last, 0)
        end = p1 - d_first + 1
        tl.store(RangeStartRow, start)
        tl.store(RangeEndRow, end)
        pairs += keys_below_pairs(end, p0_wide, p1_wide) - keys_below_pairs(start, p0_wide, p1_wide)
    return pairs


@triton.jit
def _vs_index_kernel(
    VerticalIndex, VerticalCount, SlashOffset, SlashPrefix, HeadRunEnd, HeadRunCount,
    RangeCount, RangeStart, RangeEnd, ColumnCount, ColumnIndex, BlockPairs, ColumnLimit,
    q_len, k_len, q_offset, max_ranges, max_columns, n_vertical_slots, n_slash_slots, max_head_runs,
    stride_head_run_count,
    BLOCK_Q: tl.constexpr, TILE: tl.constexpr, SEARCH_STEPS: tl.constexpr, STORE_COLUMNS: tl.constexpr = True,
    HEAD_RUNS: tl.constexpr = True, HEAD_RANGES: tl.constexpr = False, PIECE_KEYS: tl.constexpr = 0,
    RUN_SEARCH_STEPS: tl.constexpr = 1,
):
    r = tl.program_id(0)
    # int64: out_row x max_columns passes 2^31 at 128K when a head keeps tens of thousands of columns.
    pid_bh = tl.program_id(1).to(tl.int64)
    p0 = r * BLOCK_Q + q_offset
    p1 = tl.minimum(r * BLOCK_Q + BLOCK_Q, q_len) - 1 + q_offset
    p0_wide = p0.to(tl.int64)
    p1_wide = p1.to(tl.int64)
    width = p1 - p0 + 1
    n_blocks = tl.num_programs(0)
    out_row = pid_bh * n_blocks + r  # int64 (pid_bh is)
    slash_base = SlashOffset + pid_bh * n_slash_slots
    prefix_base = SlashPrefix + pid_bh * (k_len + 2)
    # Offsets are sorted, so the visible ones (d <= p1) are a prefix of the list.
    n_visible = tl.load(prefix_base + p1 + 1)

    count_row, start_row, end_row = RangeCount + out_row, RangeStart + out_row * max_ranges, RangeEnd + out_row * max_ranges
    if HEAD_RANGES:
        # Per-head ranges (``triton_head_ranges``): RangeStart / RangeEnd are the relative runs [B x H, 2,
        # max_ranges]; the last block reads row 1, and the run counts are the plan's (bounds[:, 0 or 1]).
        table_row = (r == n_blocks - 1).to(tl.int32)
        table = pid_bh * 2 + table_row
        n_pieces, pairs, limit = ranges_from_head_table(
            RangeStart + table * max_ranges, RangeEnd + table * max_ranges,
            tl.load(HeadRunCount + pid_bh * stride_head_run_count + table_row), max_ranges, p0, p1, p0_wide,
            p1_wide, PIECE_KEYS, TILE, RUN_SEARCH_STEPS)
        tl.store(count_row, n_pieces)
        tl.store(ColumnLimit + out_row, limit)
    elif HEAD_RUNS:
        if width == BLOCK_Q:  # the last block may be narrower: its runs differ from the head's
            pairs = _ranges_from_head_runs(slash_base, HeadRunEnd + pid_bh * max_head_runs,
                                           tl.load(HeadRunCount + pid_bh * stride_head_run_count), n_visible, p0,
                                           p1, p0_wide, p1_wide, count_row, start_row, end_row, TILE)
        else:
            pairs = _ranges_from_visible_diagonals(slash_base, n_visible, width, p0, p1, p0_wide, p1_wide,
                                                   count_row, start_row, end_row, TILE)
    else:
        pairs = _ranges_from_visible_diagonals(slash_base, n_visible, width, p0, p1, p0_wide, p1_wide, count_row,
                                               start_row, end_row, TILE)

    # --- columns visible to the block and not inside any band
    n_vertical = tl.load(VerticalCount + pid_bh)
    vertical_base = VerticalIndex + pid_bh * n_vertical_slots
    # Upper bound of p1 in the sorted columns: later columns are in every row's future.
    lo = 0
    hi = n_vertical
    for _ in tl.static_range(SEARCH_STEPS):
        active = lo < hi
        mid = (lo + hi) // 2
        go_right = active & (tl.load(vertical_base + mid, mask=active, other=0) <= p1)
        lo = tl.where(go_right, mid + 1, lo)
        hi = tl.where(active & ~go_right, mid, hi)
    n_candidates = lo
    n_columns = 0
    for c0 in range(0, n_candidates, TILE):
        slots = c0 + tl.arange(0, TILE)
        slot_ok = slots < n_candidates
        cols = tl.load(vertical_base + slots, mask=slot_ok, other=-1)
        before = tl.load(vertical_base + slots - 1, mask=slot_ok & (slots > 0), other=-1)
        keep = slot_ok & (cols >= 0) & (cols != before)
        low = tl.maximum(p0 - cols, 0)
        high = p1 - cols  # >= 0 for candidate columns
        in_band = tl.load(prefix_base + high + 1, mask=keep, other=0) - tl.load(prefix_base + low, mask=keep, other=0)
        keep = keep & (in_band == 0)
        position = n_columns + tl.cumsum(keep.to(tl.int32), 0) - 1
        if STORE_COLUMNS:  # per-head columns (``head_columns.py``) are listed once per head, not here
            tl.store(ColumnIndex + out_row * max_columns + position, cols, mask=keep)
        n_columns += tl.sum(keep.to(tl.int32), 0)
        rows_seen = p1_wide - tl.maximum(p0_wide, cols.to(tl.int64)) + 1
        pairs += tl.sum(tl.where(keep, rows_seen, 0), 0)
    tl.store(ColumnCount + out_row, n_columns)
    tl.store(BlockPairs + out_row, pairs)


@triton.jit
def _split_ranges_kernel(
    RangeCount, RangeStart, RangeEnd, PieceCount, PieceStart, PieceEnd, max_ranges, max_pieces,
    PIECE_KEYS: tl.constexpr, TILE: tl.constexpr,
):
    """One index row (batch x head x query block): its ranges cut into consecutive pieces of at most
    ``PIECE_KEYS`` keys, in order (``split_ranges_naive``)."""
    row = tl.program_id(0).to(tl.int64)
    n = tl.load(RangeCount + row)
    written = 0
    for r0 in range(0, n, TILE):
        r = r0 + tl.arange(0, TILE)
        ok = r < n
        start = tl.load(RangeStart + row * max_ranges + r, mask=ok, other=0)
        end = tl.load(RangeEnd + row * max_ranges + r, mask=ok, other=0)
        pieces = tl.where(ok, (end - start + PIECE_KEYS - 1) // PIECE_KEYS, 0)
        first = written + tl.cumsum(pieces, 0) - pieces
        for i in range(0, tl.max(pieces, 0)):
            # The plan's bound makes first + i < max_pieces; the mask keeps a broken bound from
            # writing into the next row (tests check the counts against the capacity).
            has = (i < pieces) & (first + i < max_pieces)
            piece_start = start + i * PIECE_KEYS
            slot = row * max_pieces + first + i
            tl.store(PieceStart + slot, piece_start, mask=has)
            tl.store(PieceEnd + slot, tl.minimum(piece_start + PIECE_KEYS, end), mask=has)
        written += tl.sum(pieces, 0)
    tl.store(PieceCount + row, written)


def build_vertical_slash_index_triton(
    vertical_index: torch.Tensor,
    vertical_count: torch.Tensor,
    slash_offset: torch.Tensor,
    slash_count: torch.Tensor,
    *,
    q_len: int,
    k_len: int,
    block_size_q: int,
    slashes_sorted: bool = False,
    max_range_keys: int | None = None,
    column_layout: ColumnLayout | str = ColumnLayout.BLOCK,
    head_runs: bool | None = None,
    ranges_per_head: bool | None = None,
) -> VerticalSlashIndex:
    """GPU ``build_vertical_slash_index``: per-head lines (``vertical_index [B, H, Nv]``, ``slash_offset
    [B, H, Ns]`` and their ``[B, H]`` counts) -> ``VerticalSlashIndex`` ``[B, H, ceil(q_len / block_size_q), ...]``.
    ``slashes_sorted``: the real offsets already ascend (``select_lines`` output), so the sort is skipped.
    ``max_range_keys``: cut every merged range into pieces of at most that many keys (one more launch,
    sized by the same host read). ``column_layout``: as ``build_vertical_slash_index``; per-head columns
    take the plan's prefix count of diagonals as their ``column_cover``. ``head_runs``: full-width blocks
    build their ranges from their head's runs (None: ``INDEX_FROM_HEAD_RUNS``; the same output);
    ``ranges_per_head``: as ``build_vertical_slash_index`` (one relative table per head, built from the
    head's runs whatever ``head_runs`` says)."""
    b, h = vertical_count.shape
    device = vertical_index.device
    n_blocks = triton.cdiv(q_len, block_size_q)
    verticals = vertical_index.to(torch.int32).contiguous()
    n_slash_slots = slash_offset.shape[-1]
    slash_count = slash_count.to(torch.int32).contiguous()
    if slashes_sorted:  # the kernels read only the first count slots
        slashes = slash_offset.to(torch.int32).contiguous()
    else:  # the contract allows unsorted, repeated offsets; the kernels need them ascending
        slot_is_real = torch.arange(n_slash_slots, device=device) < slash_count[..., None]
        slashes = torch.where(slot_is_real, slash_offset.to(torch.int32), _UNUSED_SLOT).sort(dim=-1).values.contiguous()
    vertical_count = vertical_count.to(torch.int32).contiguous()
    # prefix[t] = kept offsets < t (slot k_len + 1 is never read), and per head the run counts at the
    # full and the last block's width and the vertical count: one launch, then one host read sizes
    # the outputs by the true maxima.
    prefix = torch.empty(b, h, k_len + 2, dtype=torch.int32, device=device)
    bounds = torch.empty(b * h, 5, dtype=torch.int32, device=device)
    last_width = q_len - (n_blocks - 1) * block_size_q
    slash_prefix_kernel[(b * h, triton.cdiv(k_len + 2, PLAN_TILE))](
        slashes, slash_count, prefix, k_len, n_slash_slots, TILE=PLAN_TILE,
        SEARCH_STEPS=max(1, int(n_slash_slots).bit_length()),
    )
    slash_plan_kernel[(b * h,)](
        slashes, slash_count, vertical_count, bounds, n_slash_slots, block_size_q, last_width, max_range_keys or 1,
        TILE=PLAN_TILE,
    )
    max_runs_full, max_runs_last, max_vertical, max_pieces_full, max_pieces_last = (
        int(x) for x in bounds.amax(dim=0).tolist())
    int32_bytes = 4
    block_table_bytes = b * h * n_blocks * max(max_vertical, 1) * int32_bytes
    per_head_columns = resolve_column_layout(column_layout, block_table_bytes, device) is ColumnLayout.HEAD
    lines = (verticals, vertical_count, slashes, slash_count, prefix, bounds)
    if resolve_ranges_per_head(ranges_per_head, per_head_columns):
        maxima = (max_runs_full, max_runs_last, max_vertical, max_pieces_full, max_pieces_last)
        return _build_with_head_ranges(vertical_index, lines, maxima, q_len=q_len, k_len=k_len,
                                       block_size_q=block_size_q, max_range_keys=max_range_keys,
                                       per_head_columns=per_head_columns)
    max_ranges = max(max_runs_full, max_runs_last, 1)
    range_count, column_count, column_index, block_pairs = _block_outputs(lines, n_blocks, max_vertical,
                                                                          per_head_columns)
    # Slots past a block's counts are never read (every consumer masks by the counts): no fill.
    range_start = torch.empty(b, h, n_blocks, max_ranges, dtype=torch.int32, device=device)
    range_end = torch.empty_like(range_start)
    # Each head's runs at the full block width (bounds[:, 0] counts them), which every full-width block
    # reads instead of its visible diagonals.
    max_head_runs = max(max_runs_full, 1)
    head_run_end = torch.empty(b * h, max_head_runs, dtype=torch.int32, device=device)
    head_runs = INDEX_FROM_HEAD_RUNS if head_runs is None else head_runs
    if head_runs:
        head_runs_kernel[(b * h,)](slashes, slash_count, head_run_end, n_slash_slots, max_head_runs, block_size_q,
                                    TILE=PLAN_TILE)
    _launch_index_kernel(lines, head_run_end, (range_count, range_start, range_end, column_count, column_index,
                                               block_pairs, range_count), max_ranges, max_head_runs,
                         q_len=q_len, k_len=k_len, block_size_q=block_size_q, per_head_columns=per_head_columns,
                         HEAD_RUNS=bool(head_runs))
    if per_head_columns:
        # The per-head layout reads each block's last whole range: before the split below.
        whole = VerticalSlashIndex(
            range_count=range_count, range_start=range_start, range_end=range_end, column_count=column_count,
            column_index=column_index, block_size_q=block_size_q, q_len=q_len, k_len=k_len)
        # The plan's bound on the vertical count trims the lists (the estimate's are Lk slots wide).
        head = to_head_columns(whole, vertical_index, vertical_count, prefix, width=max_vertical)
        column_count, column_index, column_cover = head.column_count, head.column_index, head.column_cover
    else:
        column_cover = None
    if max_range_keys is not None:
        max_pieces = max(max_pieces_full, max_pieces_last, 1)
        piece_count = torch.empty_like(range_count)
        piece_start = torch.empty(b, h, n_blocks, max_pieces, dtype=torch.int32, device=device)
        piece_end = torch.empty_like(piece_start)
        _split_ranges_kernel[(b * h * n_blocks,)](
            range_count, range_start, range_end, piece_count, piece_start, piece_end, max_ranges, max_pieces,
            PIECE_KEYS=max_range_keys, TILE=SPLIT_TILE,
        )
        range_count, range_start, range_end = piece_count, piece_start, piece_end
    return VerticalSlashIndex(
        range_count=range_count, range_start=range_start, range_end=range_end, column_count=column_count,
        column_index=column_index, block_size_q=block_size_q, q_len=q_len, k_len=k_len, block_pairs=block_pairs,
        max_range_keys=max_range_keys, column_cover=column_cover,
    )


def _block_outputs(lines: tuple, n_blocks: int, max_vertical: int, per_head_columns: bool) -> tuple:
    """``(range_count, column_count [B, H, Rq] int32, column_index [B, H, Rq, V] int32, block_pairs [B, H, Rq]
    int64)`` for the index kernel to fill (``V``: 1 for per-head columns, listed later)."""
    vertical_count, device = lines[1], lines[0].device
    range_count = torch.empty(*vertical_count.shape, n_blocks, dtype=torch.int32, device=device)
    max_columns = 1 if per_head_columns else max(max_vertical, 1)
    column_index = torch.empty(*range_count.shape, max_columns, dtype=torch.int32, device=device)
    block_pairs = torch.empty(range_count.shape, dtype=torch.int64, device=device)
    return range_count, torch.empty_like(range_count), column_index, block_pairs


def _launch_index_kernel(lines: tuple, head_run_end: torch.Tensor, outputs: tuple, range_width: int,
                         head_runs_width: int, *, q_len: int, k_len: int, block_size_q: int, per_head_columns: bool,
                         **constexprs) -> None:
    """One ``_vs_index_kernel`` program per (query block, batch x head): ``outputs`` = (range count,
    start, end, column count, column index, block pairs, column limit) as the kernel takes them."""
    verticals, vertical_count, slashes, _, prefix, bounds = lines
    column_index = outputs[4]
    _vs_index_kernel[(triton.cdiv(q_len, block_size_q), vertical_count.numel())](
        verticals, vertical_count, slashes, prefix, head_run_end, bounds, *outputs,
        q_len, k_len, k_len - q_len, range_width, column_index.shape[-1], verticals.shape[-1], slashes.shape[-1],
        head_runs_width, bounds.stride(0),
        BLOCK_Q=block_size_q, TILE=LINE_TILE, SEARCH_STEPS=max(1, int(verticals.shape[-1]).bit_length()),
        STORE_COLUMNS=not per_head_columns, **constexprs,
    )


def _build_with_head_ranges(vertical_index: torch.Tensor, lines: tuple, maxima: tuple, *, q_len: int, k_len: int,
                            block_size_q: int, max_range_keys: int | None, per_head_columns: bool) -> VerticalSlashIndex:
    """The index with one range table per head (``head_ranges.py``): each head's runs at the full and
    the last block's width, their relative tables, then one program per block that counts what it reads.
    ``lines``: the builder's int32 ``(verticals, vertical_count, ascending slashes, slash_count, prefix,
    bounds)`` after the plan; ``maxima``: the plan's bounds' maxima over heads, which size the tables."""
    verticals, vertical_count, slashes, slash_count, prefix, bounds = lines
    max_runs_full, max_runs_last, max_vertical, max_pieces_full, max_pieces_last = maxima
    (b, h), device = vertical_count.shape, verticals.device
    n_blocks = triton.cdiv(q_len, block_size_q)
    n_slash_slots = slashes.shape[-1]
    max_runs = max(max_runs_full, max_runs_last, 1)
    head_run_end = torch.empty(b * h, RANGE_TABLE_ROWS, max_runs, dtype=torch.int32, device=device)
    widths = (block_size_q, q_len - (n_blocks - 1) * block_size_q)
    for row, width in enumerate(widths):
        head_runs_kernel[(b * h,)](slashes, slash_count, head_run_end[:, row], n_slash_slots,
                                    head_run_end.stride(0), width, TILE=PLAN_TILE)
    # Slots left of a row's runs are never read (blocks search and walk from the right): no fill.
    run_start = torch.empty(b, h, RANGE_TABLE_ROWS, max_runs, dtype=torch.int32, device=device)
    run_end = torch.empty_like(run_start)
    if max_range_keys is None:
        max_pieces, piece_start, piece_end = max_runs, run_start, run_end
    else:
        max_pieces = max(max_pieces_full, max_pieces_last, 1)
        piece_start = torch.empty(b, h, RANGE_TABLE_ROWS, max_pieces, dtype=torch.int32, device=device)
        piece_end = torch.empty_like(piece_start)
    head_range_table_kernel[(b * h, RANGE_TABLE_ROWS)](
        slashes, head_run_end, bounds, run_start, run_end, piece_start, piece_end, n_slash_slots, max_runs,
        max_pieces, bounds.stride(0), bounds.stride(1), *widths, PIECE_KEYS=max_range_keys or 0, TILE=PLAN_TILE,
    )
    range_count, column_count, column_index, block_pairs = _block_outputs(lines, n_blocks, max_vertical,
                                                                          per_head_columns)
    column_limit = torch.empty_like(range_count)
    _launch_index_kernel(lines, head_run_end, (range_count, run_start, run_end, column_count, column_index,
                                               block_pairs, column_limit), max_runs, max_runs,
                         q_len=q_len, k_len=k_len, block_size_q=block_size_q, per_head_columns=per_head_columns,
                         HEAD_RUNS=False, HEAD_RANGES=True, PIECE_KEYS=max_range_keys or 0,
                         RUN_SEARCH_STEPS=run_search_steps(max_runs))
    index = VerticalSlashIndex(
        range_count=range_count, range_start=piece_start, range_end=piece_end, column_count=column_count,
        column_index=column_index, block_size_q=block_size_q, q_len=q_len, k_len=k_len, block_pairs=block_pairs,
        max_range_keys=max_range_keys, ranges_per_head=True)
    if not per_head_columns:
        return index
    # The plan's bound on the vertical count trims the lists (the estimate's are Lk slots wide).
    return to_head_columns_below(index, vertical_index, vertical_count, prefix, column_limit, width=max_vertical)


__all__ = ["build_vertical_slash_index_triton"]
