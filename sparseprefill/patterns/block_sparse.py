"""Block-sparse from mean-pooled Q/K block scores (FlexPrefill's query-aware map).

Blocks are ranked by softmax over pooled scores; each query-block row keeps the sink and diagonal
blocks plus the best others until ``mass`` of the row is covered (or the ``top_k`` best).
"""

from __future__ import annotations

import torch

from ..config import SPOT_CHECK_BLOCKS, BlockSparseConfig, PatternName
from ..kernels import library, pooled_block_probs, select_blocks
from ..kernels.geometry import spread_window_ends
from ..kernels.indices import BlockSparseIndex
from .base import SparsePattern


def spot_check_blocks(q_len: int, block_size: int) -> list[int]:
    """The query blocks a block estimator's spot check scores: those ending ``SPOT_CHECK_BLOCKS`` evenly
    spread ends over the prompt (the last block among them; fewer on short prompts)."""
    return sorted({(end - 1) // block_size for end in spread_window_ends(q_len, block_size, SPOT_CHECK_BLOCKS)})


def misjudged_heads(q, k, index: BlockSparseIndex, threshold: float | None, *, scale, softcap,
                    kv_head_index) -> torch.Tensor | None:
    """``[B, H]`` bool: heads whose ``index`` keeps less than ``threshold`` of the exact mass (mean over a
    block's rows) on any spot-checked query block; None when the check is off."""
    if threshold is None:
        return None
    blocks = spot_check_blocks(q.shape[2], index.block_size_q)
    recall = library.call_block_sparse_block_recall(q, k, index, blocks, scale=scale, softcap=softcap,
                                                    kv_head_index=kv_head_index)
    return recall.amin(dim=-1) < threshold


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
            local_blocks=cfg.local_blocks,
        )

    def unpredictable_heads(self, q, k, index, *, scale, softcap, kv_head_index) -> torch.Tensor | None:
        return misjudged_heads(q, k, index, self.config.spot_check_recall, scale=scale, softcap=softcap,
                               kv_head_index=kv_head_index)
