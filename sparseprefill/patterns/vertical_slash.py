"""Vertical-slash (MInference): the last queries vote for key columns and diagonals.

Sink columns and local diagonals are always kept; the rest are taken in order of estimated mass
until ``vertical_mass`` / ``slash_mass`` of it is covered (FlexPrefill's gamma rule, which keeps the
budget meaningful across lengths, unlike MInference's fixed counts).
"""

from __future__ import annotations

import torch

from ..config import PatternName, VerticalSlashConfig
from ..kernels import build_vertical_slash_index, vertical_slash_scores
from ..kernels.indices import VerticalSlashIndex
from ..kernels.vertical_slash import select_line_kinds
from .base import SparsePattern


class VerticalSlashPattern(SparsePattern):
    name = PatternName.VERTICAL_SLASH

    def __init__(self, config: VerticalSlashConfig):
        self.config = config

    def estimate(self, q, k, *, scale, softcap, kv_head_index) -> VerticalSlashIndex:
        cfg = self.config
        q_len, k_len = q.shape[2], k.shape[2]
        vertical, slash = vertical_slash_scores(
            q, k, scale=scale, last_queries=cfg.last_queries, softcap=softcap, kv_head_index=kv_head_index
        )
        lines = torch.arange(k_len, device=q.device)
        # Columns and diagonals in one batched selection (the estimate is bound by host time per torch
        # op, not by the device). On the GPU the line lists stay full width, so the index builder's one
        # size read is the only host wait of the estimate (each wait idles the GPU while the host
        # catches up). The CPU reference builder is O(blocks x lines) in memory: there they are cut to size.
        count, index = select_line_kinds(
            torch.stack([vertical, slash]), torch.stack([lines < cfg.sink_tokens, lines < cfg.local_tokens])[:, None, None],
            [cfg.vertical_mass, cfg.slash_mass], [cfg.max_vertical, cfg.max_slash], trim=False,
        )
        vertical_index, slash_offset = index[0], index[1]
        if q.device.type != "cuda":  # each kind to its own width (a host read costs nothing on the CPU)
            vertical_index = vertical_index[..., :max(int(count[0].max()), 1)]
            slash_offset = slash_offset[..., :max(int(count[1].max()), 1)]
        return build_vertical_slash_index(
            vertical_index, count[0], slash_offset, count[1],
            q_len=q_len, k_len=k_len, block_size_q=cfg.block_size, slashes_sorted=True,
        )
