"""Sparse index layouts: the data contract between estimation (patterns) and attention (kernels).

Both layouts are per batch row and per *query* head (``H`` below is the number of query heads the
index covers), per query block ``r`` (local query rows ``[r * block_size_q, (r + 1) * block_size_q)``).
Query rows see keys under bottom-right causal alignment (see ``geometry``); the kernels apply the
causal and sliding-window masks themselves, so an index may list keys a row cannot see.

``BlockSparseIndex`` (FlexAttention ``BlockMask``-like):
    block_count [B, H, Rq] int32        number of KV blocks of query block r
    block_index [B, H, Rq, N] int32     their ids, sorted ascending; entries >= count are padding
    KV block c covers keys [c * block_size_k, (c + 1) * block_size_k).
    column_count [B, H, Rq] int32       optional (both or neither): single key columns besides the
    column_index [B, H, Rq, V] int32    blocks, ascending in the first count and in no listed block
                                        (a kernel sums blocks and columns: a key in both counts twice)

``VerticalSlashIndex`` (MInference/SGLang-like, with explicit range ends):
    range_count  [B, H, Rq] int32       number of key ranges (merged diagonal bands)
    range_start  [B, H, Rq, M] int32    sorted, disjoint half-open ranges [start, end)
    range_end    [B, H, Rq, M] int32
    column_count [B, H, Rq] int32       number of single key columns (verticals)
    column_index [B, H, Rq, V] int32    sorted; disjoint from the ranges
    column_cover [B, H, Lk + 2] int32   optional, the per-head column layout: ``column_index`` is then
                                        ``[B, H, 1, V]``, one ascending, unique list per head;
                                        ``column_count`` counts the head's leading columns block r reads;
                                        and block r skips every one of them a band of its covers:
                                        column ``c`` is covered iff ``column_cover[c_hi + 1] >
                                        column_cover[c_lo]`` with ``[c_lo, c_hi] = [max(p0 - c, 0), p1 - c]``
                                        (``column_cover[t]``: the head's kept diagonals below ``t``).
                                        O(lines + Lk) memory instead of O(blocks x lines)
    block_pairs  [B, H, Rq] int64       optional: causal pairs each query block lists (no window),
                                        counted by the builder; whoever changes the lists drops it
    max_range_keys                      optional: every range spans at most this many keys (the
                                        builder cut its merged bands into pieces); kernels with a key
                                        tile that wide walk ranges in one flat loop and trust it
    ranges_per_head                     optional, the per-head range layout: ``range_start`` and ``range_end``
                                        are then ``[B, H, 2, M]``, one table per head of ranges relative to
                                        a block's first position ``p0`` (row 0 for the blocks of the full
                                        width, row 1 for the last block, whose narrower width merges its
                                        bands differently; the same as row 0 when it is full), ascending
                                        and right-aligned: block r reads the last ``range_count[r]`` slots
                                        of its row, each as ``[max(p0 + start, 0), p0 + end)``. A head's
                                        merged bands are the same runs of diagonals in every block of one
                                        width, shifted by ``p0``; those reaching below key 0 are clipped
                                        there, and those wholly below it are the row's leading slots.
                                        O(runs) memory per head instead of O(blocks x runs)
    Disjointness is an invariant the converter guarantees: a kernel sums over ranges and columns
    and would count a duplicated key twice.

``VerticalSlashLines`` (per head, not per query block; what the fused GPU kernel reads):
    vertical_index [B, H, Nv] int32     key columns, ascending and unique in the first count
    vertical_count [B, H] int32
    slash_offset   [B, H, Ns] int32     diagonals d = query_pos - key_pos >= 0, ascending in the first count
    slash_count    [B, H] int32
    block_pairs    [B, H, Rq] int64     written by the attention that consumes the lines: causal pairs
                                        each query block computed (read it after that attention ran)
    It describes exactly the keys of the ``VerticalSlashIndex`` that ``build_vertical_slash_index``
    makes from the same lines (``to_index``), in O(lines) memory instead of O(blocks x lines), and a
    kernel can consume it without the host learning any size first.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch

from .common import compact
from .geometry import block_pair_table, causal_pairs_in_columns, causal_pairs_in_rects, query_block_bounds

__all__ = ["RANGE_TABLE_ROWS", "BlockSparseIndex", "VerticalSlashIndex", "VerticalSlashLines"]

# Rows of a per-head range table: the blocks of the full width share one, the last block has its own.
RANGE_TABLE_ROWS = 2


def _check_int_tensor(name: str, t: torch.Tensor, ndim: int) -> None:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a tensor, got {type(t).__name__}")
    if t.dtype not in (torch.int32, torch.int64):
        raise TypeError(f"{name} must be int32 or int64, got {t.dtype}")
    if t.ndim != ndim:
        raise ValueError(f"{name} must have {ndim} dims, got shape {tuple(t.shape)}")


@dataclass(frozen=True)
class BlockSparseIndex:
    block_count: torch.Tensor
    block_index: torch.Tensor
    block_size_q: int
    block_size_k: int
    q_len: int
    k_len: int
    column_count: torch.Tensor | None = None
    column_index: torch.Tensor | None = None

    def __post_init__(self) -> None:
        _check_int_tensor("block_count", self.block_count, 3)
        _check_int_tensor("block_index", self.block_index, 4)
        if self.block_index.shape[:3] != self.block_count.shape:
            raise ValueError(
                f"block_index {tuple(self.block_index.shape)} and block_count {tuple(self.block_count.shape)} disagree"
            )
        if (self.column_count is None) != (self.column_index is None):
            raise ValueError("column_count and column_index come together: give both or neither")
        if self.column_count is not None:
            _check_int_tensor("column_count", self.column_count, 3)
            _check_int_tensor("column_index", self.column_index, 4)
            if self.column_count.shape != self.block_count.shape or \
                    self.column_index.shape[:3] != self.block_count.shape:
                raise ValueError(f"columns {tuple(self.column_index.shape)} (counts {tuple(self.column_count.shape)}) "
                                 f"must match block_count {tuple(self.block_count.shape)}")
        n_q_blocks = -(-self.q_len // self.block_size_q)
        if self.block_count.shape[2] != n_q_blocks:
            raise ValueError(f"index has {self.block_count.shape[2]} query blocks, Lq={self.q_len} needs {n_q_blocks}")

    @property
    def num_kv_blocks(self) -> int:
        return -(-self.k_len // self.block_size_k)

    def at_full_width(self) -> "BlockSparseIndex":
        """The same index with ``block_index`` padded (with -1) to every key block, a width known from the
        shapes alone (what traced code and CUDA graphs need); a wider list is returned as is."""
        missing = self.num_kv_blocks - self.block_index.shape[-1]
        if missing <= 0:
            return self
        return replace(self, block_index=torch.nn.functional.pad(self.block_index, (0, missing), value=-1))

    def with_heads_whole(self, heads: torch.Tensor) -> "BlockSparseIndex":
        """The same index (at full width) with every query block of the ``heads [B, H]`` (bool) rows
        listing every key block its last row can see, and no columns: the block kernel then computes
        those heads exactly, with no host read of ``heads`` (what traced code and CUDA graphs need)."""
        full = self.at_full_width()
        device = full.block_index.device
        _, last_row = query_block_bounds(self.q_len, self.k_len, self.block_size_q, device)
        visible = torch.clamp(last_row // self.block_size_k + 1, max=self.num_kv_blocks).to(torch.int32)
        every_block = torch.arange(full.block_index.shape[-1], dtype=full.block_index.dtype, device=device)
        whole = heads[..., None]
        return replace(full, block_count=torch.where(whole, visible, full.block_count),
                       block_index=torch.where(whole[..., None], every_block, full.block_index),
                       column_count=None if full.column_count is None else torch.where(whole, 0, full.column_count))

    def slot_valid(self) -> torch.Tensor:
        """``[B, H, Rq, N]`` bool: which entries of ``block_index`` are real."""
        slots = torch.arange(self.block_index.shape[-1], device=self.block_index.device)
        return slots < self.block_count[..., None]

    def column_valid(self) -> torch.Tensor | None:
        """``[B, H, Rq, V]`` bool: which entries of ``column_index`` are real (None without columns)."""
        if self.column_index is None:
            return None
        slots = torch.arange(self.column_index.shape[-1], device=self.column_index.device)
        return slots < self.column_count[..., None]

    def computed_pairs(self, window: int | None = None) -> torch.Tensor:
        """``[B, H]`` int64: causal (query, key) pairs the index makes a kernel compute."""
        device = self.block_index.device
        table = block_pair_table(self.q_len, self.k_len, self.block_size_q, self.block_size_k, window, device)
        n_rows, n_kv = table.shape
        if table.numel() == 0:
            pairs = torch.zeros(self.block_count.shape[:2], dtype=torch.int64, device=device)
        else:
            # Padding slots may hold anything: clamped into the row's table, then masked.
            row_start = (torch.arange(n_rows, device=device, dtype=torch.int32) * n_kv)[:, None]
            slots = self.block_index.clamp(0, n_kv - 1) + row_start
            per_slot = torch.where(self.slot_valid(), table.flatten()[slots], 0)
            pairs = per_slot.sum(dim=(-1, -2), dtype=torch.int64)
        if self.column_index is not None:
            p0, p1 = query_block_bounds(self.q_len, self.k_len, self.block_size_q, device)
            p0, p1 = p0[:, None], p1[:, None]
            cols = causal_pairs_in_columns(p0, p1, self.column_index.to(torch.int64), window)
            pairs = pairs + torch.where(self.column_valid(), cols, 0).sum(dim=(-1, -2))
        return pairs

    def without_heads(self, heads: torch.Tensor) -> "BlockSparseIndex":
        """The same index with every query block of the ``heads [B, H]`` (bool) rows emptied: a kernel
        writes zeros there (no listed key) and computes nothing."""
        emptied = heads[..., None]
        return replace(self, block_count=torch.where(emptied, 0, self.block_count),
                       column_count=None if self.column_count is None else torch.where(emptied, 0, self.column_count))

    def to_dense_mask(self) -> torch.Tensor:
        """``[B, H, Lq, Lk]`` bool of listed keys (no causal mask applied). Debugging and plots only."""
        b, h, rq, _ = self.block_index.shape
        # scatter_add (not scatter_): padding slots point at block 0 and must not overwrite it.
        blocks = torch.zeros(b, h, rq, self.num_kv_blocks, dtype=torch.int32, device=self.block_index.device)
        ids = torch.where(self.slot_valid(), self.block_index.long(), 0)
        blocks.scatter_add_(-1, ids, self.slot_valid().to(torch.int32))
        per_block = (blocks > 0).repeat_interleave(self.block_size_k, dim=3)[..., : self.k_len]
        if self.column_index is not None:
            columns = torch.zeros(b, h, rq, self.k_len, dtype=torch.int32, device=self.block_index.device)
            valid = self.column_valid()
            columns.scatter_add_(-1, torch.where(valid, self.column_index.long(), 0), valid.to(torch.int32))
            per_block = per_block | (columns > 0)
        return per_block.repeat_interleave(self.block_size_q, dim=2)[:, :, : self.q_len]


@dataclass(frozen=True)
class VerticalSlashIndex:
    range_count: torch.Tensor
    range_start: torch.Tensor
    range_end: torch.Tensor
    column_count: torch.Tensor
    column_index: torch.Tensor
    block_size_q: int
    q_len: int
    k_len: int
    block_pairs: torch.Tensor | None = None
    # Set by a builder that cut its ranges into pieces of at most this many keys: a kernel whose key
    # tile is at least as wide walks them as one flat loop (one tile per range, software-pipelined).
    max_range_keys: int | None = None
    # Set by a builder that keeps one column list per head (see the module docstring): a block's
    # columns are then the head's first ``column_count`` minus those its bands cover.
    column_cover: torch.Tensor | None = None
    # Set by a builder that keeps one range table per head (see the module docstring).
    ranges_per_head: bool = False

    def __post_init__(self) -> None:
        if self.max_range_keys is not None and self.max_range_keys < 1:
            raise ValueError(f"max_range_keys must be >= 1 or None, got {self.max_range_keys}")
        _check_int_tensor("range_count", self.range_count, 3)
        if self.block_pairs is not None and self.block_pairs.shape != self.range_count.shape:
            raise ValueError(f"block_pairs {tuple(self.block_pairs.shape)} must match range_count "
                             f"{tuple(self.range_count.shape)}")
        _check_int_tensor("range_start", self.range_start, 4)
        _check_int_tensor("range_end", self.range_end, 4)
        _check_int_tensor("column_count", self.column_count, 3)
        _check_int_tensor("column_index", self.column_index, 4)
        if self.range_start.shape != self.range_end.shape:
            raise ValueError("range_start and range_end must have the same shape")
        if self.ranges_per_head:
            batch_heads = tuple(self.range_count.shape[:2])
            if tuple(self.range_start.shape[:3]) != (*batch_heads, RANGE_TABLE_ROWS):
                raise ValueError(f"per-head ranges: range_start must be {(*batch_heads, RANGE_TABLE_ROWS, 'M')} (a "
                                 f"row for full-width blocks, one for the last block), got "
                                 f"{tuple(self.range_start.shape)}")
        elif self.range_start.shape[:3] != self.range_count.shape:
            raise ValueError(f"range_start leading dims must match range_count {tuple(self.range_count.shape)}")
        if self.column_cover is None:
            if self.column_index.shape[:3] != self.range_count.shape:
                raise ValueError(f"column_index leading dims must match range_count {tuple(self.range_count.shape)}")
        else:
            _check_int_tensor("column_cover", self.column_cover, 3)
            batch_heads = tuple(self.range_count.shape[:2])
            if tuple(self.column_index.shape[:3]) != (*batch_heads, 1):
                raise ValueError(f"per-head columns: column_index must be {(*batch_heads, 1, 'V')}, got "
                                 f"{tuple(self.column_index.shape)}")
            if tuple(self.column_cover.shape) != (*batch_heads, self.k_len + 2):
                raise ValueError(f"column_cover must be {(*batch_heads, self.k_len + 2)} (kept diagonals below "
                                 f"each t in [0, Lk + 1]), got {tuple(self.column_cover.shape)}")
        if self.column_count.shape != self.range_count.shape:
            raise ValueError("column_count and range_count must have the same shape")
        n_q_blocks = -(-self.q_len // self.block_size_q)
        if self.range_count.shape[2] != n_q_blocks:
            raise ValueError(f"index has {self.range_count.shape[2]} query blocks, Lq={self.q_len} needs {n_q_blocks}")

    def range_valid(self) -> torch.Tensor:
        """``[B, H, Rq, M]`` bool: which slots of the per-block range lists are real (per-head ranges are
        refused: read ``block_ranges()`` or ``with_block_ranges()``)."""
        if self.ranges_per_head:
            raise ValueError("range_valid() describes per-block range lists; this index keeps one range table per "
                             "head: read block_ranges() or with_block_ranges() instead")
        slots = torch.arange(self.range_start.shape[-1], device=self.range_start.device)
        return slots < self.range_count[..., None]

    def block_ranges(self, rows: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(range_count [B, H, Rq], range_start, range_end [B, H, Rq, M])``: each block's own ranges in
        absolute key positions, ascending in the first count (per-head ranges are expanded, O(blocks x
        ranges)); ``rows [n]`` (a long tensor on the index's device): those query blocks only."""
        counts = self.range_count if rows is None else self.range_count[:, :, rows]
        if not self.ranges_per_head:
            if rows is None:
                return self.range_count, self.range_start, self.range_end
            return counts, self.range_start[:, :, rows], self.range_end[:, :, rows]
        device = self.range_start.device
        p0, _ = query_block_bounds(self.q_len, self.k_len, self.block_size_q, device)
        n_blocks = self.range_count.shape[2]
        table_row = (torch.arange(n_blocks, device=device) == n_blocks - 1).long()
        if rows is not None:
            p0, table_row = p0[rows], table_row[rows]
        width = self.range_start.shape[-1]
        slots = torch.arange(width, device=device)
        # Slot j of a block is slot width - count + j of its row: the row's last ``count`` slots.
        source = (width - counts.long()[..., None] + slots).clamp(0, width - 1)
        real = slots < counts[..., None]
        shift = p0[:, None]
        start = torch.gather(self.range_start[:, :, table_row].long(), -1, source) + shift
        end = torch.gather(self.range_end[:, :, table_row].long(), -1, source) + shift
        return (counts, torch.where(real, start.clamp_min(0), 0).to(torch.int32),
                torch.where(real, end, 0).to(torch.int32))

    def with_block_ranges(self) -> "VerticalSlashIndex":
        """The same keys with per-block range lists (itself if already so)."""
        if not self.ranges_per_head:
            return self
        count, start, end = self.block_ranges()
        return replace(self, range_count=count, range_start=start, range_end=end, ranges_per_head=False)

    def with_block_lists(self) -> "VerticalSlashIndex":
        """The same keys with per-block ranges and columns: what the references, masks and comparisons
        read."""
        return self.with_block_ranges().with_block_columns()

    @property
    def columns_per_head(self) -> bool:
        """Whether the columns are one list per head (``column_cover`` set) rather than per query block."""
        return self.column_cover is not None

    def column_valid(self, rows: torch.Tensor | None = None) -> torch.Tensor:
        """``[B, H, Rq, V]`` bool: which column slots are keys of their block (per-head columns: the
        block's leading slots that none of its bands covers); ``rows [n]``: those query blocks only."""
        slots = torch.arange(self.column_index.shape[-1], device=self.column_index.device)
        counts = self.column_count if rows is None else self.column_count[:, :, rows]
        valid = slots < counts[..., None]
        return valid if self.column_cover is None else valid & ~self._columns_covered(rows)

    def _columns_covered(self, rows: torch.Tensor | None) -> torch.Tensor:
        """``[B, H, Rq or n, V]`` bool, per-head columns: slot ``j``'s column lies in a band of the block."""
        p0, p1 = query_block_bounds(self.q_len, self.k_len, self.block_size_q, self.column_index.device)
        if rows is not None:
            p0, p1 = p0[rows], p1[rows]
        columns = self.column_index.long()  # [B, H, 1, V]
        # Slots past the count may hold anything: clamped into the table, then masked by the count.
        low = (p0[:, None] - columns).clamp(0, self.k_len + 1)
        high_next = (p1[:, None] - columns + 1).clamp(0, self.k_len + 1)
        table = self.column_cover.long()[:, :, None, :].expand(*low.shape[:3], -1)
        return torch.gather(table, -1, high_next) > torch.gather(table, -1, low)

    def block_columns(self, rows: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """``(column_count [B, H, Rq], column_index [B, H, Rq, W])``: each block's own columns, compacted
        (the per-block layout; per-head columns are expanded, O(blocks x lines)); ``rows [n]`` (a long
        tensor on the index's device): those query blocks only."""
        if self.column_cover is None:
            return ((self.column_count, self.column_index) if rows is None
                    else (self.column_count[:, :, rows], self.column_index[:, :, rows]))
        valid = self.column_valid(rows)
        count, slot = compact(valid)
        columns = torch.gather(self.column_index.expand(*valid.shape).long(), -1, slot.clamp_min(0).long())
        return count, torch.where(slot >= 0, columns, 0).to(torch.int32)

    def with_block_columns(self) -> "VerticalSlashIndex":
        """The same keys in the per-block column layout (itself if already so): what the references,
        masks and comparisons read."""
        if self.column_cover is None:
            return self
        count, columns = self.block_columns()
        return replace(self, column_count=count, column_index=columns, column_cover=None)

    def computed_pairs(self, window: int | None = None) -> torch.Tensor:
        """``[B, H]`` int64: causal (query, key) pairs the index makes a kernel compute."""
        return self.block_pair_counts(window).sum(-1)

    def block_pair_counts(self, window: int | None = None) -> torch.Tensor:
        """``[B, H, Rq]`` int64: causal (query, key) pairs each query block lists."""
        if window is None and self.block_pairs is not None:
            return self.block_pairs
        p0, p1 = query_block_bounds(self.q_len, self.k_len, self.block_size_q, self.range_start.device)
        p0, p1 = p0[:, None], p1[:, None]
        count, start, end = self.block_ranges()
        rects = causal_pairs_in_rects(p0, p1, start, end, window)
        cols = causal_pairs_in_columns(p0, p1, self.column_index, window)
        range_ok = torch.arange(start.shape[-1], device=start.device) < count[..., None]
        rects = torch.where(range_ok, rects, 0).sum(dim=-1)
        cols = torch.where(self.column_valid(), cols, 0).sum(dim=-1)
        return rects + cols

    def without_heads(self, heads: torch.Tensor) -> "VerticalSlashIndex":
        """The same index with every query block of the ``heads [B, H]`` (bool) rows emptied: a kernel
        writes zeros there (no listed key) and computes nothing."""
        emptied = heads[..., None]
        return replace(self, range_count=torch.where(emptied, 0, self.range_count),
                       column_count=torch.where(emptied, 0, self.column_count),
                       block_pairs=None if self.block_pairs is None else torch.where(emptied, 0, self.block_pairs))

    def with_heads_whole(self, heads: torch.Tensor) -> "VerticalSlashIndex":
        """The same keys, except that every query block of the ``heads [B, H]`` (bool) rows lists every key
        its last row can see as one range, and no column: what a head computed dense attended (for
        inspectors and recall; whole ranges ignore ``max_range_keys``, so the result records none; per-head
        ranges are expanded first)."""
        self = self.with_block_ranges()
        _, last_row = query_block_bounds(self.q_len, self.k_len, self.block_size_q, self.range_start.device)
        whole = heads[..., None]
        first_slot = (torch.arange(self.range_start.shape[-1], device=self.range_start.device) == 0)
        slot_whole = whole[..., None] & first_slot
        return replace(
            self, range_count=torch.where(whole, 1, self.range_count),
            range_start=torch.where(slot_whole, 0, self.range_start),
            range_end=torch.where(slot_whole, (last_row + 1).to(self.range_end.dtype)[:, None], self.range_end),
            column_count=torch.where(whole, 0, self.column_count), block_pairs=None, max_range_keys=None)

    def lists_same_entries(self, other: "VerticalSlashIndex") -> bool:
        """Same counts, and the same real ranges and columns in the same order (padding and the
        padded widths may differ): how two converters are compared without an ``L x L`` mask. Per-head
        columns and ranges are compared as the per-block lists they stand for."""
        self, other = self.with_block_lists(), other.with_block_lists()
        if (self.block_size_q, self.q_len, self.k_len) != (other.block_size_q, other.q_len, other.k_len):
            return False
        if not (torch.equal(self.range_count, other.range_count) and torch.equal(self.column_count, other.column_count)):
            return False
        for count, mine, theirs in ((self.range_count, self.range_start, other.range_start),
                                    (self.range_count, self.range_end, other.range_end),
                                    (self.column_count, self.column_index, other.column_index)):
            width = int(count.max()) if count.numel() else 0
            if width > min(mine.shape[-1], theirs.shape[-1]):
                return False
            real = torch.arange(width, device=count.device) < count[..., None]
            if not torch.equal(mine[..., :width][real].long(), theirs[..., :width][real].long()):
                return False
        return True

    def to_dense_mask(self) -> torch.Tensor:
        """``[B, H, Lq, Lk]`` bool of listed keys (no causal mask applied). Debugging and plots only."""
        if self.column_cover is not None or self.ranges_per_head:
            return self.with_block_lists().to_dense_mask()
        b, h, rq, _ = self.range_start.shape
        keys = torch.arange(self.k_len, device=self.range_start.device)
        in_range = (keys >= self.range_start[..., None]) & (keys < self.range_end[..., None])
        per_block = (in_range & self.range_valid()[..., None]).any(dim=-2)
        cols = torch.where(self.column_valid(), self.column_index.long(), 0)
        col_mask = torch.zeros(b, h, rq, self.k_len, dtype=torch.int32, device=keys.device)
        col_mask.scatter_add_(-1, cols, self.column_valid().to(torch.int32))
        per_block = per_block | (col_mask > 0)
        return per_block.repeat_interleave(self.block_size_q, dim=2)[:, :, : self.q_len]


@dataclass(frozen=True)
class VerticalSlashLines:
    vertical_index: torch.Tensor
    vertical_count: torch.Tensor
    slash_offset: torch.Tensor
    slash_count: torch.Tensor
    block_size_q: int
    q_len: int
    k_len: int
    block_pairs: torch.Tensor

    def __post_init__(self) -> None:
        for name, ndim in (("vertical_index", 3), ("vertical_count", 2), ("slash_offset", 3), ("slash_count", 2)):
            _check_int_tensor(name, getattr(self, name), ndim)
        for lines, count in (("vertical_index", "vertical_count"), ("slash_offset", "slash_count")):
            if getattr(self, lines).shape[:2] != getattr(self, count).shape:
                raise ValueError(f"{lines} {tuple(getattr(self, lines).shape)} and {count} "
                                 f"{tuple(getattr(self, count).shape)} disagree on [B, H]")
        if self.slash_count.shape != self.vertical_count.shape:
            raise ValueError("vertical and slash lines must cover the same [B, H]")
        n_q_blocks = -(-self.q_len // self.block_size_q)
        if tuple(self.block_pairs.shape) != (*self.vertical_count.shape, n_q_blocks):
            raise ValueError(f"block_pairs {tuple(self.block_pairs.shape)} must be "
                             f"{(*self.vertical_count.shape, n_q_blocks)}")

    def computed_pairs(self, window: int | None = None) -> torch.Tensor:
        """``[B, H]`` int64 causal pairs computed, as counted by the attention that read the lines
        (``window`` other than None is refused: the kernel counts unwindowed pairs)."""
        if window is not None:
            raise ValueError("VerticalSlashLines counts pairs without a window; use to_index().computed_pairs(window)")
        return self.block_pairs.sum(-1)

    def pairs_lower_bound(self, lines_sorted: bool = False) -> torch.Tensor:
        """``[B, H]`` int64, at most the causal pairs the index of these lines counts (``to_index()
        .computed_pairs()``), with no per-block walk: the larger of the kept columns' pairs and the kept
        diagonals' band pairs. On full-width query blocks the band pairs are exact (``lines_bound._band_pairs``); on the
        last, narrower block they are the diagonals' own pairs with every gap up to its width filled (two
        bands that close touch, so each row sees every offset between them). ``lines_sorted``: the real
        lines already ascend (``select_lines`` output), which spares a sort; repeats count once."""
        if self.slash_offset.is_cuda and lines_sorted:
            from .vertical_slash.triton_lines_bound import lines_pairs_lower_bound_triton

            return lines_pairs_lower_bound_triton(self.slash_offset, self.slash_count, self.vertical_index,
                                                  self.vertical_count, q_len=self.q_len, k_len=self.k_len,
                                                  block_size_q=self.block_size_q)
        return self.pairs_lower_bound_torch(lines_sorted)

    def pairs_lower_bound_torch(self, lines_sorted: bool = False) -> torch.Tensor:
        """``pairs_lower_bound`` in torch ops: the reference of its Triton kernel (``triton_lines_bound``),
        which the GPU runs for ascending lines (about a hundred small ops here, one launch there)."""
        from .lines_bound import lines_pairs_lower_bound

        return lines_pairs_lower_bound(self, lines_sorted)

    def without_heads(self, heads: torch.Tensor) -> "VerticalSlashLines":
        """The same lines with the ``heads [B, H]`` (bool) rows emptied (no kept line: an index built from
        them lists no key there, and its builder has nothing to walk)."""
        return replace(self, vertical_count=torch.where(heads, 0, self.vertical_count),
                       slash_count=torch.where(heads, 0, self.slash_count))

    def to_index(self, slashes_sorted: bool = False, max_range_keys: int | None = None,
                 column_layout: str = "block", ranges_per_head: bool | None = None) -> VerticalSlashIndex:
        """The per-query-block ``VerticalSlashIndex`` of the same keys (what the default attends; also
        inspection, recall, profiles). ``slashes_sorted``: the diagonals ascend in their counts
        (``select_lines`` output), which spares the GPU builder a sort. ``max_range_keys``: ranges cut
        into pieces of at most that many keys; ``column_layout``: ``"block"``, ``"head"`` or ``"auto"``;
        ``ranges_per_head`` (all as ``build_vertical_slash_index`` takes them)."""
        from .vertical_slash import build_vertical_slash_index

        return build_vertical_slash_index(
            self.vertical_index, self.vertical_count, self.slash_offset, self.slash_count,
            q_len=self.q_len, k_len=self.k_len, block_size_q=self.block_size_q, slashes_sorted=slashes_sorted,
            max_range_keys=max_range_keys, column_layout=column_layout, ranges_per_head=ranges_per_head,
        )
