"""Vertical-slash attention: per query block, merged key ranges plus single key columns."""

from __future__ import annotations

import torch

from ..common import check_qkv, prepare_out, resolve_kv_head_index
from ..indices import VerticalSlashIndex
from .naive import vertical_slash_attention_naive



def _check_triton_block_size(block_size_q: int) -> None:
    if block_size_q < 16 or block_size_q & (block_size_q - 1):
        raise ValueError(f"the GPU kernel needs a power-of-two query block size >= 16, got {block_size_q}")


__all__ = ["vertical_slash_attention", "vertical_slash_attention_naive"]


def vertical_slash_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    index: VerticalSlashIndex,
    *,
    scale: float,
    window: int | None = None,
    softcap: float | None = None,
    kv_head_index: torch.Tensor | None = None,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """Causal attention over the key ranges and columns listed by ``index``.

    Args and return as ``block_sparse_attention``; ``index`` is a ``VerticalSlashIndex`` of shape
    ``[B, Hq, ceil(Lq / block_size_q), ...]``.
    """
    b, hq, lq, hkv, lk, _ = check_qkv(q, k, v)
    if index.range_count.shape[:2] != (b, hq) or index.q_len != lq or index.k_len != lk:
        raise ValueError(
            f"index is for [B={index.range_count.shape[0]}, H={index.range_count.shape[1]}, Lq={index.q_len}, "
            f"Lk={index.k_len}], inputs are [B={b}, Hq={hq}, Lq={lq}, Lk={lk}]"
        )
    kv_head_index = resolve_kv_head_index(kv_head_index, hq, hkv, q.device)
    out = prepare_out(out, q)
    if q.device.type == "cuda":
        # Imported here so the CPU path never needs Triton; on CUDA it is a dependency, not an option.
        from .triton import vertical_slash_attention_triton

        _check_triton_block_size(index.block_size_q)
        return vertical_slash_attention_triton(
            q, k, v, index, scale=scale, window=window, softcap=softcap, kv_head_index=kv_head_index, out=out
        )
    return vertical_slash_attention_naive(
        q, k, v, index, scale=scale, window=window, softcap=softcap, kv_head_index=kv_head_index, out=out
    )
