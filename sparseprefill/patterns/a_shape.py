"""A-shape (StreamingLLM): the first ``sink_tokens`` keys plus a ``local_tokens`` window. Static: no
estimation cost, but blind to anything in the middle of the context."""

from __future__ import annotations

import torch

from ..config import AShapeConfig, PatternName
from ..kernels import build_vertical_slash_index
from ..kernels.indices import VerticalSlashIndex
from .base import SparsePattern


def window_index(
    batch: int, heads: int, q_len: int, k_len: int, *, sink_tokens: int, local_tokens: int, block_size: int,
    device: torch.device,
) -> VerticalSlashIndex:
    """Sink columns + the ``local_tokens`` nearest diagonals, as a vertical-slash index."""
    n_sink = min(sink_tokens, k_len)
    n_local = min(local_tokens, k_len)
    columns = torch.arange(n_sink, device=device).expand(batch, heads, n_sink)
    diagonals = torch.arange(n_local, device=device).expand(batch, heads, n_local)
    return build_vertical_slash_index(
        columns, torch.full((batch, heads), n_sink, device=device),
        diagonals, torch.full((batch, heads), n_local, device=device),
        q_len=q_len, k_len=k_len, block_size_q=block_size,
    )


class AShapePattern(SparsePattern):
    name = PatternName.A_SHAPE

    def __init__(self, config: AShapeConfig):
        self.config = config

    def estimate(self, q, k, *, scale, softcap, kv_head_index) -> VerticalSlashIndex:
        cfg = self.config
        return window_index(
            q.shape[0], q.shape[1], q.shape[2], k.shape[2], sink_tokens=cfg.sink_tokens,
            local_tokens=cfg.local_tokens, block_size=cfg.block_size, device=q.device,
        )
