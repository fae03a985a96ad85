"""The attention ops registered with ``torch.library``, so compiled graphs treat them as opaque ops.

Index dataclasses are unpacked into tensors and ints at this boundary; ``window`` and ``softcap``
use 0 for "none" (the schema has no optional scalars that survive every torch version equally).
Each op writes into ``out`` (declared mutated) so kernels keep writing straight into the caller's
``[B, Lq, Hq, D]`` buffer view.
"""

from __future__ import annotations

import torch

from .indices import BlockSparseIndex, VerticalSlashIndex, VerticalSlashLines

NAMESPACE = "sparseprefill"


def _none_if_zero(value):
    return None if value == 0 else value


@torch.library.custom_op(f"{NAMESPACE}::block_sparse_attention", mutates_args=("out",))
def block_sparse_attention_op(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, block_count: torch.Tensor, block_index: torch.Tensor,
    kv_head_index: torch.Tensor, out: torch.Tensor, block_size_q: int, block_size_k: int, scale: float,
    window: int, softcap: float, column_count: torch.Tensor | None = None, column_index: torch.Tensor | None = None,
) -> None:
    from .block_sparse import block_sparse_attention

    index = BlockSparseIndex(block_count=block_count, block_index=block_index, block_size_q=block_size_q,
                             block_size_k=block_size_k, q_len=q.shape[2], k_len=k.shape[2],
                             column_count=column_count, column_index=column_index)
    block_sparse_attention(q, k, v, index, scale=scale, window=_none_if_zero(window),
                           softcap=_none_if_zero(softcap), kv_head_index=kv_head_index, out=out)


@block_sparse_attention_op.register_fake
def _(q, k, v, block_count, block_index, kv_head_index, out, block_size_q, block_size_k, scale, window, softcap,
      column_count=None, column_index=None):
    return None


@torch.library.custom_op(f"{NAMESPACE}::vertical_slash_attention", mutates_args=("out",))
def vertical_slash_attention_op(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, range_count: torch.Tensor, range_start: torch.Tensor,
    range_end: torch.Tensor, column_count: torch.Tensor, column_index: torch.Tensor, kv_head_index: torch.Tensor,
    out: torch.Tensor, block_size_q: int, scale: float, window: int, softcap: float, max_range_keys: int = 0,
    column_cover: torch.Tensor | None = None, ranges_per_head: bool = False,
) -> None:
    from .vertical_slash import vertical_slash_attention

    index = VerticalSlashIndex(range_count=range_count, range_start=range_start, range_end=range_end,
                               column_count=column_count, column_index=column_index, block_size_q=block_size_q,
                               q_len=q.shape[2], k_len=k.shape[2], max_range_keys=max_range_keys or None,
                               column_cover=column_cover, ranges_per_head=ranges_per_head)
    vertical_slash_attention(q, k, v, index, scale=scale, window=_none_if_zero(window),
                             softcap=_none_if_zero(softcap), kv_head_index=kv_head_index, out=out)


@vertical_slash_attention_op.register_fake
def _(q, k, v, range_count, range_start, range_end, column_count, column_index, kv_head_index, out, block_size_q,
      scale, window, softcap, max_range_keys=0, column_cover=None, ranges_per_head=False):
    return None


@torch.library.custom_op(f"{NAMESPACE}::vertical_slash_lines_attention", mutates_args=("out", "block_pairs"))
def vertical_slash_lines_attention_op(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, vertical_index: torch.Tensor, vertical_count: torch.Tensor,
    slash_offset: torch.Tensor, slash_count: torch.Tensor, block_pairs: torch.Tensor, kv_head_index: torch.Tensor,
    out: torch.Tensor, block_size_q: int, scale: float, window: int, softcap: float, lines_sorted: bool,
) -> None:
    from .vertical_slash import vertical_slash_lines_attention

    lines = VerticalSlashLines(vertical_index=vertical_index, vertical_count=vertical_count, slash_offset=slash_offset,
                               slash_count=slash_count, block_size_q=block_size_q, q_len=q.shape[2], k_len=k.shape[2],
                               block_pairs=block_pairs)
    vertical_slash_lines_attention(q, k, v, lines, scale=scale, window=_none_if_zero(window),
                                   softcap=_none_if_zero(softcap), kv_head_index=kv_head_index, out=out,
                                   lines_sorted=lines_sorted)


