"""Triton index conversion for vertical-slash attention; same output as ``naive.py``.

One program per (query block, batch x head). Diagonal ``d`` covers keys ``[p0 - d, p1 - d]`` of the
block (``p0, p1`` its first and last query position). With offsets sorted ascending, walking them
backwards yields bands in ascending start order, merged on the fly by a scalar loop (the merge is
inherently sequential; there are few bands per block). Column ``j`` is covered iff some diagonal
lies in ``[p0 - j, p1 - j]``: a binary search over the sorted offsets, vectorised over a tile of
columns; surviving columns are compacted in order with a cumulative sum. Memory is
``O(blocks x (ranges + columns))`` with the counts' true maxima, never ``blocks x all lines``.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ..indices import VerticalSlashIndex


@triton.jit
def _vs_index_kernel(
    VerticalIndex, VerticalCount, SlashOffset, SlashCount,
    RangeCount, RangeStart, RangeEnd, ColumnCount, ColumnIndex,
    num_heads, q_len, q_offset, max_ranges, max_columns, n_vertical_slots, n_slash_slots,
    BLOCK_Q: tl.constexpr, COL_TILE: tl.constexpr, SEARCH_STEPS: tl.constexpr,
):
    r = tl.program_id(0)
    pid_bh = tl.program_id(1)
    p0 = r * BLOCK_Q + q_offset
    p1 = tl.minimum(r * BLOCK_Q + BLOCK_Q, q_len) - 1 + q_offset
    n_blocks = tl.num_programs(0)
    slash_base = SlashOffset + pid_bh * n_slash_slots
    n_slash = tl.load(SlashCount + pid_bh)
    out_row = pid_bh * n_blocks + r

    # --- merge diagonal bands into sorted, disjoint ranges
    n_ranges = 0
    cur_start = -1
    cur_end = -1
    for i in range(0, n_slash):
        d = tl.load(slash_base + n_slash - 1 - i)
        end = p1 - d + 1
        start = tl.maximum(p0 - d, 0)
        valid = end > 0
        have = cur_end >= 0
        emit = valid & have & (start > cur_end)
        tl.store(RangeStart + out_row * max_ranges + n_ranges, cur_start, mask=emit)
        tl.store(RangeEnd + out_row * max_ranges + n_ranges, cur_end, mask=emit)
        n_ranges += emit.to(tl.int32)
        restart = valid & (emit | (cur_end < 0))
        cur_start = tl.where(restart, start, cur_start)
        cur_end = tl.where(restart, end, tl.where(valid, tl.maximum(cur_end, end), cur_end))
    last = cur_end >= 0
    tl.store(RangeStart + out_row * max_ranges + n_ranges, cur_start, mask=last)
    tl.store(RangeEnd + out_row * max_ranges + n_ranges, cur_end, mask=last)
    n_ranges += last.to(tl.int32)
    tl.store(RangeCount + out_row, n_ranges)

    # --- columns visible to the block and not inside any band
    n_vertical = tl.load(VerticalCount + pid_bh)
    vertical_base = VerticalIndex + pid_bh * n_vertical_slots
    n_columns = 0
    for c0 in range(0, n_vertical, COL_TILE):
        slots = c0 + tl.arange(0, COL_TILE)
        slot_ok = slots < n_vertical
        cols = tl.load(vertical_base + slots, mask=slot_ok, other=-1)
        before = tl.load(vertical_base + slots - 1, mask=slot_ok & (slots > 0), other=-1)
        keep = slot_ok & (cols >= 0) & (cols <= p1) & (cols != before)
        # lower bound of (p0 - col) among the sorted offsets, then test it against p1 - col
        target = p0 - cols
        lo = tl.zeros([COL_TILE], tl.int32)
        hi = tl.zeros([COL_TILE], tl.int32) + n_slash
        for _ in tl.static_range(SEARCH_STEPS):
            active = lo < hi
            mid = (lo + hi) // 2
            value = tl.load(slash_base + mid, mask=active, other=0)
            go_right = active & (value < target)
            lo = tl.where(go_right, mid + 1, lo)
            hi = tl.where(active & ~go_right, mid, hi)
        found = tl.load(slash_base + lo, mask=lo < n_slash, other=0)
        covered = (lo < n_slash) & (found <= p1 - cols)
        keep = keep & ~covered
        position = n_columns + tl.cumsum(keep.to(tl.int32), 0) - 1
        tl.store(ColumnIndex + out_row * max_columns + position, cols, mask=keep)
        n_columns += tl.sum(keep.to(tl.int32), 0)
    tl.store(ColumnCount + out_row, n_columns)


def build_vertical_slash_index_triton(
    vertical_index: torch.Tensor,
    vertical_count: torch.Tensor,
    slash_offset: torch.Tensor,
    slash_count: torch.Tensor,
    *,
    q_len: int,
    k_len: int,
    block_size_q: int,
) -> VerticalSlashIndex:
    b, h = vertical_count.shape
    device = vertical_index.device
    n_blocks = triton.cdiv(q_len, block_size_q)
    verticals = vertical_index.to(torch.int32).contiguous()
    slashes = slash_offset.to(torch.int32).contiguous()
    n_vertical_slots, n_slash_slots = verticals.shape[-1], slashes.shape[-1]
    # One host read of the two maxima sizes the outputs. Merged ranges other than the one clipped at
    # key 0 are as wide as the block's rows (the last block may be shorter) and separated by gaps,
    # so a block holds at most k_len / (narrowest block + 1) + 2 of them.
    max_slash, max_vertical = (int(x) for x in torch.stack([slash_count.max(), vertical_count.max()]).tolist())
    narrowest = min(block_size_q, q_len - (n_blocks - 1) * block_size_q)
    max_ranges = max(min(max_slash, k_len // (narrowest + 1) + 2), 1)
    max_columns = max(max_vertical, 1)
    range_count = torch.empty(b, h, n_blocks, dtype=torch.int32, device=device)
    column_count = torch.empty_like(range_count)
    range_start = torch.zeros(b, h, n_blocks, max_ranges, dtype=torch.int32, device=device)
    range_end = torch.zeros_like(range_start)
    column_index = torch.zeros(b, h, n_blocks, max_columns, dtype=torch.int32, device=device)
    search_steps = max(1, int(n_slash_slots).bit_length())
    _vs_index_kernel[(n_blocks, b * h)](
        verticals, vertical_count.to(torch.int32).contiguous(), slashes, slash_count.to(torch.int32).contiguous(),
        range_count, range_start, range_end, column_count, column_index,
        h, q_len, k_len - q_len, max_ranges, max_columns, n_vertical_slots, n_slash_slots,
        BLOCK_Q=block_size_q, COL_TILE=128, SEARCH_STEPS=search_steps,
    )
    return VerticalSlashIndex(
        range_count=range_count, range_start=range_start, range_end=range_end, column_count=column_count,
        column_index=column_index, block_size_q=block_size_q, q_len=q_len, k_len=k_len,
    )


__all__ = ["build_vertical_slash_index_triton"]
