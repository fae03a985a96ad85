"""Vertical-slash sparse attention (MInference): estimate line scores from the last queries, select
key columns (verticals) and diagonals (slashes), convert them to a per-query-block index, attend.

Each public function checks its inputs and runs the Triton kernel on CUDA (``triton_*.py``) or its
fp32 reference (``naive.py``) elsewhere. See README.md for the index layout and measured speed.
"""

from __future__ import annotations

from dataclasses import replace

import torch

from ..common import (
    check_qkv,
    prepare_sparse_attention,
    resolve_kv_head_index,
)
from ..indices import VerticalSlashIndex, VerticalSlashLines
from ..recall import checked_recall_blocks
from .head_columns import ColumnLayout, diagonal_prefix, resolve_column_layout, to_head_columns
from .head_ranges import build_per_head_index, head_range_table, resolve_ranges_per_head
from .naive import (
    block_recall_naive,
    build_vertical_slash_index_naive,
    select_lines_naive,
    split_ranges_naive,
    vertical_slash_attention_naive,
    vertical_slash_lines_attention_naive,
    vertical_slash_scores_naive,
)
from .select import select_line_kinds, select_lines

__all__ = ["ColumnLayout", "vertical_slash_block_recall", "vertical_slash_scores", "vertical_slash_scores_naive", "select_lines", "select_line_kinds", "select_lines_naive", "build_vertical_slash_index", "build_vertical_slash_index_naive", "range_piece_keys", "range_pieces_pay", "split_ranges_naive", "vertical_slash_attention", "vertical_slash_attention_naive", "vertical_slash_lines", "vertical_slash_lines_attention", "vertical_slash_lines_attention_naive"]

