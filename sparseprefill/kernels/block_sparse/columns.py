"""Per-head key columns joined to a block-sparse index (``BlockSparseIndex.column_index``).

Block scores average over a block's rows, so a few rows that each put their mass on one key far back
(long-range retrieval) keep no block: the key's block holds a negligible share of the block average.
A key many rows retrieve is a vertical column of the head, which the last queries' scores find. This
builder gives every query block the head's columns that its last row can see and that no kept block
holds, so the block kernel attends them after its blocks in the same online softmax.

Plain torch on every device; on the GPU the column lists keep their full width, so the host never
waits for the device to learn a count.
"""

from __future__ import annotations

from dataclasses import replace

import torch

from ..common import compact
from ..geometry import query_block_bounds
from ..indices import BlockSparseIndex

__all__ = ["blocks_with_columns", "check_block_columns"]


def check_block_columns(blocks: BlockSparseIndex, vertical_index: torch.Tensor, vertical_count: torch.Tensor) -> None:
    if vertical_index.dim() != 3 or vertical_index.shape[:2] != vertical_count.shape:
        raise ValueError(f"vertical_index {tuple(vertical_index.shape)} must be [B, H, Nv] over vertical_count "
                         f"{tuple(vertical_count.shape)} [B, H]")
    if tuple(vertical_count.shape) != tuple(blocks.block_count.shape[:2]):
        raise ValueError(f"columns cover [B, H] = {tuple(vertical_count.shape)}, the block index "
                         f"{tuple(blocks.block_count.shape[:2])}")
    if blocks.column_index is not None:
        raise ValueError("the block index already lists columns")


def blocks_with_columns(
    blocks: BlockSparseIndex,
    vertical_index: torch.Tensor,
    vertical_count: torch.Tensor,
    *,
    trim: bool | None = None,
) -> BlockSparseIndex:
    """``blocks`` plus, per query block, the columns of ``vertical_index [B, H, Nv]`` (ascending in the
    first ``vertical_count [B, H]`` entries; repeats listed once) that the block's last row can see
    and that lie in none of the block's kept KV blocks (``BlockSparseIndex.column_index``, ascending).
    ``trim`` (default: on the CPU only) cuts the lists to the longest count, which reads it on the host.
    """
    check_block_columns(blocks, vertical_index, vertical_count)
    device = blocks.block_index.device
    trim = device.type != "cuda" if trim is None else trim
    valid = blocks.slot_valid()
    n_kv_blocks = blocks.num_kv_blocks
    kept = torch.zeros(*valid.shape[:3], n_kv_blocks + 1, dtype=torch.bool, device=device)
    kept.scatter_(-1, torch.where(valid, blocks.block_index.long(), n_kv_blocks), True)
    _, last_row = query_block_bounds(blocks.q_len, blocks.k_len, blocks.block_size_q, device)
    cols = vertical_index.long()
    slots = torch.arange(cols.shape[-1], device=device)
    col_ok = (slots < vertical_count[..., None].long()) & (cols >= 0) & (cols < blocks.k_len)
    repeat = torch.zeros_like(col_ok)
    repeat[..., 1:] = cols[..., 1:] == cols[..., :-1]
    col_ok = (col_ok & ~repeat)[:, :, None, :] & (cols[:, :, None, :] <= last_row[:, None])
    per_block = cols[:, :, None, :].expand(*col_ok.shape)
    in_kept_block = torch.gather(kept, -1, per_block.clamp(0, blocks.k_len - 1) // blocks.block_size_k)
    column_count, picked = compact(col_ok & ~in_kept_block, trim=trim)
    column_index = torch.where(picked >= 0, torch.gather(per_block, -1, picked.clamp_min(0).long()), 0)
    return replace(blocks, column_count=column_count, column_index=column_index.to(torch.int32))
