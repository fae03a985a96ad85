"""Dense causal attention through PyTorch's SDPA: the fast dense path of the GPU.

The sparse path runs some heads or calls dense on purpose (heads a profile or ``dense_layers`` keeps
dense, spans too short to pay, heads whose estimate keeps too much). On the GPU those must cost what
unpatched dense attention costs, so they go to the same SDPA kernels (cuDNN or flash, whichever the
caller's backend settings allow) instead of the fp32 reference, which materialises scores and runs
10x slower there.

SDPA's ``is_causal`` is top-left aligned; with ``Lq == Lk`` that is the bottom-right alignment the
package uses everywhere. A chunk (``Lq < Lk``) gets an explicit boolean mask, bounded in size by
``MAX_SDPA_MASK_ELEMENTS``. GQA maps query head ``h`` to KV head ``h // (Hq / Hkv)`` (SDPA's
``enable_gqa``), the package's default head map. Soft-capping, sliding windows and key padding are
not expressible here without a mask of ``L x L``; ``sdpa_supports`` says no and the caller keeps the
fp32 reference.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..geometry import query_offset, visible

__all__ = ["MAX_SDPA_MASK_ELEMENTS", "dense_attention_sdpa", "sdpa_supports"]

# A chunk's explicit causal mask holds Lq x Lk booleans: 2^27 (128 MiB) admits a 1K-query chunk over
# 128K keys, far past the chunks that reach this path (they are shorter than one query block).
MAX_SDPA_MASK_ELEMENTS = 1 << 27


def sdpa_supports(q_len: int, k_len: int, *, window: int | None, softcap: float | None,
                  key_padding_mask: torch.Tensor | None) -> bool:
    """Whether ``dense_attention_sdpa`` computes this call (else keep the fp32 reference)."""
    if softcap is not None or key_padding_mask is not None:
        return False
    if window is not None and window < k_len:
        return False
    return q_len == k_len or q_len * k_len <= MAX_SDPA_MASK_ELEMENTS


def dense_attention_sdpa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, scale: float,
                         out: torch.Tensor) -> torch.Tensor:
    """Exact causal attention, bottom-right aligned, through SDPA: ``q [B, Hq, Lq, D]``,
    ``k, v [B, Hkv, Lk, D]`` with ``Hq`` a multiple of ``Hkv`` -> ``out [B, Hq, Lq, D]`` (written in
    place, any strides), computed in the inputs' dtype as SDPA does."""
    q_len, k_len = q.shape[2], k.shape[2]
    gqa = q.shape[1] != k.shape[1]
    if q_len == k_len:
        result = F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scale, enable_gqa=gqa)
    else:
        offset = query_offset(q_len, k_len)
        q_pos = torch.arange(q_len, device=q.device)[:, None] + offset
        mask = visible(q_pos, torch.arange(k_len, device=q.device)[None, :], None)
        result = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale, enable_gqa=gqa)
    out.copy_(result)
    return out
