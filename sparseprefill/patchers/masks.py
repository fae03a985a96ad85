"""The mask function registered next to the attention function.

transformers calls it once per forward (per mask type) with the geometry of the call. For a
plain causal prefill whose queries are the last keys (fresh prefill, chunked prefill, follow-up
turn) and whose key length reaches ``min_sparse_len``, it returns a small ``SparsePrefillMask``
marker instead of a 4-D ``[B, 1, Lq, Lk]`` tensor (gigabytes at 128K): the sparse kernels apply
causality, windows and padding themselves. Everything else (decode, short prompts, static caches
whose keys run past the queries, packed sequences, custom mask overlays) gets exactly the mask the
previous implementation would have built, so those calls behave exactly as unpatched.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import torch

__all__ = ["SparsePrefillMask", "SequenceSegment", "make_mask_function"]


@dataclass(frozen=True)
class SequenceSegment:
    """The real tokens of one batch row: query rows ``[q_start, q_end)``, keys ``[k_start, k_end)``."""

    batch: int
    q_start: int
    q_end: int
    k_start: int
    k_end: int


@dataclass(frozen=True)
class SparsePrefillMask:
    """Marker for the sparse path. ``padding [B, Lk]`` bool (True = real token) or None."""

    q_length: int
    kv_length: int
    padding: torch.Tensor | None

    @property
    def shape(self) -> tuple[int, ...]:
        # Some callers only inspect .shape of the mask; report the logical one without building it.
        batch = 1 if self.padding is None else self.padding.shape[0]
        return (batch, 1, self.q_length, self.kv_length)

    def segments(self) -> list[SequenceSegment] | None:
        """Per batch row, the contiguous span of real tokens (left or right padding), or None if some
        row's real tokens are not contiguous (the caller then runs dense with the full mask)."""
        if self.padding is None:
            return []
        out = []
        q_first_pos = self.kv_length - self.q_length
        for b, row in enumerate(self.padding.tolist()):
            real = [i for i, keep in enumerate(row) if keep]
            if not real:
                out.append(SequenceSegment(b, 0, 0, 0, 0))
                continue
            start, end = real[0], real[-1] + 1
            if end - start != len(real):
                return None
            q_start = max(start, q_first_pos) - q_first_pos
            q_end = max(end - q_first_pos, q_start)
            out.append(SequenceSegment(b, q_start, q_end, start, end))
        return out


def _device_type(kwargs: dict) -> str:
    """The device the mask is built for (transformers passes ``device``; older releases only tensors)."""
    for name in ("device", "attention_mask", "cache_position"):
        value = kwargs.get(name)
        if isinstance(value, torch.Tensor):
            return value.device.type
        if value is not None:
            return torch.device(value).type
    return "cpu"


def make_mask_function(
    lookup_state: Callable[[Any], Any], previous_mask_function: Callable[[Any], Callable[..., Any]]
) -> Callable[..., Any]:
    """Build the registered mask function.

    ``lookup_state(config)`` returns the patch state of the model owning ``config``;
    ``previous_mask_function(state)`` the mask function of the implementation replaced by ``patch``.
    """

    def sparseprefill_mask(**kwargs: Any) -> Any:
        state = lookup_state(kwargs.get("config"))
        q_length = kwargs["q_length"]
        kv_length = kwargs["kv_length"]
        q_offset = kwargs.get("q_offset", 0)
        kv_offset = kwargs.get("kv_offset", 0)
        attention_mask = kwargs.get("attention_mask")
        plain_geometry = (
            kwargs.get("allow_is_causal_skip", True)  # False whenever transformers overlays a custom mask
            and isinstance(q_offset, int)
            and isinstance(kv_offset, int)
            and q_length > 1
            and q_offset + q_length == kv_offset + kv_length  # queries are the last keys (bottom-right)
            and state.prefill_dense_reason(q_length, kv_length, _device_type(kwargs)) is None
        )
        if plain_geometry and attention_mask is not None:
            plain_geometry = attention_mask.ndim == 2 and attention_mask.shape[-1] >= kv_offset + kv_length
        if not plain_geometry:
            return previous_mask_function(state)(**kwargs)
        padding = None
        if attention_mask is not None:
            padding = attention_mask[:, kv_offset : kv_offset + kv_length].to(torch.bool)
            if bool(padding.all()):
                padding = None
        return SparsePrefillMask(q_length=q_length, kv_length=kv_length, padding=padding)

    return sparseprefill_mask
