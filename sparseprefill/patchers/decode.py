"""Top-k KV page retrieval for decode (``SparseConfig.decode``): the ``Lq == 1`` phase.

Per layer, the cached keys ``k [B, Hkv, L, D]`` (HF DynamicCache layout, the full cache: the module
updated it before calling us) are summarised per ``page_size``-token page (``kernels/page_summary``).
Every ``reselect_every`` steps each KV head scores its pages against its query heads' current queries
and keeps the top ``budget_tokens // page_size`` (sink and recent pages forced in,
``kernels/page_score``); attention is exact over the kept pages (``kernels/sparse_decode_attention``).

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

from collections import Counter
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from ..config import DecodeMethod, DecodeRetrievalConfig
from ..kernels.page_score import top_k_pages
from ..kernels.page_summary import PageSummary, num_pages_for, page_summary, update_page_summary
from ..kernels.sparse_decode_attention import sparse_decode_attention
from .masks import SparsePrefillMask
from .state import FallbackReason, LayerStats, PatchState, Phase

__all__ = ["DecodeState", "RowGroup", "LayerDecode", "decode_attention", "invalidate_layer"]

# Pages of room a fresh summary gets beyond the prompt, so the first decode steps append in place
# (64 pages = 1024 tokens at page 16); later growth is geometric (``update_page_summary``).
SUMMARY_HEADROOM_PAGES = 64
_STATS_FOR_METHOD = {DecodeMethod.MEAN_STD: ("meanstd",), DecodeMethod.QUEST: ("minmax",)}


@dataclass
class RowGroup:
    """Batch rows that share one summary and selection: the whole unpadded batch, or one padded row.

    The group's keys are ``k[rows, :, start:]``; its page ``p`` covers those keys' positions
    ``[p * P, (p + 1) * P)`` (relative to ``start``).
    """

    rows: slice
    start: int
    summary: PageSummary | None = None
    # The current selection, or None while every page fits the budget (then all keys are attended).
    # ``page_index [B_g, Hkv, W + extra]`` int32: the W selected pages, then pages appended since.
    page_index: torch.Tensor | None = None
    page_count: torch.Tensor | None = None
    selected_pages: int = 0  # pages the cache had when the selection was made
    appended_pages: int = 0  # pages appended to the selection since
    age: int = 0  # decode steps since the selection was made


@dataclass
class LayerDecode:
    """One layer's decode state; ``signature`` = (batch, row starts, Hkv, D, device, dtype, inference mode)."""

    signature: tuple
    num_tokens: int
    groups: list[RowGroup]


@dataclass
class DecodeState:
    """Per-layer decode retrieval state of one patched model, plus counters the tests and reports read."""

    layers: dict[int, LayerDecode] = field(default_factory=dict)
    selection_calls: Counter = field(default_factory=Counter)  # per layer: page selections made
    summary_builds: Counter = field(default_factory=Counter)  # per layer: summaries built from scratch
    # (mask object, parsed row starts or a FallbackReason): the same mask is passed to every layer of a
    # forward, so it is parsed (one host read) once per forward. Holding it keeps its id() unique.
    _mask_cache: tuple[Any, Any] | None = None

    def invalidate(self, layer: int) -> None:
        self.layers.pop(layer, None)


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


def _layer_state(decode: DecodeState, layer: int, signature: tuple, k_len: int,
                 starts: tuple[int, ...] | None, batch: int) -> LayerDecode:
    current = decode.layers.get(layer)
    # A decode step appends exactly one key; anything else (a shorter cache, the same length rewritten
    # in place as in a full static cache, a jump) means these keys are not the summarised ones.
    if current is None or current.signature != signature or k_len != current.num_tokens + 1:
        if starts is None:
            groups = [RowGroup(rows=slice(0, batch), start=0)]
        else:
            groups = [RowGroup(rows=slice(b, b + 1), start=s) for b, s in enumerate(starts)]
        current = LayerDecode(signature=signature, num_tokens=k_len, groups=groups)
        decode.layers[layer] = current
    current.num_tokens = k_len
    return current


