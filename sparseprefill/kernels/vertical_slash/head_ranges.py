"""The per-head range layout of ``VerticalSlashIndex`` (``ranges_per_head``): its torch reference,
which the CPU builder runs and the GPU builder's kernels (``triton_head_ranges.py``) are tested against.

A query block of width ``w`` whose first row sits at position ``p0`` sees diagonal ``d`` on keys
``[p0 - d, p0 + w - 1 - d]``; two kept diagonals' bands overlap or touch iff they are at most ``w`` apart.
So a head's merged ranges come from its *runs* at width ``w`` (kept diagonals at most ``w`` apart), the
same in every block of that width: run ``[lo, hi]`` covers ``[p0 - hi, p0 + w - lo)``, clipped at key 0.
Clipping merges nothing: a run reaching below key 0 has ``hi > p0``, so the next run out starts past
``p0 + w`` and lies wholly below key 0 (and inside a run, a block's last visible diagonal is at least
``p0`` once any is invisible, so its clipped range is the visible diagonals' own). A per-block index
stores these ranges once per block, O(blocks x runs); this layout stores one table per head of the
ranges relative to ``p0`` (and one for the last block, which may be narrower), ascending in keys, that
is, farthest run first, right-aligned so that the ranges a block sees, those ending above key 0, are the
row's last ``count`` slots. Range pieces (``max_range_keys``) are cut from each run's relative start, so
a block whose range is not clipped reads the pieces a per-block split would cut; a clipped one reads
its clipped first piece and the rest.
"""

from __future__ import annotations

import torch

from ..common import compact
from ..geometry import query_block_bounds
from ..indices import RANGE_TABLE_ROWS, VerticalSlashIndex
from .head_columns import diagonal_prefix, head_columns_below

_PAST_EVERY_DIAGONAL = torch.iinfo(torch.int64).max // 4  # sorts padding after every real offset

# Builders keep the ranges per head wherever they keep the columns per head (asked for, or where the
# per-block column table would not fit: ``head_columns.resolve_column_layout``): the per-head layout is the
# one that bounds the index's memory, and per-block ranges were most of what it still kept at 128K
# (range pieces: ~577 of 625 MiB on Llama-3.1-8B shapes, H100, stop 36).
HEAD_RANGES_WITH_HEAD_COLUMNS = True


def resolve_ranges_per_head(ranges_per_head: bool | None, per_head_columns: bool) -> bool:
    """Whether a builder keeps one range table per head: as asked, or (None) with per-head columns."""
    if ranges_per_head is None:
        return HEAD_RANGES_WITH_HEAD_COLUMNS and per_head_columns
    return bool(ranges_per_head)


