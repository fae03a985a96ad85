"""A-shape (StreamingLLM): the first ``sink_tokens`` keys plus a ``local_tokens`` window. Static: no
estimation cost, but blind to anything in the middle of the context."""

from __future__ import annotations

import torch

from ..config import AShapeConfig, PatternName
from ..kernels import build_vertical_slash_index
from ..kernels.indices import VerticalSlashIndex, VerticalSlashLines
from ..kernels.vertical_slash import vertical_slash_lines
from .base import LinePattern


def window_index(
    batch: int, heads: int, q_len: int, k_len: int, *, sink_tokens: int, local_tokens: int, block_size: int,
    device: torch.device,
) -> VerticalSlashIndex:
    """Sink columns + the ``local_tokens`` nearest diagonals, as a vertical-slash index."""
    return build_vertical_slash_index(*_window_lines(batch, heads, k_len, sink_tokens, local_tokens, device),
                                      q_len=q_len, k_len=k_len, block_size_q=block_size)


def _window_lines(batch, heads, k_len, sink_tokens, local_tokens, device):
    """``(columns, column count, diagonals, diagonal count)`` of sink + window, ascending."""
    n_sink = max(min(sink_tokens, k_len), 1)  # a zero-width line list cannot be indexed: count 0 instead
    n_local = max(min(local_tokens, k_len), 1)
    columns = torch.arange(n_sink, dtype=torch.int32, device=device).expand(batch, heads, n_sink).contiguous()
    diagonals = torch.arange(n_local, dtype=torch.int32, device=device).expand(batch, heads, n_local).contiguous()
    return (columns, torch.full((batch, heads), min(sink_tokens, k_len), dtype=torch.int32, device=device),
            diagonals, torch.full((batch, heads), min(local_tokens, k_len), dtype=torch.int32, device=device))


class AShapePattern(LinePattern):
    name = PatternName.A_SHAPE

    def __init__(self, config: AShapeConfig):
        super().__init__(config)

    def estimate_lines(self, q, k, *, scale, softcap, kv_head_index) -> VerticalSlashLines:
        cfg = self.config
        lines = _window_lines(q.shape[0], q.shape[1], k.shape[2], cfg.sink_tokens, cfg.local_tokens, q.device)
        return vertical_slash_lines(*lines, q_len=q.shape[2], k_len=k.shape[2], block_size_q=cfg.block_size)