@vertical_slash_lines_attention_op.register_fake
def _(q, k, v, vertical_index, vertical_count, slash_offset, slash_count, block_pairs, kv_head_index, out,
      block_size_q, scale, window, softcap, lines_sorted):
    return None


@torch.library.custom_op(f"{NAMESPACE}::block_sparse_block_recall", mutates_args=())
def block_sparse_block_recall_op(
    q: torch.Tensor, k: torch.Tensor, block_count: torch.Tensor, block_index: torch.Tensor,
    kv_head_index: torch.Tensor, blocks: list[int], block_size_q: int, block_size_k: int, scale: float,
    softcap: float, column_count: torch.Tensor | None = None, column_index: torch.Tensor | None = None,
    per_row: bool = False,
) -> torch.Tensor:
    from .block_sparse import block_sparse_block_recall

    index = BlockSparseIndex(block_count=block_count, block_index=block_index, block_size_q=block_size_q,
                             block_size_k=block_size_k, q_len=q.shape[2], k_len=k.shape[2],
                             column_count=column_count, column_index=column_index)
    return block_sparse_block_recall(q, k, index, blocks, scale=scale, softcap=_none_if_zero(softcap),
                                     kv_head_index=kv_head_index, per_row=per_row)


@block_sparse_block_recall_op.register_fake
def _(q, k, block_count, block_index, kv_head_index, blocks, block_size_q, block_size_k, scale, softcap,
      column_count=None, column_index=None, per_row=False):
    return q.new_empty(q.shape[0], q.shape[1], len(blocks), *((block_size_q,) if per_row else ()),
                       dtype=torch.float32)


def call_block_sparse_block_recall(q, k, index: BlockSparseIndex, blocks: list[int], *, scale, softcap,
                                   kv_head_index, per_row: bool = False) -> torch.Tensor:
    """``block_sparse_block_recall`` through its op (traceable: the checked blocks are fixed by the shapes)."""
    return torch.ops.sparseprefill.block_sparse_block_recall(
        q, k, index.block_count, index.block_index, kv_head_index, [int(b) for b in blocks], index.block_size_q,
        index.block_size_k, float(scale), float(softcap or 0.0), index.column_count, index.column_index, per_row,
    )


def call_block_sparse(q, k, v, index: BlockSparseIndex, *, scale, window, softcap, kv_head_index, out):
    torch.ops.sparseprefill.block_sparse_attention(
        q, k, v, index.block_count, index.block_index, kv_head_index, out, index.block_size_q,
        index.block_size_k, float(scale), int(window or 0), float(softcap or 0.0), index.column_count,
        index.column_index,
    )
    return out


def call_vertical_slash(q, k, v, index: VerticalSlashIndex, *, scale, window, softcap, kv_head_index, out):
    torch.ops.sparseprefill.vertical_slash_attention(
        q, k, v, index.range_count, index.range_start, index.range_end, index.column_count, index.column_index,
        kv_head_index, out, index.block_size_q, float(scale), int(window or 0), float(softcap or 0.0),
        int(index.max_range_keys or 0), index.column_cover, index.ranges_per_head,
    )
    return out


def call_vertical_slash_lines(q, k, v, lines: VerticalSlashLines, *, scale, window, softcap, kv_head_index, out,
                              lines_sorted: bool = False):
    torch.ops.sparseprefill.vertical_slash_lines_attention(
        q, k, v, lines.vertical_index, lines.vertical_count, lines.slash_offset, lines.slash_count,
        lines.block_pairs, kv_head_index, out, lines.block_size_q, float(scale), int(window or 0),
        float(softcap or 0.0), bool(lines_sorted),
    )
    return out