def _select(group: RowGroup, q: torch.Tensor, k: torch.Tensor, cfg: DecodeRetrievalConfig, scale: float,
            decode: DecodeState, layer: int) -> None:
    """Bring the group's summary up to date with ``k`` and make a fresh selection."""
    if group.summary is None:
        capacity = num_pages_for(k.shape[2], cfg.page_size) + SUMMARY_HEADROOM_PAGES
        group.summary = page_summary(k, page_size=cfg.page_size, stats=_STATS_FOR_METHOD[cfg.method],
                                     capacity_pages=capacity)
        decode.summary_builds[layer] += 1
    elif group.summary.num_tokens != k.shape[2]:
        group.summary = update_page_summary(group.summary, k)
    index, count = top_k_pages(q, group.summary, scale=scale, method=cfg.method.value,
                               budget_tokens=cfg.budget_tokens, sink_tokens=cfg.sink_tokens,
                               recent_tokens=cfg.recent_tokens)
    width = index.shape[-1]
    # Room for the pages decoded while the selection is reused: reselect_every - 1 more tokens span at
    # most this many new pages.
    extra = -(-(cfg.reselect_every - 1) // cfg.page_size) + 1
    buffer = torch.full((*index.shape[:2], width + extra), -1, dtype=torch.int32, device=index.device)
    buffer[..., :width] = index
    group.page_index, group.page_count = buffer, count.clone()
    group.selected_pages = group.summary.num_pages
    group.appended_pages = 0
    group.age = 0
    decode.selection_calls[layer] += 1


def _extend(group: RowGroup, num_pages: int, budget_pages: int) -> None:
    """Append the pages created since the selection (their ids exceed every selected page, so the list
    stays sorted); the last selected page was the cache's last page, which new tokens first fill."""
    new = num_pages - group.selected_pages
    if new > group.appended_pages:
        for j in range(group.appended_pages, new):
            group.page_index[..., budget_pages + j] = group.selected_pages + j
        group.page_count.fill_(budget_pages + new)
        group.appended_pages = new


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
    layer_state = _layer_state(decode, layer, signature, k_len, starts, batch)
    softcap = kwargs.get("softcap")

    out_buffer = query.new_empty(batch, 1, hq, head_dim)
    out = out_buffer.transpose(1, 2)  # [B, Hq, 1, D] view the kernel writes into
    budget_pages = cfg.budget_tokens // cfg.page_size
    computed = causal = 0
    for group in layer_state.groups:
        rows = group.rows
        q, k, v = query[rows], key[rows, :, group.start:], value[rows, :, group.start:]
        length = k.shape[2]
        num_pages = num_pages_for(length, cfg.page_size)
        group_heads = q.shape[0] * hq
        causal += length * group_heads
        if length < cfg.min_context or num_pages <= budget_pages:
            # Every page fits the budget (or this padded row is short): attend all of the row's keys.
            group.page_index = group.page_count = None
            sparse_decode_attention(q, k, v, page_size=cfg.page_size, scale=scale, softcap=softcap, out=out[rows])
            computed += length * group_heads
            continue
        if group.page_index is None or group.age >= cfg.reselect_every:
            _select(group, q, k, cfg, scale, decode, layer)
        else:
            _extend(group, num_pages, budget_pages)
        group.age += 1
        sparse_decode_attention(q, k, v, group.page_index, group.page_count, page_size=cfg.page_size, scale=scale,
                                softcap=softcap, out=out[rows])
        # Keys attended per (row, KV head), known on the host: every listed page is full except the
        # cache's last page, which is always listed.
        pages = budget_pages + group.appended_pages
        computed += (pages * cfg.page_size - (num_pages * cfg.page_size - length)) * group_heads
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
    ``min_context`` keys, by page retrieval: each run of ``64 // G`` queries (the decode kernel's rows
    per KV head) selects its own top-k pages of the keys it may see and attends them, its own causal
    block included through the forced recent pages. Returns ``(out [B, Lq, Hq, D], None)``, or None
    when the chunk is not one this path serves (the caller then runs the prefill patterns).

    Only an unpadded batch is served: the summaries are per call (the chunk's keys are new), so
    padding would need per-row geometry that the prefill path already handles.
    """
    from ..kernels.sparse_decode_attention.triton import MAX_GROUP_ROWS

    cfg = state.decode_configs.get(layer, state.config.decode)
    batch, hq, q_len, head_dim = query.shape
    hkv, k_len = key.shape[1], key.shape[2]
    if (cfg is None or not cfg.follow_up_chunks or not 1 < q_len <= cfg.max_follow_up_tokens or q_len >= k_len
            or k_len - q_len < cfg.min_context or layer in cfg.dense_layers or module.training or dropout > 0.0
            or kwargs.get("output_attentions") or kwargs.get("sliding_window") is not None
            or not isinstance(attention_mask, SparsePrefillMask) or attention_mask.padding is not None):
        return None
    softcap = kwargs.get("softcap")
    rows_per_call = max(1, MAX_GROUP_ROWS // (hq // hkv))
    out_buffer = query.new_empty(batch, q_len, hq, head_dim)
    out = out_buffer.transpose(1, 2)
    computed = causal = 0
    stats_for_method = _STATS_FOR_METHOD[cfg.method]
    for first in range(0, q_len, rows_per_call):
        last = min(first + rows_per_call, q_len)
        end = k_len - q_len + last  # keys visible to this run's last query
        q, k, v = query[:, :, first:last], key[:, :, :end], value[:, :, :end]
        # The run's own queries sit in its last (last - first) keys: keep them whatever the scores say.
        recent = max(cfg.recent_tokens, last - first)
        num_pages = num_pages_for(end, cfg.page_size)
        budget = max(cfg.budget_tokens, (-(-cfg.sink_tokens // cfg.page_size) + -(-recent // cfg.page_size) + 2)
                     * cfg.page_size)
        if num_pages * cfg.page_size <= budget:
            sparse_decode_attention(q, k, v, page_size=cfg.page_size, scale=scale, softcap=softcap,
                                    out=out[:, :, first:last])
            kept = end
        else:
            summary = page_summary(k, page_size=cfg.page_size, stats=stats_for_method)
            index, count = top_k_pages(q, summary, scale=scale, method=cfg.method.value, budget_tokens=budget,
                                       sink_tokens=cfg.sink_tokens, recent_tokens=recent)
            sparse_decode_attention(q, k, v, index, count, page_size=cfg.page_size, scale=scale, softcap=softcap,
                                    out=out[:, :, first:last])
            # Every listed page is full except the last (always listed); the host count costs one read
            # per run, acceptable for a chunk (decode steps avoid it).
            kept = min(end, int(count.max()) * cfg.page_size)
        rows = last - first
        computed += kept * rows * batch * hq
        causal += sum(end - rows + 1 + t for t in range(rows)) * batch * hq
    stats.record(Phase.RETRIEVAL_CHUNK, min(computed, causal), causal)
    return out_buffer, None
