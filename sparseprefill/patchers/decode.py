"""Top-k KV page retrieval for decode (``SparseConfig.decode``): the ``Lq == 1`` phase.

Per layer, the cached keys ``k [B, Hkv, L, D]`` (HF DynamicCache layout, the full cache: the module
updated it before calling us) are summarised per ``page_size``-token page (``kernels/decode/pages.py``).
Every ``reselect_every`` steps each KV head scores its pages against its query heads' current queries
and keeps the top ``budget_tokens // page_size`` (sink and recent pages forced in,
``kernels/decode/scores.py``); attention is exact over the kept pages (``kernels/decode/attention.py``).

Cache tracking (the attention function never sees the cache object, only its tensors):

- the summaries live on ``PatchState.decode`` keyed by layer, and are updated lazily: only when a
  new selection is made, for the keys appended since (one page or a few);
- any ``Lq > 1`` call of the layer (a new ``generate`` prefill, a chunk, a follow-up turn) drops the
  layer's state; so does a key length other than the previous one plus one (a shorter cache, a full
  static cache rewritten in place) or a different batch size / padding layout;
- a selection reused for later steps gets the pages of the tokens decoded since appended, so the
  newest keys are always attended. Two caches fed alternately to one model with growing lengths
  are not detected (the usual one-cache-per-``generate`` use is). The summaries (1/16 of the keys per
  statistic, 2 statistics) stay allocated until the next prefill of the layer or ``unpatch``.
- CUDA graphs: the state is host-side Python (selection age, page counts), so a captured decode step
  would freeze one selection; not supported.

Padding: the previous implementation's decode mask (``[B, 1, 1, Lk]`` bool or additive float, a
2-D ``[B, Lk]`` padding mask, or None) is read once per forward. Left padding (each row's real keys
a suffix ``[start_b, Lk)``) is handled exactly: each padded row runs alone on its own real keys,
with its own summaries and pages aligned to its first real token, so a row selects exactly what it
would select if run by itself and pad keys are never attended. Any other layout (a static cache,
whose keys run past the current token; holes; an unknown mask type) runs dense with
``FallbackReason.DECODE_MASK``.

Dense (the previous implementation, recorded as a fallback): retrieval off, layers in
``dense_layers``, sliding-window layers, ``Lk < min_context``, training/dropout and
``output_attentions``. A padded row shorter than ``min_context`` attends all its keys through the
decode kernel (recorded as ``sparse_decode`` with density 1). Gemma 2 soft-capping is applied
exactly in the decode kernel; page scores rank the un-capped logit estimates (tanh capping is
monotonic, so it does not change which page a single head prefers).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from ..patterns.retrieval import (
    DecodeState,
    attend_decode_groups,
    follow_up_chunk_attention,
    layer_state,
)
from .masks import SparsePrefillMask
from .state import FallbackReason, LayerStats, PatchState, Phase

__all__ = ["decode_attention", "follow_up_attention", "invalidate_layer"]


def invalidate_layer(state: PatchState, layer: int) -> None:
    """Drop ``layer``'s decode state (called on every ``Lq > 1`` call: the cache may be a new one)."""
    if state.decode is not None:
        state.decode.invalidate(layer)


def _row_starts(decode: DecodeState, mask: Any, batch: int, k_len: int) -> tuple[int, ...] | None | FallbackReason:
    """First real key of each row (None: no padding), or why the mask cannot be used."""
    if mask is None:
        return None
    cached = decode._mask_cache
    if cached is not None and cached[0] is mask:
        return cached[1]
    result = _parse_mask(mask, batch, k_len)
    decode._mask_cache = (mask, result)
    return result


def _parse_mask(mask: Any, batch: int, k_len: int) -> tuple[int, ...] | None | FallbackReason:
    if not isinstance(mask, torch.Tensor):
        return FallbackReason.DECODE_MASK  # e.g. a flex-attention BlockMask
    if mask.ndim == 4:
        row = mask[:, 0, -1, :]  # the decode query's row (the head dim is broadcast)
    elif mask.ndim == 2:
        row = mask
    else:
        return FallbackReason.DECODE_MASK
    if row.shape[-1] != k_len or row.shape[0] not in (1, batch):
        return FallbackReason.DECODE_MASK
    valid = row if row.dtype == torch.bool else row > torch.finfo(row.dtype).min / 2
    valid = valid.expand(batch, k_len)
    counts = valid.sum(-1)
    # Real keys must be exactly a suffix ending at the current token: left padding. A static cache
    # (keys past the current token masked), holes or right padding do not qualify.
    expected = torch.arange(k_len, device=valid.device)[None, :] >= (k_len - counts)[:, None]
    if not bool((valid == expected).all()) or bool((counts == 0).any()):
        return FallbackReason.DECODE_MASK
    starts = tuple(k_len - int(c) for c in counts.tolist())
    return None if not any(starts) else starts


