"""Selection by cumulative mass (XAttention's per-row threshold, FlexPrefill's gamma).

Given non-negative scores over candidates (KV blocks of a query-block row, or vertical/slash lines),
keep the forced candidates, then the others in decreasing score, until the kept mass reaches
``mass * total``. ``mass >= KEEP_ALL_MASS`` keeps every valid candidate: a float cumulative sum
never reaches exactly the total, and fp32 softmax underflows to 0 far from the mass.
"""

from __future__ import annotations

import torch

KEEP_ALL_MASS = 1.0


def keep_by_cumulative_mass(
    scores: torch.Tensor,
    valid: torch.Tensor,
    forced: torch.Tensor,
    mass: float,
    top_k: int | None = None,
    max_count: int | None = None,
) -> torch.Tensor:
    """``[..., N]`` scores/valid/forced -> ``[..., N]`` bool keep mask (a subset of ``valid``).

    ``top_k`` (if given) replaces the mass rule: forced plus the ``top_k`` best others.
    ``max_count`` caps the number of non-forced candidates kept by the mass rule.
    """
    forced = forced & valid
    if top_k is None and mass >= KEEP_ALL_MASS:
        if max_count is None:
            return valid.clone()
        # Keep-all capped at max_count is a fixed top-k budget (MInference's vertical/slash sizes).
        top_k = max_count
    scores = torch.where(valid, scores.float().clamp_min(0.0), 0.0)
    # Forced candidates sort first (their mass counts toward the target), invalid ones last.
    sort_key = torch.where(forced, float("inf"), torch.where(valid, scores, -1.0))
    order = torch.argsort(sort_key, dim=-1, descending=True, stable=True)
    sorted_scores = torch.gather(scores, -1, order)
    sorted_forced = torch.gather(forced, -1, order)
    sorted_valid = torch.gather(valid, -1, order)
    rank_among_others = torch.cumsum((~sorted_forced & sorted_valid).to(torch.int64), -1)
    if top_k is not None:
        keep_sorted = sorted_forced | (sorted_valid & (rank_among_others <= top_k))
    else:
        total = scores.sum(-1, keepdim=True)
        mass_before = torch.cumsum(sorted_scores, -1) - sorted_scores
        keep_sorted = sorted_forced | (sorted_valid & (mass_before < mass * total))
        if max_count is not None:
            keep_sorted = keep_sorted & (sorted_forced | (rank_among_others <= max_count))
    keep = torch.zeros_like(valid)
    keep.scatter_(-1, order, keep_sorted)
    return keep
