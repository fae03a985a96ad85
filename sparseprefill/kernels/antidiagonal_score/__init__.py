"""Strided antidiagonal block scoring (XAttention)."""

from __future__ import annotations

import torch

from ..common import check_qkv, resolve_kv_head_index
from .naive import antidiagonal_block_mass_naive

__all__ = ["antidiagonal_block_mass", "antidiagonal_block_mass_naive"]


def antidiagonal_block_mass(
    q: torch.Tensor,
    k: torch.Tensor,
    *,
    scale: float,
    stride: int,
    block_size: int,
    softcap: float | None = None,
    kv_head_index: torch.Tensor | None = None,
) -> torch.Tensor:
    """Estimated attention mass of each ``block_size`` x ``block_size`` block.

    Args:
        q: ``[B, Hq, Lq, D]``; k: ``[B, Hkv, Lk, D]``; ``block_size`` a multiple of ``stride``.

    Returns:
        ``[B, Hq, ceil(Lq / block_size), ceil(Lk / block_size)]`` fp32; each query-block row sums to 1
        over its causally visible blocks.
    """
    _, hq, _, hkv, _, _ = check_qkv(q, k, k)
    if block_size % stride:
        raise ValueError(f"block_size ({block_size}) must be a multiple of stride ({stride})")
    kv_head_index = resolve_kv_head_index(kv_head_index, hq, hkv, q.device)
    if q.device.type == "cuda":
        from .triton import antidiagonal_block_mass_triton

        return antidiagonal_block_mass_triton(
            q, k, scale=scale, stride=stride, block_size=block_size, softcap=softcap, kv_head_index=kv_head_index
        )
    return antidiagonal_block_mass_naive(
        q, k, scale=scale, stride=stride, block_size=block_size, softcap=softcap, kv_head_index=kv_head_index
    )