def decode_attention(
    module: nn.Module,
    state: PatchState,
    layer: int,
    stats: LayerStats,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: Any,
    *,
    scale: float,
    dropout: float,
    kwargs: dict,
) -> tuple[torch.Tensor, None] | FallbackReason:
    """Sparse decode for one ``Lq == 1`` call with ``state.config.decode`` set.

    Returns ``(out [B, 1, Hq, D], None)`` (the HF attention return), or the reason the call must run
    dense through the previous implementation (the caller records it and runs it).
    """
    cfg = state.decode_configs.get(layer, state.config.decode)  # a profile may override a layer
    batch, hq, _, head_dim = query.shape
    hkv, k_len = key.shape[1], key.shape[2]
    if module.training or dropout > 0.0:
        return FallbackReason.TRAINING
    if kwargs.get("output_attentions"):
        return FallbackReason.OUTPUT_ATTENTIONS
    if cfg is None or layer in cfg.dense_layers:
        return FallbackReason.DECODE_DENSE_LAYER
    if kwargs.get("sliding_window") is not None:
        return FallbackReason.DECODE_SLIDING
    if k_len < cfg.min_context:
        return FallbackReason.DECODE_SHORT
    if state.decode is None:
        state.decode = DecodeState()
    decode: DecodeState = state.decode
    starts = _row_starts(decode, attention_mask, batch, k_len)
    if isinstance(starts, FallbackReason):
        return starts
    # Inference mode is part of the signature: buffers made under it cannot be updated in place outside it.
    signature = (batch, starts, hkv, head_dim, key.device, key.dtype, torch.is_inference_mode_enabled())
    layer_decode = layer_state(decode, layer, signature, k_len, starts, batch)
    out_buffer = query.new_empty(batch, 1, hq, head_dim)
    out = out_buffer.transpose(1, 2)  # [B, Hq, 1, D] view the kernel writes into
    computed, causal = attend_decode_groups(
        layer_decode, query, key, value, cfg=cfg, scale=scale, softcap=kwargs.get("softcap"), decode=decode,
        layer=layer, out=out, inspector=state.decode_inspector,
    )
    stats.record(Phase.SPARSE_DECODE, computed, causal)
    return out_buffer, None


def follow_up_attention(
    module: nn.Module,
    state: PatchState,
    layer: int,
    stats: LayerStats,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: Any,
    *,
    scale: float,
    dropout: float,
    kwargs: dict,
) -> tuple[torch.Tensor, None] | None:
    """A short follow-up chunk (``1 < Lq <= max_follow_up_tokens``) after a cached context of at least
    ``min_context`` keys, by page retrieval (``patterns.retrieval.follow_up_chunk_attention``). Returns
    ``(out [B, Lq, Hq, D], None)``, or None when the chunk is not one this path serves (the caller then
    runs the prefill patterns).

    Only an unpadded batch is served: the summaries are per call (the chunk's keys are new), so
    padding would need per-row geometry that the prefill path already handles.
    """
    cfg = state.decode_configs.get(layer, state.config.decode)
    q_len, k_len = query.shape[2], key.shape[2]
    if (cfg is None or not cfg.follow_up_chunks or not 1 < q_len <= cfg.max_follow_up_tokens or q_len >= k_len
            or k_len - q_len < cfg.min_context or layer in cfg.dense_layers or module.training or dropout > 0.0
            or kwargs.get("output_attentions") or kwargs.get("sliding_window") is not None
            or not isinstance(attention_mask, SparsePrefillMask) or attention_mask.padding is not None):
        return None
    out_buffer, computed, causal = follow_up_chunk_attention(query, key, value, cfg=cfg, scale=scale,
                                                             softcap=kwargs.get("softcap"))
    stats.record(Phase.RETRIEVAL_CHUNK, computed, causal)
    return out_buffer, None
