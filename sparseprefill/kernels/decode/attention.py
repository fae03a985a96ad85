"""Decode attention over a per-(batch, KV head) list of KV pages (the ``page_score`` selection).

Inputs are the HF decode layout: ``q [B, Hq, T, D]`` (``T`` decode queries, normally 1), the contiguous
cache ``k, v [B, Hkv, L, D]`` (not repeated for GQA; query head ``h`` reads KV head ``h // G``), and
the page list ``page_index [B, Hkv, W]`` int32 (sorted, unique, slots ``>= page_count`` ignored; -1
padding) with ``page_count [B, Hkv]``; page ``p`` covers keys ``[p * P, (p + 1) * P)``. Query ``t`` sits
at key position ``L - T + t`` and sees the listed keys at or before it. ``page_index=None`` attends to
every page (dense decode; the comparison baseline and the identity path).
"""

from __future__ import annotations

import torch

from ..common import check_qkv, prepare_out
from .naive import sparse_decode_attention_naive
from .pages import DEFAULT_PAGE_SIZE, check_page_size

__all__ = ["MAX_GROUP_ROWS", "sparse_decode_attention", "sparse_decode_attention_naive", "check_page_list"]


# Rows (G * T) one program may carry: the [rows, D] query tile and accumulator live in registers.
MAX_GROUP_ROWS = 64


def check_page_list(page_index: torch.Tensor, page_count: torch.Tensor, b: int, hkv: int,
                    device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """Validate the page-list layout (no host sync: values are not inspected); return int32 tensors."""
    if page_index.ndim != 3 or page_index.shape[:2] != (b, hkv):
        raise ValueError(f"page_index must be [B={b}, Hkv={hkv}, W], got {tuple(page_index.shape)}")
    if page_count.shape != (b, hkv):
        raise ValueError(f"page_count must be [B={b}, Hkv={hkv}], got {tuple(page_count.shape)}")
    for name, t in (("page_index", page_index), ("page_count", page_count)):
        if t.dtype not in (torch.int32, torch.int64):
            raise TypeError(f"{name} must be int32 or int64, got {t.dtype}")
        if t.device != device:
            raise ValueError(f"{name} on {t.device}, q on {device}")
    return page_index.to(torch.int32), page_count.to(torch.int32)


def sparse_decode_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    page_index: torch.Tensor | None = None,
    page_count: torch.Tensor | None = None,
    *,
    page_size: int = DEFAULT_PAGE_SIZE,
    scale: float,
    softcap: float | None = None,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """Attention of the decode queries over the listed KV pages (all pages when ``page_index`` is None).

    Args:
        q: ``[B, Hq, T, D]``; k, v: ``[B, Hkv, L, D]`` with ``T <= L``.
        page_index, page_count: the selection (see the module docstring), both or neither.
        page_size: tokens per page (power of two in [16, 128]).
        scale: softmax scale; softcap: Gemma-2 logit soft-capping or None.
        out: optional ``[B, Hq, T, D]`` destination (may be a strided view).

    Returns:
        ``[B, Hq, T, D]`` in q's dtype (``out`` if given). fp32 accumulation; a query that sees no listed
        key gets zeros.
    """
    b, hq, _, hkv, _, _ = check_qkv(q, k, v)
    if hq % hkv:
        raise ValueError(f"query heads ({hq}) must be a multiple of KV heads ({hkv})")
    check_page_size(page_size)
    if (page_index is None) != (page_count is None):
        raise ValueError("pass page_index and page_count together (or neither, for all pages)")
    if page_index is not None:
        page_index, page_count = check_page_list(page_index, page_count, b, hkv, q.device)
    out = prepare_out(out, q)
    kwargs = dict(page_size=page_size, scale=scale, softcap=softcap, out=out)
    if q.device.type == "cuda":
        # Imported here so the CPU path never needs Triton; on CUDA it is a dependency, not an option.
        from .triton_attention import sparse_decode_attention_triton

        return sparse_decode_attention_triton(q, k, v, page_index, page_count, **kwargs)
    return sparse_decode_attention_naive(q, k, v, page_index, page_count, **kwargs)
