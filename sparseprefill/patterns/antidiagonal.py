"""Antidiagonal block scoring (XAttention): every query and key votes, at 1/stride of Q K^T.

Each query-block row keeps sink + diagonal blocks and then blocks in decreasing estimated mass
until ``mass`` of the row is covered, so each head (and each row) gets the budget its own attention
distribution needs. With ``vertical_share`` the head's best key columns (by the last queries' scores)
join the kept blocks as the index's single columns, which the block kernel attends after the blocks.
"""

from __future__ import annotations

import math

import torch

from ..config import DEFAULT_LAST_QUERIES, AntidiagonalConfig, AntidiagonalScoring, PatternName
from ..kernels import antidiagonal_block_mass, select_blocks, vertical_slash_scores
from ..kernels.block_sparse import blocks_with_columns
from ..kernels.indices import BlockSparseIndex
from .base import SparsePattern
from .block_sparse import misjudged_heads
from .cost import SAMPLED_SCORING_COST_FACTOR


def best_columns(vertical: torch.Tensor, share: float) -> tuple[torch.Tensor, torch.Tensor]:
    """``vertical [B, H, Lk]`` column scores -> the ``ceil(share * Lk)`` best columns per head, ascending
    (``[B, H, n]`` int32), and their count (``[B, H]`` int32); ties go to either column."""
    n = min(vertical.shape[-1], math.ceil(share * vertical.shape[-1]))
    columns = torch.topk(vertical, n, dim=-1, sorted=False).indices.sort(dim=-1).values.to(torch.int32)
    return columns, torch.full(vertical.shape[:2], n, dtype=torch.int32, device=vertical.device)


class AntidiagonalPattern(SparsePattern):
    name = PatternName.ANTIDIAGONAL

    def __init__(self, config: AntidiagonalConfig):
        self.config = config
        if config.scoring == AntidiagonalScoring.SAMPLED_MASS:
            self.estimate_cost_factor = SAMPLED_SCORING_COST_FACTOR

    def estimate(self, q, k, *, scale, softcap, kv_head_index) -> BlockSparseIndex:
        cfg = self.config
        block_mass = antidiagonal_block_mass(
            q, k, scale=scale, stride=cfg.stride, block_size=cfg.block_size, softcap=softcap,
            kv_head_index=kv_head_index, alternate=cfg.alternate,
            sampled=cfg.scoring == AntidiagonalScoring.SAMPLED_MASS,
        )
        blocks = select_blocks(
            block_mass, q_len=q.shape[2], k_len=k.shape[2], block_size_q=cfg.block_size,
            block_size_k=cfg.block_size, mass=cfg.mass, sink_blocks=cfg.sink_blocks,
            local_blocks=cfg.local_blocks,
        )
        if cfg.vertical_share == 0:
            return blocks
        vertical, _ = vertical_slash_scores(q, k, scale=scale, last_queries=DEFAULT_LAST_QUERIES, softcap=softcap,
                                            kv_head_index=kv_head_index)
        return blocks_with_columns(blocks, *best_columns(vertical, cfg.vertical_share))

    def unpredictable_heads(self, q, k, index, *, scale, softcap, kv_head_index):
        return misjudged_heads(q, k, index, self.config.spot_check_recall, scale=scale, softcap=softcap,
                               kv_head_index=kv_head_index)
