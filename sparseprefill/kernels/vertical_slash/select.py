"""Line selection for vertical-slash: the cumulative-mass rule over line scores, as a compact list.

Plain torch on every device except CUDA, where one sort and one Triton program per row and kind
(``triton_select.py``) replace the ~25 torch ops (the estimate is bound by host time per op there)."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from ..mass_select import KEEP_ALL_MASS

__all__ = ["select_lines", "select_line_kinds"]

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
    count, index = select_line_kinds(scores[None], forced[None], [mass], [max_count], trim=trim)
    return count[0], index[0]


def select_line_kinds(
    scores: torch.Tensor,
    forced: torch.Tensor,
    masses: Sequence[float],
    max_counts: Sequence[int | None],
    *,
    trim: bool = True,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``select_lines`` over ``K`` kinds of lines at once, each with its own mass and cap: the
    vertical-slash estimate selects columns and diagonals in one pass of torch ops (one sort instead of
    one per kind). On the GPU every torch op costs host time whatever its size, and the estimate is
    bound by that host time, not by the device.

    Args:
        scores: ``[K, ..., N]``; forced: bool, broadcastable to ``scores``.
        masses, max_counts: ``K`` values each, for kind ``i`` = ``scores[i]``.

    Returns:
        ``(count [K, ...] int32, index [K, ..., W] int32)``: for each kind exactly what
        ``select_lines(scores[i], forced[i], masses[i], max_counts[i])`` returns, except that ``W`` is
        the widest kind's width (narrower kinds padded with -1).
    """
    kinds, n = scores.shape[0], scores.shape[-1]
    if len(masses) != kinds or len(max_counts) != kinds:
        raise ValueError(f"{kinds} kinds of lines need {kinds} masses and caps, got {len(masses)} and {len(max_counts)}")
    device = scores.device
    forced = forced.expand_as(scores)
    scores = scores.float().clamp_min(0.0)
    n_forced = forced.sum(-1, keepdim=True)
    keep_all = [mass >= KEEP_ALL_MASS for mass in masses]
    if all(keep_all) and all(cap is None for cap in max_counts):
        count = torch.full(scores.shape[:-1], n, dtype=torch.int32, device=device)
        index = torch.arange(max(n, 1), dtype=torch.int32, device=device).expand(*scores.shape[:-1], -1)
        return count, torch.where(index < n, index, -1).contiguous()
    if device.type == "cuda":
        from .triton_select import select_line_kinds_triton

        count, index = select_line_kinds_triton(scores, forced, list(masses), list(max_counts), KEEP_ALL_MASS)
        if trim:
            index = index[..., :max(int(count.max()) if count.numel() else 0, 1)]
        return count, index
    per_kind = _PerKind(kinds, scores.dim(), device)
    order = torch.sort(torch.where(forced, float("inf"), scores), dim=-1, descending=True, stable=True).indices
    others = n - n_forced
    if not all(keep_all):
        sorted_scores = torch.gather(scores, -1, order)
        mass_before = torch.cumsum(sorted_scores, -1) - sorted_scores
        target = per_kind(masses) * scores.sum(-1, keepdim=True)
        # Non-forced lines whose preceding mass is still short of the target (a prefix of the others).
        short = (mass_before < target) & (torch.arange(n, device=device) >= n_forced)
        by_mass = short.sum(-1, keepdim=True)
        others = by_mass if not any(keep_all) else torch.where(per_kind(keep_all), others, by_mass)
    if any(cap is not None for cap in max_counts):
        cap = per_kind([n if cap is None else cap for cap in max_counts])
        others = torch.clamp(others, max=cap) if isinstance(cap, int) else torch.minimum(others, cap)
    count = (n_forced + others)[..., 0].to(torch.int32)
    width = max(int(count.max()) if count.numel() else 0, 1) if trim else max(n, 1)
    slots = torch.arange(width, device=device)
    head = order[..., :width].to(torch.int32)
    head = torch.where(slots < count[..., None], head, _EMPTY_SLOT)
    head = torch.sort(head, dim=-1).values
    return count, torch.where(head == _EMPTY_SLOT, -1, head)


class _PerKind:
    """One value per kind, broadcast over ``[K, ..., 1]``: a Python scalar when all kinds agree, else a
    device tensor built by ``where`` from a kind index (a host-to-device copy of the values would wait
    for the device queue)."""

    def __init__(self, kinds: int, dims: int, device: torch.device):
        self.kinds, self.shape, self.device = kinds, (kinds,) + (1,) * (dims - 1), device
        self._kind_index = None

    def __call__(self, values: Sequence):
        if all(value == values[0] for value in values):
            return values[0]
        if self._kind_index is None:
            self._kind_index = torch.arange(self.kinds, device=self.device).view(self.shape)
        out = torch.full(self.shape, values[0], device=self.device)
        for i in range(1, self.kinds):
            out = torch.where(self._kind_index == i, values[i], out)
        return out
