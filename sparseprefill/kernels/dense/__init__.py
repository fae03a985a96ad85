"""Dense causal attention with window, soft-cap and key padding: the exact fallback."""

from __future__ import annotations

import torch

from ..common import check_qkv, prepare_out
from .naive import dense_attention_naive

__all__ = ["dense_attention", "dense_attention_naive"]


def dense_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    scale: float,
    window: int | None = None,
    softcap: float | None = None,
    key_padding_mask: torch.Tensor | None = None,
    out: torch.Tensor | None = None,
    return_weights: bool = False,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Exact causal attention, bottom-right aligned.

    Args:
        q: ``[B, Hq, Lq, D]``; k, v: ``[B, Hkv, Lk, D]``.
        key_padding_mask: ``[B, Lk]`` bool, True for real tokens.
        return_weights: also return the ``[B, Hq, Lq, Lk]`` fp32 probabilities (memory O(L^2)).

    Returns:
        ``(out [B, Hq, Lq, D], weights or None)``.
    """
    b, hq, lq, hkv, lk, _ = check_qkv(q, k, v)
    if hq % hkv:
        raise ValueError(f"query heads ({hq}) must be a multiple of KV heads ({hkv})")
    if key_padding_mask is not None and tuple(key_padding_mask.shape) != (b, lk):
        raise ValueError(f"key_padding_mask must be [B, Lk] = [{b}, {lk}], got {tuple(key_padding_mask.shape)}")
    out = prepare_out(out, q)
    return dense_attention_naive(
        q, k, v, scale=scale, window=window, softcap=softcap, key_padding_mask=key_padding_mask,
        out=out, return_weights=return_weights,
    )
