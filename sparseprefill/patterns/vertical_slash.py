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
from ..kernels.vertical_slash import select_lines
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
        # On the GPU the line lists stay full width, so the index builder's one size read is the only
        # host wait of the estimate (each wait idles the GPU while the host catches up). The CPU
        # reference builder is O(blocks x lines) in memory, so there the lists are cut to size.
        trim = q.device.type != "cuda"
        vertical_count, vertical_index = select_lines(vertical, lines < cfg.sink_tokens, cfg.vertical_mass,
                                                      max_count=cfg.max_vertical, trim=trim)
        slash_count, slash_offset = select_lines(slash, lines < cfg.local_tokens, cfg.slash_mass,
                                                 max_count=cfg.max_slash, trim=trim)
        return build_vertical_slash_index(
            vertical_index, vertical_count, slash_offset, slash_count,
            q_len=q_len, k_len=k_len, block_size_q=cfg.block_size, slashes_sorted=True,
        )
