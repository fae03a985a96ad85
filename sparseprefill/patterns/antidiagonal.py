"""Antidiagonal block scoring (XAttention): every query and key votes, at 1/stride of Q K^T.

Each query-block row keeps sink + diagonal blocks and then blocks in decreasing estimated mass
until ``mass`` of the row is covered, so each head (and each row) gets the budget its own attention
distribution needs.
"""

from __future__ import annotations

from ..config import AntidiagonalConfig, AntidiagonalScoring, PatternName
from ..kernels import antidiagonal_block_mass, select_blocks
from ..kernels.indices import BlockSparseIndex
from .base import SparsePattern
from .block_sparse import misjudged_heads
from .cost import SAMPLED_SCORING_COST_FACTOR


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
        return select_blocks(
            block_mass, q_len=q.shape[2], k_len=k.shape[2], block_size_q=cfg.block_size,
            block_size_k=cfg.block_size, mass=cfg.mass, sink_blocks=cfg.sink_blocks,
            local_blocks=cfg.local_blocks,
        )

    def unpredictable_heads(self, q, k, index, *, scale, softcap, kv_head_index):
        return misjudged_heads(q, k, index, self.config.spot_check_recall, scale=scale, softcap=softcap,
                               kv_head_index=kv_head_index)
