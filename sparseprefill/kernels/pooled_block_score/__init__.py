"""Mean-pooled query/key block scores."""

from __future__ import annotations

import torch

from ..common import check_qkv, resolve_kv_head_index
from .naive import pooled_block_probs_naive

__all__ = ["pooled_block_probs", "pooled_block_probs_naive"]


def pooled_block_probs(
    q: torch.Tensor,
    k: torch.Tensor,
    *,
    scale: float,
    block_size: int,
    softcap: float | None = None,
    kv_head_index: torch.Tensor | None = None,
) -> torch.Tensor:
    """Softmax over causal KV blocks of ``mean(Q block) . mean(K block) * scale``.

    Args:
        q: ``[B, Hq, Lq, D]``; k: ``[B, Hkv, Lk, D]``.

    Returns ``[B, Hq, ceil(Lq / bs), ceil(Lk / bs)]`` fp32, rows summing to 1.
    """
    _, hq, _, hkv, _, _ = check_qkv(q, k, k)
    kv_head_index = resolve_kv_head_index(kv_head_index, hq, hkv, q.device)
    if q.device.type == "cuda":
        from .triton import pooled_block_probs_triton

        return pooled_block_probs_triton(
            q, k, scale=scale, block_size=block_size, softcap=softcap, kv_head_index=kv_head_index
        )
    return pooled_block_probs_naive(
        q, k, scale=scale, block_size=block_size, softcap=softcap, kv_head_index=kv_head_index
    )