def vertical_slash_scores(
    q: torch.Tensor,
    k: torch.Tensor,
    *,
    scale: float,
    last_queries: int,
    softcap: float | None = None,
    kv_head_index: torch.Tensor | None = None,
    query_windows: int = 1,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Estimated attention mass per key column and per diagonal.

    Args:
        q: ``[B, Hq, Lq, D]``; k: ``[B, Hkv, Lk, D]``.
        last_queries: query rows per scoring window.
        query_windows: windows of ``last_queries`` rows spread over the prompt
            (``geometry.spread_window_ends``; 1: the last rows alone).

    Returns:
        ``(vertical [B, Hq, Lk], slash [B, Hq, Lk])`` fp32, the mean over the windows of each window's
        scores: ``vertical[j]`` the mean probability of key ``j`` over the window's rows, ``slash[d]``
        the mean probability on diagonal ``d = query_pos - key_pos``. Each sums to 1 over its last
        dimension.
    """
    _, hq, _, hkv, _, _ = check_qkv(q, k, k)
    if last_queries < 1 or query_windows < 1:
        raise ValueError(f"line scores need last_queries >= 1 and query_windows >= 1, got {last_queries} and "
                         f"{query_windows}")
    kv_head_index = resolve_kv_head_index(kv_head_index, hq, hkv, q.device)
    kw = dict(scale=scale, last_queries=last_queries, softcap=softcap, kv_head_index=kv_head_index,
              query_windows=query_windows)
    if q.device.type == "cuda":
        from .triton_estimate import vertical_slash_scores_triton

        return vertical_slash_scores_triton(q, k, **kw)
    return vertical_slash_scores_naive(q, k, **kw)


def range_piece_keys(head_dim: int, block_size_q: int, element_bytes: int) -> int:
    """The range piece width (``build_vertical_slash_index(max_range_keys=...)``) that lets the GPU
    kernel walk ranges as one flat loop for this head_dim, query block and element size: its key tile."""
    from .triton_attention import vertical_slash_tile_sizes

    return vertical_slash_tile_sizes(head_dim, block_size_q, element_bytes)[1]


def range_pieces_pay(head_dim: int) -> bool:
    """Whether range pieces measured faster than whole bands at this head_dim (``RANGE_PIECES_ABOVE_HEAD_DIM``)."""
    from .triton_attention import RANGE_PIECES_ABOVE_HEAD_DIM

    return head_dim > RANGE_PIECES_ABOVE_HEAD_DIM


def build_vertical_slash_index(
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
    ranges_per_head: bool | None = None,
) -> VerticalSlashIndex:
    """Build the per-query-block index from per-head lines.

    Args:
        vertical_index: ``[B, H, Nv]`` key columns, sorted ascending in the first ``vertical_count``
            (repeated columns are listed once).
        vertical_count: ``[B, H]``.
        slash_offset: ``[B, H, Ns]`` diagonals ``d = query_pos - key_pos >= 0``, first ``slash_count`` real.
        slash_count: ``[B, H]``.
        slashes_sorted: the caller guarantees the real offsets ascend (as ``select_lines`` returns
            them), which spares the GPU builder a sort.
        max_range_keys: cut every merged range into consecutive pieces of at most this many keys
            (``index.max_range_keys`` records it); the GPU kernel then walks ranges in one flat loop
            when its key tile is that wide (``range_piece_keys``).
        column_layout: ``"block"``, each query block's columns outside its bands, compacted
            (O(blocks x verticals) memory); ``"head"``, one column list per head that every block reads
            and masks by its bands (``column_cover``; O(verticals + Lk)); ``"auto"``, block unless its
            table would exceed ``BLOCK_COLUMNS_MAX_SHARE`` of the device memory still available
            (``head_columns.resolve_column_layout``). The same keys either way.
        ranges_per_head: one table of block-relative ranges per head (``head_ranges.py``; O(runs)
            memory per head instead of O(blocks x runs)) instead of a list per block; None: with per-head
            columns (``HEAD_RANGES_WITH_HEAD_COLUMNS``). The same keys either way.
    """
    if max_range_keys is not None and max_range_keys < 1:
        raise ValueError(f"max_range_keys must be >= 1 or None, got {max_range_keys}")
    try:
        column_layout = ColumnLayout(column_layout)
    except ValueError:
        raise ValueError(f"column_layout must be one of {[m.value for m in ColumnLayout]}, got {column_layout!r}") from None
    if vertical_index.shape[:2] != vertical_count.shape or slash_offset.shape[:2] != slash_count.shape:
        raise ValueError("line tensors and their counts disagree on [B, H]")
    if vertical_index.device.type == "cuda":
        from .triton_index import build_vertical_slash_index_triton

        return build_vertical_slash_index_triton(
            vertical_index, vertical_count, slash_offset, slash_count, q_len=q_len, k_len=k_len,
            block_size_q=block_size_q, slashes_sorted=slashes_sorted, max_range_keys=max_range_keys,
            column_layout=column_layout, ranges_per_head=ranges_per_head,
        )
    if column_layout is ColumnLayout.HEAD and resolve_ranges_per_head(ranges_per_head, True):
        return build_per_head_index(vertical_index, vertical_count, slash_offset, slash_count, q_len=q_len,
                                    k_len=k_len, block_size_q=block_size_q, max_range_keys=max_range_keys)
    index = build_vertical_slash_index_naive(
        vertical_index, vertical_count, slash_offset, slash_count, q_len=q_len, k_len=k_len, block_size_q=block_size_q
    )
    int32_bytes = 4
    table_bytes = index.column_index.numel() * int32_bytes  # the compacted per-block table just built
    per_head_columns = resolve_column_layout(column_layout, table_bytes, vertical_index.device) is ColumnLayout.HEAD
    if per_head_columns:
        index = to_head_columns(index, vertical_index, vertical_count,
                                diagonal_prefix(slash_offset, slash_count, k_len))
    if resolve_ranges_per_head(ranges_per_head, per_head_columns):
        count, start, end, _ = head_range_table(slash_offset, slash_count, q_len=q_len, k_len=k_len,
                                                block_size_q=block_size_q, max_range_keys=max_range_keys)
        return replace(index, range_count=count, range_start=start, range_end=end, ranges_per_head=True,
                       max_range_keys=max_range_keys)
    return index if max_range_keys is None else split_ranges_naive(index, max_range_keys)


def vertical_slash_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    index: VerticalSlashIndex,
    *,
    scale: float,
    window: int | None = None,
    softcap: float | None = None,
    kv_head_index: torch.Tensor | None = None,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """Causal attention over the key ranges and columns listed by ``index``.

    Args and return as ``block_sparse_attention``; ``index`` is a ``VerticalSlashIndex`` of shape
    ``[B, Hq, ceil(Lq / block_size_q), ...]``.
    """
    kv_head_index, out = prepare_sparse_attention(q, k, v, index, index.range_count.shape[:2], kv_head_index, out)
    if q.device.type == "cuda":
        # Imported here so the CPU path never needs Triton; on CUDA it is a dependency, not an option.
        from .triton_attention import vertical_slash_attention_triton

        return vertical_slash_attention_triton(
            q, k, v, index, scale=scale, window=window, softcap=softcap, kv_head_index=kv_head_index, out=out
        )
    return vertical_slash_attention_naive(
        q, k, v, index, scale=scale, window=window, softcap=softcap, kv_head_index=kv_head_index, out=out
    )


def vertical_slash_lines(
    vertical_index: torch.Tensor,
    vertical_count: torch.Tensor,
    slash_offset: torch.Tensor,
    slash_count: torch.Tensor,
    *,
    q_len: int,
    k_len: int,
    block_size_q: int,
) -> VerticalSlashLines:
    """Per-head lines (as ``build_vertical_slash_index`` takes them) packaged for
    ``vertical_slash_lines_attention``, with an empty ``block_pairs [B, H, Rq]`` for its pair counts.
    Nothing is read back to the host."""
    n_blocks = -(-q_len // block_size_q)
    block_pairs = torch.empty(*vertical_count.shape, n_blocks, dtype=torch.int64, device=vertical_index.device)
    return VerticalSlashLines(
        vertical_index=vertical_index, vertical_count=vertical_count, slash_offset=slash_offset,
        slash_count=slash_count, block_size_q=block_size_q, q_len=q_len, k_len=k_len, block_pairs=block_pairs,
    )


def vertical_slash_lines_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    lines: VerticalSlashLines,
    *,
    scale: float,
    window: int | None = None,
    softcap: float | None = None,
    kv_head_index: torch.Tensor | None = None,
    out: torch.Tensor | None = None,
    lines_sorted: bool = False,
) -> torch.Tensor:
    """Causal attention over the keys of ``lines.to_index()`` without building that index: the GPU
    kernel derives each query block's ranges and columns from the per-head lines (O(lines) memory, no
    host wait), and writes each block's computed causal pairs into ``lines.block_pairs``.

    Args as ``vertical_slash_attention``; ``lines_sorted``: each line list already ascends in its
    first count (``select_lines`` output), which spares the GPU path two sorts.
    """
    kv_head_index, out = prepare_sparse_attention(q, k, v, lines, lines.vertical_count.shape, kv_head_index, out)
    if q.device.type == "cuda":
        from .triton_lines import vertical_slash_lines_attention_triton

        return vertical_slash_lines_attention_triton(
            q, k, v, lines, scale=scale, window=window, softcap=softcap, kv_head_index=kv_head_index, out=out,
            lines_sorted=lines_sorted,
        )
    return vertical_slash_lines_attention_naive(
        q, k, v, lines, scale=scale, window=window, softcap=softcap, kv_head_index=kv_head_index, out=out
    )


def vertical_slash_block_recall(
    q: torch.Tensor,
    k: torch.Tensor,
    index: VerticalSlashIndex,
    blocks: torch.Tensor,
    *,
    scale: float,
    softcap: float | None = None,
    kv_head_index: torch.Tensor | None = None,
) -> torch.Tensor:
    """Mean recall of ``index`` on whole query blocks: for each query block ``blocks[i]`` (an index row),
    the share of each row's exact causal attention mass that the block's listed keys hold, averaged
    over the block's rows.

    Args:
        q: ``[B, Hq, Lq, D]``; k: ``[B, Hkv, Lk, D]``; index: ``VerticalSlashIndex`` over ``Hq`` heads.
        blocks: ``[nb]`` int query-block numbers (rows of the index), on the host (a list or CPU
            tensor: they are checked there, so the check never waits for the device).

    Returns:
        ``[B, Hq, nb]`` fp32 in [0, 1]. The GPU kernel never holds the ``rows x Lk`` probabilities; the
        reference (``block_recall_naive``: ``recall.window_recall`` per block) does.
    """
    kv_head_index, blocks = checked_recall_blocks(q, k, index, blocks, kv_head_index)
    if q.device.type == "cuda":
        from .triton_recall import block_recall_triton

        return block_recall_triton(q, k, index, blocks, scale=scale, softcap=softcap, kv_head_index=kv_head_index)
    return block_recall_naive(q, k, index, blocks, scale=scale, softcap=softcap, kv_head_index=kv_head_index)
