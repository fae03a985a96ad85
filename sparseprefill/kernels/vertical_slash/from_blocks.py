"""A block-sparse index plus per-head key columns, as one ``VerticalSlashIndex``.

Block scores average over a block's 128 rows, so a few rows that each put their mass on one key far
back (long-range retrieval) keep no block: the key's block holds a negligible share of the block
average. A key many rows retrieve is a vertical column of the head, which the last queries' scores
find. This builder lists, per query block, the kept KV blocks as key ranges (runs of consecutive
blocks merged into one range) and the head's columns that fall outside them as single keys, so the
vertical-slash kernel attends both in one pass.

Plain torch on every device (no host read on the GPU: lists stay at their full widths there).
"""

from __future__ import annotations

import torch

from ..common import compact
from ..geometry import query_block_bounds
from ..indices import BlockSparseIndex, VerticalSlashIndex

__all__ = ["blocks_with_columns_index"]

# Start of a padding slot while runs are merged: above every real key position.
_PAST_EVERY_KEY = torch.iinfo(torch.int32).max


def check_block_columns(blocks: BlockSparseIndex, vertical_index: torch.Tensor, vertical_count: torch.Tensor) -> None:
    if vertical_index.dim() != 3 or vertical_index.shape[:2] != vertical_count.shape:
        raise ValueError(f"vertical_index {tuple(vertical_index.shape)} must be [B, H, Nv] over vertical_count "
                         f"{tuple(vertical_count.shape)} [B, H]")
    if tuple(vertical_count.shape) != tuple(blocks.block_count.shape[:2]):
        raise ValueError(f"columns cover [B, H] = {tuple(vertical_count.shape)}, the block index "
                         f"{tuple(blocks.block_count.shape[:2])}")


def blocks_with_columns_index(
    blocks: BlockSparseIndex,
    vertical_index: torch.Tensor,
    vertical_count: torch.Tensor,
    *,
    trim: bool | None = None,
) -> VerticalSlashIndex:
    """The keys of ``blocks`` plus the columns ``vertical_index [B, H, Nv]`` (ascending in the first
    ``vertical_count [B, H]`` entries; repeats listed once) as a ``VerticalSlashIndex`` with the same
    query blocks.

    Per query block: one range per run of consecutive kept KV blocks (``[first * bs, min((last + 1) * bs,
    Lk))``), then the columns visible to the block's last row that no kept block holds (disjoint from
    the ranges, as the index contract requires). ``trim`` (default: on the CPU only) cuts the lists to
    their longest count, which reads the counts on the host.
    """
    check_block_columns(blocks, vertical_index, vertical_count)
    trim = blocks.block_index.device.type != "cuda" if trim is None else trim
    device = blocks.block_index.device
    ids = blocks.block_index.long()
    valid = blocks.slot_valid()
    # Runs of consecutive ids (the ids ascend, the real ones form a prefix of each row).
    follows = torch.zeros_like(valid)
    follows[..., 1:] = ids[..., 1:] == ids[..., :-1] + 1
    opens = valid & ~follows
    width = ids.shape[-1]
    run = torch.where(valid, torch.cumsum(opens.to(torch.int64), -1) - 1, width - 1).clamp_min(0)
    first_key = ids * blocks.block_size_k
    start = torch.where(valid, first_key, _PAST_EVERY_KEY)
    end = torch.where(valid, (first_key + blocks.block_size_k).clamp(max=blocks.k_len), -1)
    range_start = torch.full_like(start, _PAST_EVERY_KEY).scatter_reduce(-1, run, start, reduce="amin")
    range_end = torch.full_like(end, -1).scatter_reduce(-1, run, end, reduce="amax")
    range_count = opens.sum(-1)
    if trim:
        width = max(int(range_count.max()) if range_count.numel() else 0, 1)
    real = torch.arange(width, device=device) < range_count[..., None]
    range_start = torch.where(real, range_start[..., :width], 0)
    range_end = torch.where(real, range_end[..., :width], 0)

    n_kv_blocks = blocks.num_kv_blocks
    kept = torch.zeros(*valid.shape[:3], n_kv_blocks + 1, dtype=torch.bool, device=device)
    kept.scatter_(-1, torch.where(valid, ids, n_kv_blocks), True)
    _, last_row = query_block_bounds(blocks.q_len, blocks.k_len, blocks.block_size_q, device)
    cols = vertical_index.long()
    slots = torch.arange(cols.shape[-1], device=device)
    col_ok = (slots < vertical_count[..., None].long()) & (cols >= 0) & (cols < blocks.k_len)
    repeat = torch.zeros_like(col_ok)
    repeat[..., 1:] = cols[..., 1:] == cols[..., :-1]
    col_ok = (col_ok & ~repeat)[:, :, None, :] & (cols[:, :, None, :] <= last_row[:, None])
    per_block = cols[:, :, None, :].expand(*col_ok.shape)
    in_kept_block = torch.gather(kept, -1, (per_block.clamp(0, blocks.k_len - 1) // blocks.block_size_k))
    column_count, picked = compact(col_ok & ~in_kept_block, trim=trim)
    column_index = torch.gather(per_block, -1, picked.clamp_min(0).long())
    column_index = torch.where(picked >= 0, column_index, 0)
    return VerticalSlashIndex(
        range_count=range_count.to(torch.int32), range_start=range_start.to(torch.int32),
        range_end=range_end.to(torch.int32), column_count=column_count, column_index=column_index.to(torch.int32),
        block_size_q=blocks.block_size_q, q_len=blocks.q_len, k_len=blocks.k_len,
    )
