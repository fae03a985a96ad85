"""Vertical-slash attention: per query block, merged key ranges plus single key columns."""

from __future__ import annotations

import torch

from ..common import check_qkv, prepare_out, resolve_kv_head_index
from ..indices import VerticalSlashIndex
from .naive import vertical_slash_attention_naive

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
    return vertical_slash_attention_naive(
        q, k, v, index, scale=scale, window=window, softcap=softcap, kv_head_index=kv_head_index, out=out
    )
