"""Line selection for vertical-slash: the cumulative-mass rule over line scores, as a compact list."""

from __future__ import annotations

import torch

from ..mass_select import KEEP_ALL_MASS

__all__ = ["select_lines"]

# Marks empty slots while the kept lines are re-sorted ascending: sorts after every real line index.
_EMPTY_SLOT = torch.iinfo(torch.int32).max


def select_lines(
    scores: torch.Tensor, forced: torch.Tensor, mass: float, max_count: int | None = None, *, trim: bool = True
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
        trim: cut the list to the longest kept count, which reads that count on the host. ``False``
            keeps all ``N`` slots and never waits for the device (the GPU estimate reads its sizes
            once, in the index builder, instead of once per line kind).

    Returns:
        ``(count [...] int32, index [..., W] int32)``: kept line ids ascending, slots ``>= count`` -1,
        ``W = max(count)`` (at least 1) when trimmed, else ``W = N``.
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
    width = max(int(count.max()) if count.numel() else 0, 1) if trim else max(n, 1)
    slots = torch.arange(width, device=scores.device)
    head = order[..., :width].to(torch.int32)
    head = torch.where(slots < count[..., None], head, _EMPTY_SLOT)
    head = torch.sort(head, dim=-1).values
    return count, torch.where(head == _EMPTY_SLOT, -1, head)
