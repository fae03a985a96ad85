"""Cumulative-mass / top-k selection over scored candidates, and block-index construction."""

from __future__ import annotations

import torch

from ..common import compact
from ..geometry import query_block_bounds
from ..indices import BlockSparseIndex
from .naive import KEEP_ALL_MASS, keep_by_cumulative_mass

__all__ = ["KEEP_ALL_MASS", "keep_by_cumulative_mass", "select_lines", "select_lines_naive", "causal_block_layout",
           "select_blocks"]

# Marks empty slots while the kept lines are re-sorted ascending: sorts after every real line index.
_EMPTY_SLOT = torch.iinfo(torch.int32).max


def select_lines_naive(
    scores: torch.Tensor, forced: torch.Tensor, mass: float, max_count: int | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Reference of ``select_lines``: the keep mask of ``keep_by_cumulative_mass`` (every line valid),
    compacted."""
    valid = torch.ones_like(scores, dtype=torch.bool)
    return compact(keep_by_cumulative_mass(scores, valid, forced.expand_as(valid), mass, max_count=max_count))


def select_lines(
    scores: torch.Tensor, forced: torch.Tensor, mass: float, max_count: int | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Lines (key columns or diagonals) kept by the cumulative-mass rule, as a compact sorted list.

    The same selection as ``select_lines_naive`` (ties broken by lower line index), in one stable sort
    instead of a sort, a scatter back to a mask and a second sort to compact it: in decreasing-key
    order (forced first, then by score) the kept lines are a prefix, because the mass before a line
    and its rank among the others only grow along that order. Only the kept prefix is re-sorted.

    Args:
        scores: ``[..., N]`` non-negative line scores (negative values count as 0).
        forced: bool, broadcastable to ``scores``: lines always kept (their mass counts).
        mass: fraction of the total to cover; ``>= KEEP_ALL_MASS`` keeps every line (or, with
            ``max_count``, the forced lines plus exactly the ``max_count`` best others).
        max_count: cap on the non-forced lines kept.

    Returns:
        ``(count [...] int32, index [..., W] int32)``: kept line ids ascending, slots ``>= count`` -1,
        ``W = max(count)`` (at least 1).
    """
    n = scores.shape[-1]
    forced = forced.expand_as(scores)
    scores = scores.float().clamp_min(0.0)
    n_forced = forced.sum(-1, keepdim=True)
    if mass >= KEEP_ALL_MASS and max_count is None:
        count = torch.full(scores.shape[:-1], n, dtype=torch.int32, device=scores.device)
        index = torch.arange(max(n, 1), dtype=torch.int32, device=scores.device).expand(*scores.shape[:-1], -1)
        return count, torch.where(index < n, index, -1).contiguous()
    order = torch.sort(torch.where(forced, float("inf"), scores), dim=-1, descending=True, stable=True).indices
    if mass >= KEEP_ALL_MASS:
        others = torch.clamp(n - n_forced, max=max_count)
    else:
        sorted_scores = torch.gather(scores, -1, order)
        mass_before = torch.cumsum(sorted_scores, -1) - sorted_scores
        target = mass * scores.sum(-1, keepdim=True)
        # Non-forced lines whose preceding mass is still short of the target (a prefix of the others).
        short = (mass_before < target) & (torch.arange(n, device=scores.device) >= n_forced)
        others = short.sum(-1, keepdim=True)
        if max_count is not None:
            others = torch.clamp(others, max=max_count)
    count = (n_forced + others)[..., 0].to(torch.int32)
    width = max(int(count.max()) if count.numel() else 0, 1)
    slots = torch.arange(width, device=scores.device)
    head = order[..., :width].to(torch.int32)
    head = torch.where(slots < count[..., None], head, _EMPTY_SLOT)
    head = torch.sort(head, dim=-1).values
    return count, torch.where(head == _EMPTY_SLOT, -1, head)


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
