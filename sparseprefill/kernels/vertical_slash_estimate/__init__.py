"""Vertical and slash line scores from the last queries (MInference estimation)."""

from __future__ import annotations

import torch

from ..common import check_qkv, resolve_kv_head_index
from .naive import vertical_slash_scores_naive

__all__ = ["vertical_slash_scores", "vertical_slash_scores_naive"]


def vertical_slash_scores(
    q: torch.Tensor,
    k: torch.Tensor,
    *,
    scale: float,
    last_queries: int,
    softcap: float | None = None,
    kv_head_index: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Estimated attention mass per key column and per diagonal.

    Args:
        q: ``[B, Hq, Lq, D]``; k: ``[B, Hkv, Lk, D]``.
        last_queries: number of final query rows that score every key.

    Returns:
        ``(vertical [B, Hq, Lk], slash [B, Hq, Lk])`` fp32; ``vertical[j]`` is the mean probability of
        key ``j``, ``slash[d]`` the mean probability on diagonal ``d = query_pos - key_pos``. Each
        sums to 1 over its last dimension.
    """
    _, hq, _, hkv, _, _ = check_qkv(q, k, k)
    kv_head_index = resolve_kv_head_index(kv_head_index, hq, hkv, q.device)
    if q.device.type == "cuda":
        from .triton import vertical_slash_scores_triton

        return vertical_slash_scores_triton(
            q, k, scale=scale, last_queries=last_queries, softcap=softcap, kv_head_index=kv_head_index
        )
    return vertical_slash_scores_naive(
        q, k, scale=scale, last_queries=last_queries, softcap=softcap, kv_head_index=kv_head_index
    )
