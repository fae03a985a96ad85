"""The per-head column layout of ``VerticalSlashIndex`` (``column_cover``), shared by both builders.

The per-block layout lists, for every query block, the vertical columns outside its bands: O(blocks x
verticals) int32, sized by the widest head. At 128K on the structured input that was 11.9x a
Llama-3.1-8B layer's KV cache (5.9 GB, ``experiments/index_memory.py``), and on real Qwen q/k 94% of
it was padding. The per-head layout keeps one ascending list per head, a count per block of the
leading columns the block reads, and the head's prefix count of kept diagonals; a kernel then skips a
column a band of its block covers with two table lookups (as the fused lines kernel does).

A block reads the head's columns below its last position, or, when its last range reaches that
position (the band of diagonal 0, which the default always keeps), only those below that range: every
column inside it would be skipped. The columns a block reads but skips cost their tile slots, not
their keys: on real Qwen q/k at 8K the blocks read 1.81x the per-block layout's column slots but
1.08x its 32-key tiles (``experiments/index_layout_work.py``); on the structured input at 32K, 1.2-1.3x
its column slots and 1.08-1.24x its attention time (H100).
"""

from __future__ import annotations

import logging
from dataclasses import replace
from enum import Enum

import torch

from ..geometry import query_block_bounds
from ..indices import VerticalSlashIndex

_PAST_EVERY_KEY = torch.iinfo(torch.int32).max  # sorts padding after every real column or diagonal


logger = logging.getLogger("sparseprefill")


class ColumnLayout(str, Enum):
    """How a ``VerticalSlashIndex`` stores its vertical columns: ``BLOCK``, a compacted list per query
    block (O(blocks x verticals)); ``HEAD``, one list per head that each block masks (O(verticals + Lk));
    ``AUTO``, ``BLOCK`` unless its column table would not fit the device memory still available
    (``resolve_column_layout``)."""

    AUTO = "auto"
    BLOCK = "block"
    HEAD = "head"


# ``AUTO`` builds per-head lists where the per-block column table would take more than this share of
# the device memory still available: the same keys at 1.08-1.24x the attention time (H100, stop 36)
# instead of an out-of-memory error (the table is 11.5x a Llama-3.1-8B layer's KV cache at 128K, and
# grows with heads and batch). Half: the attention's output and the next layer's work need the rest.
BLOCK_COLUMNS_MAX_SHARE = 0.5


def available_device_memory(device: torch.device) -> int | None:
    """Bytes a new tensor on ``device`` can still take: the driver's free memory plus what PyTorch's
    allocator holds unused; None off CUDA (the CPU reference builds the per-block layout)."""
    if device.type != "cuda":
        return None
    free, _ = torch.cuda.mem_get_info(device)
    return free + torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)


_warned_auto_head = False


def resolve_column_layout(layout: ColumnLayout | str, block_table_bytes: int, device: torch.device) -> ColumnLayout:
    """The layout to build: ``layout`` itself unless ``AUTO``, which is ``HEAD`` where the per-block
    column table (``block_table_bytes``) would exceed ``BLOCK_COLUMNS_MAX_SHARE`` of
    ``available_device_memory(device)``, else ``BLOCK``. The switch is logged once per process; the
    index it builds says so (``columns_per_head``) and the patched model's stats count it."""
    global _warned_auto_head
    layout = ColumnLayout(layout)
    if layout is not ColumnLayout.AUTO:
        return layout
    available = available_device_memory(device)
    if available is None or block_table_bytes <= BLOCK_COLUMNS_MAX_SHARE * available:
        return ColumnLayout.BLOCK
    if not _warned_auto_head:
        logger.warning("sparseprefill: the per-block column index would take %.2f GB of the %.2f GB available; "
                       "building per-head column lists instead (the same keys, slower attention)",
                       block_table_bytes / 1e9, available / 1e9)
        _warned_auto_head = True
    return ColumnLayout.HEAD


def diagonal_prefix(slash_offset: torch.Tensor, slash_count: torch.Tensor, k_len: int) -> torch.Tensor:
    """``[B, H, Lk + 2]`` int32: ``prefix[t]`` = real diagonals of ``slash_offset [B, H, Ns]`` (first
    ``slash_count`` slots) below ``t``, for ``t`` in ``[0, Lk + 1]`` (repeats counted)."""
    real = torch.arange(slash_offset.shape[-1], device=slash_offset.device) < slash_count[..., None]
    ascending = torch.where(real, slash_offset.to(torch.int32), _PAST_EVERY_KEY).sort(dim=-1).values.contiguous()
    thresholds = torch.arange(k_len + 2, dtype=torch.int32, device=slash_offset.device)
    thresholds = thresholds.expand(*ascending.shape[:-1], k_len + 2).contiguous()
    return torch.searchsorted(ascending, thresholds, out_int32=True)


