"""The registered attention function: routes every call to a phase.

- decode (``Lq == 1``) with ``SparseConfig.decode`` set: top-k KV page retrieval (``decode.py``), or
  the previous implementation with a recorded reason;
- no ``SparsePrefillMask`` (decode, short prompt, static cache, custom masks): the previous
  implementation with the mask it would have had, i.e. exactly the unpatched computation;
- ``SparsePrefillMask``: fresh prefill (``Lq == Lk``) or chunked prefill (``Lq < Lk``) on the sparse
  path, per real-token span of each batch row, with the layer's per-head plan; sliding-window layers
  whose window is shorter than the keys compute the exact window; training, dropout and
  ``output_attentions`` run dense.

Output goes back as ``[B, Lq, Hq, D]``: kernels write into a transposed view of that buffer.
"""

from __future__ import annotations

import functools
import sys
from typing import Any, Callable

import torch
from torch import nn

from ..kernels import dense_attention, fast_dense_attention
from ..kernels.common import default_kv_head_index
from ..kernels.geometry import causal_pairs_total
from ..patterns import window_attention
from ..patterns.cost import dense_break_even
from .decode import decode_attention, follow_up_attention, invalidate_layer
from .masks import SparsePrefillMask
from .state import FallbackReason, LayerStats, PatchState, Phase, heads_tensor
from .tensor_parallel import head_count_error

__all__ = ["IMPLEMENTATION_NAME", "sparseprefill_attention", "previous_attention_function"]

# Registered name. It must not contain "flash", "sdpa", "flex_attention", "/" or ":": transformers
# dispatches on those substrings (see shared notes on the attention interface).
IMPLEMENTATION_NAME = "sparseprefill"

def previous_attention_function(module: nn.Module, implementation: str) -> Callable[..., Any]:
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    if implementation == "eager":
        eager = getattr(sys.modules[type(module).__module__], "eager_attention_forward", None)
        if eager is None:
            raise RuntimeError(f"{type(module).__name__}'s modeling file defines no eager_attention_forward")
        return eager
    return ALL_ATTENTION_FUNCTIONS[implementation]


def _binding(module: nn.Module) -> tuple[PatchState, int]:
    binding = getattr(module, "_sparseprefill", None)
    if binding is None:
        raise RuntimeError(
            f"{type(module).__name__} (layer {getattr(module, 'layer_idx', '?')}) uses the 'sparseprefill' attention "
            "implementation but was not patched; call sparseprefill.patch(model) instead of setting "
            "attn_implementation='sparseprefill' by hand"
        )
    return binding


def _dense(
    q, k, v, out, *, scale, window, softcap, padding=None, weights=False
) -> torch.Tensor | None:
    """Dense attention of a call that arrived with the sparse-path mask: the fp32 reference when the
    weights are returned, else the fast dense path (SDPA on the GPU where it can express the call)."""
    if not weights:
        fast_dense_attention(q, k, v, scale=scale, window=window, softcap=softcap, key_padding_mask=padding, out=out)
        return None
    _, w = dense_attention(q, k, v, scale=scale, window=window, softcap=softcap, key_padding_mask=padding,
                           out=out, return_weights=True)
    return w


