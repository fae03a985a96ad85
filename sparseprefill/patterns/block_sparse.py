"""Block-sparse from mean-pooled Q/K block scores (FlexPrefill's query-aware map).

Blocks are ranked by softmax over pooled scores; each query-block row keeps the sink and diagonal
blocks plus the best others until ``mass`` of the row is covered (or the ``top_k`` best).
"""

from __future__ import annotations

from ..config import BlockSparseConfig, PatternName
from ..kernels import pooled_block_probs, select_blocks
from ..kernels.indices import BlockSparseIndex
from .base import SparsePattern


class BlockSparsePattern(SparsePattern):
    name = PatternName.BLOCK_SPARSE

    def __init__(self, config: BlockSparseConfig):
        self.config = config

    def estimate(self, q, k, *, scale, softcap, kv_head_index) -> BlockSparseIndex:
        cfg = self.config
        probs = pooled_block_probs(
            q, k, scale=scale, block_size=cfg.block_size, softcap=softcap, kv_head_index=kv_head_index
        )
        return select_blocks(
            probs, q_len=q.shape[2], k_len=k.shape[2], block_size_q=cfg.block_size, block_size_k=cfg.block_size,
            mass=cfg.mass, top_k=cfg.top_k, sink_blocks=cfg.sink_blocks,
        )