def head_column_list(vertical_index: torch.Tensor, vertical_count: torch.Tensor) -> torch.Tensor:
    """``[B, H, Nv]`` int32: each head's real columns (first ``vertical_count``, ``>= 0``), ascending and
    unique, padded with int32's maximum (past every limit a block reads up to)."""
    real = torch.arange(vertical_index.shape[-1], device=vertical_index.device) < vertical_count[..., None]
    real = real & (vertical_index >= 0)
    ascending = torch.where(real, vertical_index.to(torch.int32), _PAST_EVERY_KEY).sort(dim=-1).values
    repeat = torch.zeros_like(real)
    repeat[..., 1:] = ascending[..., 1:] == ascending[..., :-1]
    return torch.where(repeat, _PAST_EVERY_KEY, ascending).sort(dim=-1).values.contiguous()


def to_head_columns(index: VerticalSlashIndex, vertical_index: torch.Tensor, vertical_count: torch.Tensor,
                    cover: torch.Tensor, width: int | None = None) -> VerticalSlashIndex:
    """The same keys as ``index`` (per-block columns of ``vertical_index [B, H, Nv]``, whole merged
    ranges: before any range split) with per-head columns: ``column_index [B, H, 1, W]``, per-block
    counts of the leading columns read, ``column_cover = cover`` (``diagonal_prefix`` of the same lines).
    ``width``: keep ``W`` = that many slots (at least the largest ``vertical_count``; the GPU estimate's
    lists are ``Lk`` wide), else ``Nv``."""
    if index.max_range_keys is not None:
        raise ValueError("to_head_columns reads each block's last whole range; give it the index before the "
                         f"range split (max_range_keys={index.max_range_keys})")
    if index.ranges_per_head:
        raise ValueError("to_head_columns reads each block's last whole range from per-block lists; with per-head "
                         "ranges give the column limit to to_head_columns_below (head_ranges.head_range_table)")
    _, p1 = query_block_bounds(index.q_len, index.k_len, index.block_size_q, index.range_count.device)
    last = (index.range_count.long() - 1).clamp_min(0)[..., None]
    last_start = torch.gather(index.range_start, -1, last)[..., 0]
    last_end = torch.gather(index.range_end, -1, last)[..., 0]
    reaches_p1 = (index.range_count > 0) & (last_end == p1 + 1)
    limit = torch.where(reaches_p1, last_start, p1 + 1)
    return to_head_columns_below(index, vertical_index, vertical_count, cover, limit, width)


def to_head_columns_below(index: VerticalSlashIndex, vertical_index: torch.Tensor, vertical_count: torch.Tensor,
                          cover: torch.Tensor, limit: torch.Tensor, width: int | None = None) -> VerticalSlashIndex:
    """``to_head_columns`` with each block's column limit given (``limit [B, H, Rq]``: block r reads the
    head's columns below it): every column from the limit up to the block's last position lies in the
    band that ends there."""
    count, columns = head_columns_below(vertical_index, vertical_count, limit, width)
    return replace(index, column_count=count, column_index=columns, column_cover=cover)


def head_columns_below(vertical_index: torch.Tensor, vertical_count: torch.Tensor, limit: torch.Tensor,
                       width: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """``(column_count [B, H, Rq] int32, column_index [B, H, 1, W] int32)``: each head's column list
    (``head_column_list``, ``width`` slots if given) and, per block, how many of its columns lie below
    ``limit [B, H, Rq]``."""
    columns = head_column_list(vertical_index, vertical_count)
    if width is not None:
        columns = columns[..., :max(width, 1)].contiguous()
    count = torch.searchsorted(columns, limit.to(torch.int32).contiguous(), out_int32=True)  # columns below it
    return count, columns[:, :, None, :]


__all__ = ["BLOCK_COLUMNS_MAX_SHARE", "ColumnLayout", "available_device_memory", "diagonal_prefix",
           "head_column_list", "head_columns_below", "resolve_column_layout", "to_head_columns", "to_head_columns_below"]
