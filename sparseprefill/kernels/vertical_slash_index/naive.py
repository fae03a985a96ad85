"""Vertical/slash lines -> per-query-block ranges and columns (``VerticalSlashIndex``).

For query block ``r`` with key positions ``[p0, p1]``, diagonal ``d`` touches keys
``[p0 - d, p1 - d]``: a band one block wide. Bands are sorted by start and merged where they
overlap or touch (running max of ends, as in interval merging), so the kernel walks few long ranges
instead of many short ones. Vertical columns already inside a range are dropped, which keeps ranges
and columns disjoint (the kernel would count a duplicated key twice).
"""

from __future__ import annotations

import torch

from ..common import compact
from ..geometry import query_block_bounds
from ..indices import VerticalSlashIndex

_FAR = torch.iinfo(torch.int64).max // 4  # sorts invalid bands last; never a real position


def build_vertical_slash_index_naive(
    vertical_index: torch.Tensor,
    vertical_count: torch.Tensor,
    slash_offset: torch.Tensor,
    slash_count: torch.Tensor,
    *,
    q_len: int,
    k_len: int,
    block_size_q: int,
) -> VerticalSlashIndex:
    device = vertical_index.device
    p0, p1 = query_block_bounds(q_len, k_len, block_size_q, device)
    p0, p1 = p0[:, None], p1[:, None]  # [Rq, 1]

    # --- ranges from slashes: [B, H, Rq, Ns]
    offsets = slash_offset.long()[:, :, None, :]
    slot_ok = (torch.arange(slash_offset.shape[-1], device=device) < slash_count[..., None].long())[:, :, None, :]
    start = (p0 - offsets).clamp_min(0)
    end = p1 - offsets + 1
    band_ok = slot_ok & (end > 0)
    start = torch.where(band_ok, start, _FAR)
    end = torch.where(band_ok, end, _FAR)
    start, order = torch.sort(start, dim=-1)
    end = torch.gather(end, -1, order)
    band_ok = torch.gather(band_ok.expand_as(start), -1, order)
    reach = torch.cummax(end, dim=-1).values
    reach_before = torch.cat([torch.full_like(reach[..., :1], -1), reach[..., :-1]], dim=-1)
    opens = band_ok & (start > reach_before)
    group = torch.cumsum(opens.to(torch.int64), -1) - 1
    group = torch.where(band_ok, group, start.shape[-1] - 1).clamp_min(0)
    merged_start = torch.full_like(start, _FAR).scatter_reduce(-1, group, start, reduce="amin")
    merged_end = torch.full_like(end, -1).scatter_reduce(-1, group, torch.where(band_ok, end, -1), reduce="amax")
    range_count = opens.sum(-1)
    width = max(int(range_count.max()) if range_count.numel() else 0, 1)
    slots = torch.arange(width, device=device)
    real = slots < range_count[..., None]
    range_start = torch.where(real, merged_start[..., :width], 0)
    range_end = torch.where(real, merged_end[..., :width], 0)

    # --- columns not covered by a range and visible to the block's last row
    cols = vertical_index.long()[:, :, None, :].expand(*range_count.shape, vertical_index.shape[-1])
    col_ok = (torch.arange(vertical_index.shape[-1], device=device) < vertical_count[..., None].long())[:, :, None, :]
    # Drop repeats of the previous (sorted) column: a key listed twice would be counted twice.
    repeat = torch.zeros_like(vertical_index, dtype=torch.bool)
    repeat[..., 1:] = vertical_index[..., 1:] == vertical_index[..., :-1]
    col_ok = col_ok & ~repeat[:, :, None, :] & (cols >= 0) & (cols <= p1)
    searchable = torch.where(real, range_start, _FAR).contiguous()
    which = (torch.searchsorted(searchable, cols.contiguous(), right=True) - 1).clamp_min(0)
    covered = (torch.gather(range_start, -1, which) <= cols) & (cols < torch.gather(range_end, -1, which))
    covered = covered & torch.gather(real, -1, which)
    keep = col_ok & ~covered
    # Columns are sorted ascending per head by the caller; compact preserves order.
    column_count, picked = compact(keep)
    column_index = torch.gather(cols, -1, picked.clamp_min(0).long())
    column_index = torch.where(picked >= 0, column_index, 0)

    return VerticalSlashIndex(
        range_count=range_count.to(torch.int32),
        range_start=range_start.to(torch.int32),
        range_end=range_end.to(torch.int32),
        column_count=column_count,
        column_index=column_index.to(torch.int32),
        block_size_q=block_size_q,
        q_len=q_len,
        k_len=k_len,
    )
