"""Dense causal attention with window, soft-cap and key padding: the exact fallback
(``dense_attention``, fp32 on every device) and the fast dense path (``fast_dense_attention``: SDPA on
the GPU wherever it computes the same thing)."""

from __future__ import annotations

import torch

from ..common import check_qkv, prepare_out
from .naive import dense_attention_naive
from .sdpa import dense_attention_sdpa, sdpa_supports

__all__ = ["dense_attention", "dense_attention_naive", "dense_attention_sdpa", "fast_dense_attention"]


def _check_dense_inputs(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                        key_padding_mask: torch.Tensor | None) -> None:
    b, hq, _, hkv, lk, _ = check_qkv(q, k, v)
    if hq % hkv:
        raise ValueError(f"query heads ({hq}) must be a multiple of KV heads ({hkv})")
    if key_padding_mask is not None and tuple(key_padding_mask.shape) != (b, lk):
        raise ValueError(f"key_padding_mask must be [B, Lk] = [{b}, {lk}], got {tuple(key_padding_mask.shape)}")


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
    _check_dense_inputs(q, k, v, key_padding_mask)
    out = prepare_out(out, q)
    return dense_attention_naive(
        q, k, v, scale=scale, window=window, softcap=softcap, key_padding_mask=key_padding_mask,
        out=out, return_weights=return_weights,
    )


def fast_dense_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    scale: float,
    window: int | None = None,
    softcap: float | None = None,
    key_padding_mask: torch.Tensor | None = None,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """The same attention as ``dense_attention`` (``q [B, Hq, Lq, D]``, ``k, v [B, Hkv, Lk, D]`` ->
    ``out [B, Hq, Lq, D]``), at dense speed on the GPU: SDPA in the inputs' dtype where it can express
    the call (no soft-cap, window shorter than the keys or key padding: ``sdpa.sdpa_supports``), the
    fp32 reference elsewhere and on the CPU (where the whole package runs the reference)."""
    if q.device.type == "cuda" and sdpa_supports(q.shape[2], k.shape[2], window=window, softcap=softcap,
                                                 key_padding_mask=key_padding_mask):
        _check_dense_inputs(q, k, v, key_padding_mask)
        return dense_attention_sdpa(q, k, v, scale=scale, out=prepare_out(out, q))
    return dense_attention(q, k, v, scale=scale, window=window, softcap=softcap, key_padding_mask=key_padding_mask,
                           out=out)[0]
