"""Index conversion for vertical-slash attention."""

from __future__ import annotations

import torch

from ..indices import VerticalSlashIndex
from .naive import build_vertical_slash_index_naive

__all__ = ["build_vertical_slash_index", "build_vertical_slash_index_naive"]


def build_vertical_slash_index(
    vertical_index: torch.Tensor,
    vertical_count: torch.Tensor,
    slash_offset: torch.Tensor,
    slash_count: torch.Tensor,
    *,
    q_len: int,
    k_len: int,
    block_size_q: int,
) -> VerticalSlashIndex:
    """Build the per-query-block index from per-head lines.

    Args:
        vertical_index: ``[B, H, Nv]`` key columns, sorted ascending in the first ``vertical_count``
            (repeated columns are listed once).
        vertical_count: ``[B, H]``.
        slash_offset: ``[B, H, Ns]`` diagonals ``d = query_pos - key_pos >= 0``, first ``slash_count`` real.
        slash_count: ``[B, H]``.
    """
    if vertical_index.shape[:2] != vertical_count.shape or slash_offset.shape[:2] != slash_count.shape:
        raise ValueError("line tensors and their counts disagree on [B, H]")
    if vertical_index.device.type == "cuda":
        from .triton import build_vertical_slash_index_triton

        return build_vertical_slash_index_triton(
            vertical_index, vertical_count, slash_offset, slash_count, q_len=q_len, k_len=k_len,
            block_size_q=block_size_q,
        )
    return build_vertical_slash_index_naive(
        vertical_index, vertical_count, slash_offset, slash_count, q_len=q_len, k_len=k_len, block_size_q=block_size_q
    )