def _run_span(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    out: torch.Tensor,
    *,
    state: PatchState,
    layer: int,
    stats: LayerStats,
    scale: float,
    window: int | None,
    softcap: float | None,
) -> None:
    """Attention for one span of real tokens (all rows of an unpadded batch, or one padded row)."""
    q_len, k_len = q.shape[2], k.shape[2]
    if q_len == 0:
        return
    cfg = state.config
    effective_window = window if window is not None and k_len > window else None
    causal = causal_pairs_total(q_len, k_len, effective_window) * q.shape[0] * q.shape[1]
    # The mask decided for the whole batch; a padded row is shorter and decides again.
    reason = state.prefill_dense_reason(q_len, k_len, q.device.type)
    if reason is not None:
        stats.record_fallback(reason)
        _dense(q, k, v, out, scale=scale, window=effective_window, softcap=softcap)
        return
    if q_len < cfg.min_sparse_query_len:
        stats.record_fallback(FallbackReason.SHORT_QUERY)
        _dense(q, k, v, out, scale=scale, window=effective_window, softcap=softcap)
        return
    if effective_window is not None:
        computed = window_attention(q, k, v, window=effective_window, scale=scale, softcap=softcap, out=out)
        stats.record(Phase.WINDOW, computed, causal)
        return
    hq = q.shape[1]
    kv_of_head = default_kv_head_index(hq, k.shape[1], q.device)
    if state.observer is not None:
        state.observer(layer, q, k, scale=scale, softcap=softcap)
    computed = []  # device tensors, summed without a host read (LayerStats.record)
    selections = []
    # Heads whose estimate keeps past their kernel's break-even run dense (the GPU has a cost model).
    route = cfg.route_dense_heads and q.device.type == "cuda"
    plans, beyond_profile = state.plans_for(k_len)
    if beyond_profile:
        stats.record_fallback(FallbackReason.PROFILE_RANGE)
    for group in plans[layer].groups:
        stats.patterns[group.pattern.name.value] += len(group.heads)
        common = dict(scale=scale, softcap=softcap,
                      dense_above=dense_break_even(group.pattern.name, q.shape[-1]) if route else None)
        if len(group.heads) == hq:
            result = group.pattern.run(q, k, v, kv_head_index=kv_of_head, out=out, **common)
        else:
            heads = heads_tensor(group.heads, q.device)
            part = torch.empty_like(q[:, heads])
            result = group.pattern.run(q[:, heads], k, v, kv_head_index=kv_of_head[heads], out=part, **common)
            out[:, heads] = part
        stats.record_dense_heads(result.dense_heads)
        stats.record_per_head_columns(result.per_head_columns)
        computed.append(result.computed_pairs.sum())
        selections.append((group.heads, result))
    if state.inspector is not None:
        state.inspector(layer, q, k, v, out, [(heads, result.inspected_index()) for heads, result in selections],
                        scale=scale, softcap=softcap)
    stats.record(Phase.SPARSE_PREFILL if q_len == k_len else Phase.SPARSE_CHUNK, torch.stack(computed) if computed else 0, causal)


def _on_query_device(attention: Callable[..., Any]) -> Callable[..., Any]:
    """Run ``attention`` with the layer's GPU current: a model split over GPUs (``device_map="auto"``)
    runs layers on devices other than the current one, and Triton launches on the current device."""

    @functools.wraps(attention)
    def on_device(*args: Any, **kwargs: Any) -> Any:
        query = args[1] if len(args) > 1 else kwargs["query"]
        if query.is_cuda and query.device.index != torch.cuda.current_device():
            with torch.cuda.device(query.device):
                return attention(*args, **kwargs)
        return attention(*args, **kwargs)

    return on_device


def _previous(module: nn.Module, state: PatchState, query, key, value, attention_mask, scaling, dropout, kwargs):
    """The call exactly as the unpatched model would run it."""
    previous = previous_attention_function(module, state.fallback_implementation)
    return previous(module, query, key, value, attention_mask, scaling=scaling, dropout=dropout, **kwargs)


def _retrieval(module, state, layer, stats, query, key, value, attention_mask, scale, dropout, kwargs):
    """Decode (``Lq == 1``) and short follow-up chunks under ``SparseConfig.decode``: the HF attention
    return, or None when the prefill path (or, for decode, the recorded dense fallback) must run."""
    if query.shape[2] == 1:
        # Top-k page retrieval (patchers/decode.py); it says why when the call must stay dense.
        result = decode_attention(module, state, layer, stats, query, key, value, attention_mask, scale=scale,
                                  dropout=dropout, kwargs=kwargs)
        if isinstance(result, FallbackReason):
            stats.record_fallback(result)
            return None
        return result
    if query.shape[2] < key.shape[2]:
        return follow_up_attention(module, state, layer, stats, query, key, value, attention_mask, scale=scale,
                                   dropout=dropout, kwargs=kwargs)
    return None


