"""Exact sliding-window attention (Gemma 2/3, Mistral-style layers) on the vertical-slash kernel: the
window's diagonals ``0 .. W-1`` as slashes, no columns. Not an estimate: the result is the exact
window attention, and its cost is ``O(L W)`` instead of ``O(L^2)``."""

from __future__ import annotations

import torch

from ..kernels import library
from ..kernels.common import default_kv_head_index
from .a_shape import window_index

__all__ = ["WINDOW_BLOCK_SIZE", "window_attention"]

# The query block only sets how the kernel tiles the band (64 rows: the vertical-slash kernel's tile).
WINDOW_BLOCK_SIZE = 64


def window_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, window: int, scale: float, softcap: float | None,
    out: torch.Tensor,
) -> int | torch.Tensor:
    """Causal attention of ``q [B, Hq, Lq, D]`` over the last ``window`` keys of ``k, v [B, Hkv, Lk, D]``
    (transformers' semantics: position ``p`` sees ``p - window < j <= p``), written into ``out
    [B, Hq, Lq, D]``. Returns the computed causal pairs (all of the window's pairs)."""
    batch, heads, q_len, _ = q.shape
    index = window_index(batch, heads, q_len, k.shape[2], sink_tokens=0, local_tokens=window,
                         block_size=WINDOW_BLOCK_SIZE, device=q.device)
    library.call_vertical_slash(q, k, v, index, scale=scale, window=window, softcap=softcap,
                                kv_head_index=default_kv_head_index(heads, k.shape[1], q.device), out=out)
    return index.computed_pairs(window)
