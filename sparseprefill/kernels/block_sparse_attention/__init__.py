"""Block-sparse attention: per query block, a count and sorted KV block ids (``BlockSparseIndex``)."""

from __future__ import annotations

import torch

from ..common import check_qkv, prepare_out, resolve_kv_head_index
from ..indices import BlockSparseIndex
from .naive import block_sparse_attention_naive



def _check_triton_block_size(block_size_q: int) -> None:
    if block_size_q < 16 or block_size_q & (block_size_q - 1):
        raise ValueError(f"the GPU kernel needs a power-of-two query block size >= 16, got {block_size_q}")


__all__ = ["block_sparse_attention", "block_sparse_attention_naive"]


def block_sparse_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    index: BlockSparseIndex,
    *,
    scale: float,
    window: int | None = None,
    softcap: float | None = None,
    kv_head_index: torch.Tensor | None = None,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """Causal attention over the KV blocks listed by ``index``.

    Args:
        q: ``[B, Hq, Lq, D]``; k, v: ``[B, Hkv, Lk, D]``, queries bottom-right aligned to the keys.
        index: ``BlockSparseIndex`` with shape ``[B, Hq, ceil(Lq / block_size_q), N]``.
        scale: softmax scale (the model's ``scaling``).
        window: sliding window (keys ``p - window < j <= p``) or None.
        softcap: Gemma-2 style logit soft-capping ``c * tanh(s / c)`` or None.
        kv_head_index: ``[Hq]`` KV head of each query head; default ``h // (Hq / Hkv)``.
        out: optional ``[B, Hq, Lq, D]`` destination (may be a strided view).

    Returns:
        ``[B, Hq, Lq, D]`` in q's dtype (``out`` if given).
    """
    b, hq, lq, hkv, lk, _ = check_qkv(q, k, v)
    if index.block_count.shape[:2] != (b, hq) or index.q_len != lq or index.k_len != lk:
        raise ValueError(
            f"index is for [B={index.block_count.shape[0]}, H={index.block_count.shape[1]}, Lq={index.q_len}, "
            f"Lk={index.k_len}], inputs are [B={b}, Hq={hq}, Lq={lq}, Lk={lk}]"
        )
    kv_head_index = resolve_kv_head_index(kv_head_index, hq, hkv, q.device)
    out = prepare_out(out, q)
    if q.device.type == "cuda":
        # Imported here so the CPU path never needs Triton; on CUDA it is a dependency, not an option.
        from .triton import block_sparse_attention_triton

        _check_triton_block_size(index.block_size_q)
        return block_sparse_attention_triton(
            q, k, v, index, scale=scale, window=window, softcap=softcap, kv_head_index=kv_head_index, out=out
        )
    return block_sparse_attention_naive(
        q, k, v, index, scale=scale, window=window, softcap=softcap, kv_head_index=kv_head_index, out=out
    )
