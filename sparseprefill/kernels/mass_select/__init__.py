"""Cumulative-mass / top-k selection over scored candidates, and block-index construction."""

from __future__ import annotations

import torch

from ..common import compact
from ..geometry import query_block_bounds
from ..indices import BlockSparseIndex
from .naive import KEEP_ALL_MASS, keep_by_cumulative_mass

__all__ = ["KEEP_ALL_MASS", "keep_by_cumulative_mass", "causal_block_layout", "select_blocks"]


def causal_block_layout(
    q_len: int, k_len: int, block_size_q: int, block_size_k: int, sink_blocks: int, device: torch.device | str
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(valid, forced)`` ``[Rq, Rk]`` bool: blocks holding at least one causal pair, and the blocks
    every row keeps (the first ``sink_blocks`` and the diagonal blocks spanned by the row's queries)."""
    p0, p1 = query_block_bounds(q_len, k_len, block_size_q, device)
    n_kv = -(-k_len // block_size_k)
    kv_start = torch.arange(n_kv, device=device) * block_size_k
    kv_last = torch.clamp(kv_start + block_size_k, max=k_len) - 1
    valid = kv_start[None, :] <= p1[:, None]
    diagonal = (kv_last[None, :] >= p0[:, None]) & valid
    sink = (torch.arange(n_kv, device=device) < sink_blocks)[None, :] & valid
    return valid, diagonal | sink


def select_blocks(
    block_scores: torch.Tensor,
    *,
    q_len: int,
    k_len: int,
    block_size_q: int,
    block_size_k: int,
    mass: float,
    top_k: int | None = None,
    sink_blocks: int = 1,
) -> BlockSparseIndex:
    """Scores ``[B, H, Rq, Rk]`` (non-negative, e.g. softmaxed block mass) -> ``BlockSparseIndex``
    keeping, per query-block row, sink + diagonal blocks and the best others up to ``mass``."""
    valid, forced = causal_block_layout(q_len, k_len, block_size_q, block_size_k, sink_blocks, block_scores.device)
    if block_scores.shape[-2:] != valid.shape:
        raise ValueError(f"block_scores {tuple(block_scores.shape)} do not match block grid {tuple(valid.shape)}")
    valid = valid.expand_as(block_scores)
    keep = keep_by_cumulative_mass(block_scores, valid, forced.expand_as(block_scores), mass, top_k=top_k)
    count, index = compact(keep)
    return BlockSparseIndex(
        block_count=count, block_index=index, block_size_q=block_size_q, block_size_k=block_size_k,
        q_len=q_len, k_len=k_len,
    )