def _dense_reason(module: nn.Module, dropout: float, kwargs: dict, spans: Any) -> FallbackReason | None:
    """Why a masked prefill call must run dense (with the exact mask), or None."""
    if module.training or dropout > 0.0:
        return FallbackReason.TRAINING
    if kwargs.get("output_attentions"):
        return FallbackReason.OUTPUT_ATTENTIONS
    if spans is None:
        return FallbackReason.PADDING_HOLES
    return None


@_on_query_device
def sparseprefill_attention(
    module: nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: Any,
    scaling: float | None = None,
    dropout: float = 0.0,
    **kwargs: Any,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The registered attention function: ``query [B, Hq, Lq, D]``, ``key``/``value [B, Hkv, Lk, D]`` ->
    ``(out [B, Lq, Hq, D], weights or None)``, routed to one phase (module docstring)."""
    state, layer = _binding(module)
    expected = state.head_counts.get(layer)
    if expected is not None and (query.shape[1], key.shape[1]) != expected:
        # The plans index heads by position: other head counts (a model sharded after patch, a rank
        # slice other than the one planned for) would silently run the wrong heads' patterns.
        raise RuntimeError(head_count_error(layer, (query.shape[1], key.shape[1]), expected, state.tensor_parallel))
    stats = state.stats[layer]
    q_len, k_len = query.shape[2], key.shape[2]
    scale = scaling if scaling is not None else getattr(module, "scaling", query.shape[-1] ** -0.5)
    previous_args = (module, state, query, key, value, attention_mask, scaling, dropout, kwargs)
    if q_len > 1:
        # The cache may be a new one (a new generate call) or got a chunk: decode summaries restart.
        invalidate_layer(state, layer)
    if state.config.decode is not None:
        result = _retrieval(module, state, layer, stats, query, key, value, attention_mask, scale, dropout, kwargs)
        if result is not None:
            return result
        if q_len == 1:
            return _previous(*previous_args)

    if not isinstance(attention_mask, SparsePrefillMask):
        if q_len == 1:
            stats.record_fallback(FallbackReason.DECODE)
        elif (reason := state.prefill_dense_reason(q_len, k_len, query.device.type)) is not None:
            stats.record_fallback(reason)
        else:
            stats.record_fallback(FallbackReason.UNALIGNED)
        return _previous(*previous_args)

    if (attention_mask.q_length, attention_mask.kv_length) != (q_len, k_len):
        raise RuntimeError(
            f"layer {layer}: mask was built for Lq={attention_mask.q_length}, Lk={attention_mask.kv_length} but the "
            f"attention call has Lq={q_len}, Lk={k_len}"
        )
    window = kwargs.get("sliding_window")
    softcap = kwargs.get("softcap")
    batch, heads, _, head_dim = query.shape
    out_buffer = query.new_empty(batch, q_len, heads, head_dim)
    out = out_buffer.transpose(1, 2)
    spans = attention_mask.segments()
    dense_reason = _dense_reason(module, dropout, kwargs, spans)
    if dense_reason is not None:
        stats.record_fallback(dense_reason)
        effective_window = window if window is not None and k_len > window else None
        weights = _dense(
            query, key, value, out, scale=scale, window=effective_window, softcap=softcap,
            padding=attention_mask.padding, weights=dense_reason is FallbackReason.OUTPUT_ATTENTIONS,
        )
        if weights is not None:
            weights = weights.to(query.dtype)
        return out_buffer, weights

    _run_spans(query, key, value, out, spans,
               dict(state=state, layer=layer, stats=stats, scale=scale, window=window, softcap=softcap))
    return out_buffer, None


def _run_spans(query, key, value, out, spans, common: dict) -> None:
    """The whole batch as one span, or (a padded batch) each row's real tokens alone, exactly as if that
    sequence had been run by itself. Padding query rows get zeros (no real token reads them)."""
    if not spans:
        _run_span(query, key, value, out, **common)
        return
    out.zero_()
    for span in spans:
        b = slice(span.batch, span.batch + 1)
        _run_span(
            query[b, :, span.q_start : span.q_end],
            key[b, :, span.k_start : span.k_end],
            value[b, :, span.k_start : span.k_end],
            out[b, :, span.q_start : span.q_end],
            **common,
        )