def head_run_bounds(slash_offset: torch.Tensor, slash_count: torch.Tensor, width: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(lo, hi [B, H, R] int64, run_count [B, H] int32)``: each head's runs of kept diagonals at block
    width ``width`` (neighbours at most ``width`` apart), nearest first: the first and last diagonal of
    each; slots past the count hold zeros. Repeated diagonals count once."""
    n_slots = slash_offset.shape[-1]
    real = torch.arange(n_slots, device=slash_offset.device) < slash_count[..., None].long()
    offsets = torch.where(real, slash_offset.long(), _PAST_EVERY_DIAGONAL).sort(dim=-1).values
    real = offsets < _PAST_EVERY_DIAGONAL
    gap_after = torch.full_like(offsets, width + 1)
    gap_after[..., :-1] = offsets[..., 1:] - offsets[..., :-1]
    ends = real & ((gap_after > width) | ~torch.cat([real[..., 1:], torch.zeros_like(real[..., :1])], -1))
    starts = torch.zeros_like(real)
    starts[..., 0] = real[..., 0]
    starts[..., 1:] = real[..., 1:] & ends[..., :-1]
    run_count, first = compact(starts)
    _, last = compact(ends)
    ok = first >= 0
    lo = torch.where(ok, torch.gather(offsets, -1, first.clamp_min(0).long()), 0)
    hi = torch.where(ok, torch.gather(offsets, -1, last.clamp_min(0).long()), 0)
    return lo, hi, run_count


def run_piece_counts(rel_start: torch.Tensor, rel_end: torch.Tensor, max_range_keys: int | None) -> torch.Tensor:
    """Pieces each relative range ``[rel_start, rel_end)`` is cut into (1 without a cut)."""
    if max_range_keys is None:
        return torch.ones_like(rel_start)
    return (rel_end - rel_start + max_range_keys - 1) // max_range_keys


def head_range_table(
    slash_offset: torch.Tensor,
    slash_count: torch.Tensor,
    *,
    q_len: int,
    k_len: int,
    block_size_q: int,
    max_range_keys: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """The per-head range layout of the diagonals ``slash_offset [B, H, Ns]`` (first ``slash_count``
    real, any order): ``(range_count [B, H, Rq] int32, range_start, range_end [B, H, 2, M] int32,
    column_limit [B, H, Rq] int64)``. ``column_limit``: the key below which a block's columns can lie
    outside its bands (the start of its range ending at its last position, if the head keeps diagonal 0,
    else that position plus one), what a per-head column list's counts read up to. Slots left of a row's
    real ranges hold zeros."""
    if max_range_keys is not None and max_range_keys < 1:
        raise ValueError(f"max_range_keys must be >= 1 or None, got {max_range_keys}")
    device = slash_offset.device
    n_blocks = -(-q_len // block_size_q)
    last_width = q_len - (n_blocks - 1) * block_size_q
    rows = []
    for width in (block_size_q, last_width):  # the table's rows, in RANGE_TABLE_ROWS order
        lo, hi, run_count = head_run_bounds(slash_offset, slash_count, width)
        run_ok = torch.arange(lo.shape[-1], device=device) < run_count[..., None].long()
        rel_start, rel_end = -hi, width - lo
        pieces = torch.where(run_ok, run_piece_counts(rel_start, rel_end, max_range_keys), 0)
        rows.append((width, rel_start, rel_end, run_ok, pieces))
    assert len(rows) == RANGE_TABLE_ROWS
    table_width = max(max(int(row[4].sum(-1).max()) if row[4].numel() else 0 for row in rows), 1)

    starts, ends = [], []
    for _, rel_start, rel_end, _, pieces in rows:
        nearer = pieces.cumsum(-1)  # pieces of this run and every nearer one
        total = nearer[..., -1:]
        # Slot t lies u = width - 1 - t slots from the right end: in run k where nearer[k - 1] <= u < nearer[k].
        from_right = (table_width - 1 - torch.arange(table_width, device=device)).expand(*pieces.shape[:-1], -1)
        run = torch.searchsorted(nearer.contiguous(), from_right.contiguous(), right=True)
        run = run.clamp_max(pieces.shape[-1] - 1)
        piece = torch.gather(nearer, -1, run) - 1 - from_right  # piece number inside its run, from its start
        start = torch.gather(rel_start, -1, run)
        end = torch.gather(rel_end, -1, run)
        if max_range_keys is not None:
            start = start + piece * max_range_keys
            end = torch.minimum(start + max_range_keys, end)
        real = from_right < total
        starts.append(torch.where(real, start, 0))
        ends.append(torch.where(real, end, 0))
    range_start = torch.stack(starts, dim=2).to(torch.int32)
    range_end = torch.stack(ends, dim=2).to(torch.int32)

    p0, p1 = query_block_bounds(q_len, k_len, block_size_q, device)
    counts, limits = [], []
    for r in range(n_blocks):
        width, rel_start, rel_end, run_ok, pieces = rows[1 if r == n_blocks - 1 else 0]
        block_p0, block_p1 = int(p0[r]), int(p1[r])
        seen = run_ok & (rel_end + block_p0 > 0)
        below_zero = (-(rel_start + block_p0)).clamp_min(0)
        hidden = below_zero // max_range_keys if max_range_keys is not None else torch.zeros_like(below_zero)
        counts.append(torch.where(seen, pieces - hidden, 0).sum(-1))
        keeps_diagonal_0 = run_ok[..., 0] & (rel_end[..., 0] == width)  # runs are at least one slot wide
        nearest_start = (rel_start[..., 0] + block_p0).clamp_min(0)
        limits.append(torch.where(keeps_diagonal_0, nearest_start, block_p1 + 1))
    range_count = torch.stack(counts, dim=-1).to(torch.int32)
    column_limit = torch.stack(limits, dim=-1).long()
    return range_count, range_start, range_end, column_limit


def build_per_head_index(vertical_index: torch.Tensor, vertical_count: torch.Tensor, slash_offset: torch.Tensor,
                         slash_count: torch.Tensor, *, q_len: int, k_len: int, block_size_q: int,
                         max_range_keys: int | None = None) -> VerticalSlashIndex:
    """The index with per-head ranges and per-head columns straight from the lines (torch; what the CPU
    builder returns for that layout), never holding a per-block list: O(lines + Lk + blocks) memory
    kept, O(blocks x runs) transient."""
    range_count, range_start, range_end, column_limit = head_range_table(
        slash_offset, slash_count, q_len=q_len, k_len=k_len, block_size_q=block_size_q, max_range_keys=max_range_keys)
    column_count, column_index = head_columns_below(vertical_index, vertical_count, column_limit)
    return VerticalSlashIndex(
        range_count=range_count, range_start=range_start, range_end=range_end, column_count=column_count,
        column_index=column_index, block_size_q=block_size_q, q_len=q_len, k_len=k_len,
        max_range_keys=max_range_keys, column_cover=diagonal_prefix(slash_offset, slash_count, k_len),
        ranges_per_head=True)


__all__ = ["HEAD_RANGES_WITH_HEAD_COLUMNS", "build_per_head_index", "head_range_table", "head_run_bounds", "resolve_ranges_per_head",
           "run_piece_counts"]
