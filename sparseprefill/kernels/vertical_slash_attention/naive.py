"""fp32 reference for vertical-slash attention; also the CPU implementation.

Per query block, expands the index's key ranges and columns into one list of key positions per
head and attends over exactly those keys (the GPU kernel walks the ranges in tiles and gathers the
columns; the set of keys is the same).
"""

from __future__ import annotations

import torch

from ..common import attend_gathered
from ..geometry import query_offset
from ..indices import VerticalSlashIndex


def _expand_ranges(start: torch.Tensor, end: torch.Tensor, valid: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``[B, H, M]`` ranges -> ``[B, H, K]`` key positions (padded) and their validity."""
    lengths = torch.where(valid, (end - start).clamp_min(0), 0).long()
    cum = lengths.cumsum(-1)
    total = cum[..., -1] if cum.shape[-1] else torch.zeros(lengths.shape[:-1], dtype=torch.long, device=start.device)
    width = int(total.max()) if total.numel() else 0
    slot = torch.arange(width, device=start.device).expand(*lengths.shape[:-1], width).contiguous()
    which = torch.searchsorted(cum.contiguous(), slot, right=True).clamp_max(max(lengths.shape[-1] - 1, 0))
    before = torch.gather(cum - lengths, -1, which)
    positions = torch.gather(start.long(), -1, which) + (slot - before)
    return positions, slot < total[..., None]


def vertical_slash_attention_naive(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    index: VerticalSlashIndex,
    *,
    scale: float,
    window: int | None,
    softcap: float | None,
    kv_head_index: torch.Tensor,
    out: torch.Tensor,
) -> torch.Tensor:
    q_len, k_len = q.shape[2], k.shape[2]
    offset = query_offset(q_len, k_len)
    bq = index.block_size_q
    range_valid = index.range_valid()
    column_valid = index.column_valid()
    for r in range(index.range_count.shape[2]):
        row0, row1 = r * bq, min((r + 1) * bq, q_len)
        m = max(int(index.range_count[:, :, r].max()), 1)
        range_pos, range_ok = _expand_ranges(
            index.range_start[:, :, r, :m], index.range_end[:, :, r, :m], range_valid[:, :, r, :m]
        )
        c = max(int(index.column_count[:, :, r].max()), 1)
        col_pos = index.column_index[:, :, r, :c].long()
        col_ok = column_valid[:, :, r, :c]
        positions = torch.cat([range_pos, col_pos], dim=-1)
        valid = torch.cat([range_ok, col_ok], dim=-1) & (positions < k_len) & (positions >= 0)
        q_positions = torch.arange(row0, row1, device=q.device) + offset
        block_out = attend_gathered(
            q[:, :, row0:row1], k, v, positions, valid, q_positions, kv_head_index, scale, window, softcap
        )
        out[:, :, row0:row1] = block_out.to(out.dtype)
    return out
