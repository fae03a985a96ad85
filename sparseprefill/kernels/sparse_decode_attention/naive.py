"""fp32 reference for sparse decode attention; also the CPU implementation. Gathers the listed pages'
keys of each query head's KV head and runs an exact softmax over them."""

from __future__ import annotations

import torch

from ..common import attend_gathered


def page_key_positions(page_index: torch.Tensor, page_count: torch.Tensor, page_size: int,
                       k_len: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``[B, Hkv, W * P]`` key positions of the listed pages and their validity (slot < count, key < L)."""
    within = torch.arange(page_size, device=page_index.device)
    positions = (page_index.long()[..., None] * page_size + within).flatten(-2)
    slots = torch.arange(page_index.shape[-1], device=page_index.device)
    listed = (slots < page_count[..., None].long()) & (page_index >= 0)
    valid = (listed[..., None] & (positions.view(*page_index.shape, page_size) < k_len)).flatten(-2)
    return positions, valid


def sparse_decode_attention_naive(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    page_index: torch.Tensor | None,
    page_count: torch.Tensor | None,
    *,
    page_size: int,
    scale: float,
    softcap: float | None,
    out: torch.Tensor,
) -> torch.Tensor:
    b, hq, t, _ = q.shape
    hkv, k_len = k.shape[1], k.shape[2]
    kv_head_index = torch.arange(hq, device=q.device) // (hq // hkv)
    if page_index is None:
        positions = torch.arange(k_len, device=q.device).expand(b, hq, k_len)
        valid = torch.ones(b, hq, k_len, dtype=torch.bool, device=q.device)
    else:
        positions, valid = page_key_positions(page_index, page_count, page_size, k_len)
        positions, valid = positions[:, kv_head_index], valid[:, kv_head_index]
    q_positions = torch.arange(t, device=q.device) + k_len - t
    result = attend_gathered(q, k, v, positions, valid, q_positions, kv_head_index, scale, None, softcap)
    out.copy_(result.to(out.dtype))
    return out
