"""Top-k KV page retrieval at decode: the policy half of ``SparseConfig.decode`` (no transformers).

Per batch-row group (the whole unpadded batch, or one left-padded row) the cached keys are summarised
per page (``kernels/decode``); every ``reselect_every`` steps each KV head scores its pages against its
query heads and keeps the top ``budget_tokens // page_size`` (sink and recent pages forced in); in
between, the pages decoded since are appended to the selection, so the newest keys are always
attended. ``attend_decode_groups`` runs one decode step for a layer; ``follow_up_chunk_attention`` serves
a short follow-up chunk the same way. Which calls come here, and how the cache is tracked, is the
integration's business (``patchers/decode.py``).
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from typing import Any, Callable

import torch

from ..config import DecodeRetrievalConfig
from ..kernels.decode import (
    MAX_GROUP_ROWS,
    STATS_FOR_METHOD,
    PageSummary,
    num_pages_for,
    page_summary,
    sparse_decode_attention,
    top_k_pages,
    update_page_summary,
)

__all__ = [
    "DecodeState",
    "LayerDecode",
    "RowGroup",
    "attend_decode_groups",
    "follow_up_chunk_attention",
    "layer_state",
]

# Pages of room a fresh summary gets beyond the prompt, so the first decode steps append in place
# (64 pages = 1024 tokens at page 16); later growth is geometric (``update_page_summary``).
SUMMARY_HEADROOM_PAGES = 64


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


def layer_state(decode: DecodeState, layer: int, signature: tuple, k_len: int,
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


def select_pages_for(group: RowGroup, q: torch.Tensor, k: torch.Tensor, cfg: DecodeRetrievalConfig, scale: float,
            decode: DecodeState, layer: int) -> None:
    """Bring the group's summary up to date with ``k`` and make a fresh selection."""
    if group.summary is None:
        capacity = num_pages_for(k.shape[2], cfg.page_size) + SUMMARY_HEADROOM_PAGES
        group.summary = page_summary(k, page_size=cfg.page_size, stats=STATS_FOR_METHOD[cfg.method.value],
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


def extend_selection(group: RowGroup, num_pages: int, budget_pages: int) -> None:
    """Append the pages created since the selection (their ids exceed every selected page, so the list
    stays sorted); the last selected page was the cache's last page, which new tokens first fill."""
    new = num_pages - group.selected_pages
    if new > group.appended_pages:
        for j in range(group.appended_pages, new):
            group.page_index[..., budget_pages + j] = group.selected_pages + j
        group.page_count.fill_(budget_pages + new)
        group.appended_pages = new


def attend_decode_groups(
    layer_decode: LayerDecode, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, *,
    cfg: DecodeRetrievalConfig, scale: float, softcap: float | None, decode: DecodeState, layer: int,
    out: torch.Tensor, inspector: Callable[..., None] | None = None,
) -> tuple[int, int]:
    """One decode step of one layer: ``query [B, Hq, 1, D]`` over the cache ``key, value [B, Hkv, Lk, D]``,
    per row group of ``layer_decode``, written into ``out [B, Hq, 1, D]``. Returns ``(computed, causal)``
    key counts summed over rows and query heads, known on the host (no device read).

    ``inspector(layer, q, k, v, out, page_index, page_count, page_size=, scale=, softcap=)`` (if given)
    sees each group after its attention: ``page_index`` None where the group attended all its keys."""
    hq = query.shape[1]
    budget_pages = cfg.budget_tokens // cfg.page_size
    computed = causal = 0
    for group in layer_decode.groups:
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
        else:
            if group.page_index is None or group.age >= cfg.reselect_every:
                select_pages_for(group, q, k, cfg, scale, decode, layer)
            else:
                extend_selection(group, num_pages, budget_pages)
            group.age += 1
            sparse_decode_attention(q, k, v, group.page_index, group.page_count, page_size=cfg.page_size,
                                    scale=scale, softcap=softcap, out=out[rows])
            # Keys attended per (row, KV head), known on the host: every listed page is full except the
            # cache's last page, which is always listed.
            pages = budget_pages + group.appended_pages
            computed += (pages * cfg.page_size - (num_pages * cfg.page_size - length)) * group_heads
        if inspector is not None:
            inspector(layer, q, k, v, out[rows], group.page_index, group.page_count, page_size=cfg.page_size,
                      scale=scale, softcap=softcap)
    return computed, causal


def follow_up_chunk_attention(
    query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, *, cfg: DecodeRetrievalConfig, scale: float,
    softcap: float | None,
) -> tuple[torch.Tensor, int, int]:
    """A short follow-up chunk ``query [B, Hq, Lq, D]`` (its keys the last ``Lq`` of ``key, value
    [B, Hkv, Lk, D]``) by page retrieval: each run of ``64 // G`` queries (the decode kernel's rows per KV
    head) selects its own top-k pages of the keys it may see and attends them, its own causal block
    included through the forced recent pages. Returns ``(out [B, Lq, Hq, D], computed, causal)``."""
    batch, hq, q_len, head_dim = query.shape
    hkv, k_len = key.shape[1], key.shape[2]
    rows_per_call = max(1, MAX_GROUP_ROWS // (hq // hkv))
    out_buffer = query.new_empty(batch, q_len, hq, head_dim)
    out = out_buffer.transpose(1, 2)
    computed = causal = 0
    stats_for_method = STATS_FOR_METHOD[cfg.method.value]
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
    return out_buffer, min(computed, causal), causal
