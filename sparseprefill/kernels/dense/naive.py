"""fp32 dense causal attention (bottom-right aligned), with sliding window, soft-capping and a key
padding mask. The exact fallback of the sparse path and the reference the tests build on.

Queries are processed in chunks so memory stays ``O(chunk * Lk)``; GQA is a reshape of the query
heads into ``[B, Hkv, group, ...]``, never a repeated K/V.
"""

from __future__ import annotations

import torch

from ..common import masked_softmax_attend
from ..geometry import query_offset, visible

# Rows per chunk: bounds the fp32 score buffer at Hq * 512 * Lk floats.
QUERY_CHUNK = 512


def dense_attention_naive(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    scale: float,
    window: int | None,
    softcap: float | None,
    key_padding_mask: torch.Tensor | None,
    out: torch.Tensor,
    return_weights: bool = False,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Exact causal attention (the fallback and the accuracy reference): ``q [B, Hq, Lq, D]``,
    ``k, v [B, Hkv, Lk, D]``, optional ``key_padding_mask [B, Lk]`` -> ``(out [B, Hq, Lq, D], weights
    [B, Hq, Lq, Lk] fp32 or None)``; computed in fp32, ``QUERY_CHUNK`` query rows at a time."""
    b, hq, q_len, d = q.shape
    hkv, k_len = k.shape[1], k.shape[2]
    group = hq // hkv
    offset = query_offset(q_len, k_len)
    keys = k.float()[:, :, None]
    values = v.float()[:, :, None]
    k_pos = torch.arange(k_len, device=q.device)
    weights = torch.empty(b, hq, q_len, k_len, dtype=torch.float32, device=q.device) if return_weights else None
    for row0 in range(0, q_len, QUERY_CHUNK):
        row1 = min(row0 + QUERY_CHUNK, q_len)
        q_chunk = q[:, :, row0:row1].float().reshape(b, hkv, group, row1 - row0, d)
        scores = q_chunk @ keys.transpose(-1, -2) * scale
        q_pos = torch.arange(row0, row1, device=q.device) + offset
        ok = visible(q_pos[:, None], k_pos[None, :], window)[None, None, None]
        if key_padding_mask is not None:
            ok = ok & key_padding_mask[:, None, None, None, :].bool()
        chunk_out = masked_softmax_attend(scores, ok, values, softcap)
        out[:, :, row0:row1] = chunk_out.reshape(b, hq, row1 - row0, d).to(out.dtype)
        if weights is not None:
            s = scores if softcap is None else softcap * torch.tanh(scores / softcap)
            s = s.masked_fill(~ok, float("-inf"))
            p = torch.softmax(s, dim=-1).nan_to_num(0.0)
            weights[:, :, row0:row1] = p.reshape(b, hq, row1 - row0, k_len)
    return out, weights
