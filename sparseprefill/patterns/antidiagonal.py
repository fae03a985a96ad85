"""Antidiagonal block scoring (XAttention): every query and key votes, at 1/stride of Q K^T.

Each query-block row keeps sink + diagonal blocks and then blocks in decreasing estimated mass
until ``mass`` of the row is covered, so each head (and each row) gets the budget its own attention
distribution needs. With ``vertical_share`` the head's best key columns (by the last queries' scores)
join the kept blocks as the index's single columns, which the block kernel attends after the blocks.

The estimate is one ``torch.library`` op with fixed output shapes (block lists at the full key-block
width, column lists at the column budget), so ``torch.compile`` traces through a patched layer
(``fullgraph=True``) and nothing in it reads a size on the host.
"""

from __future__ import annotations

import math

import torch

from ..config import DEFAULT_LAST_QUERIES, AntidiagonalConfig, AntidiagonalScoring, PatternName
from ..kernels import antidiagonal_block_mass, select_blocks, vertical_slash_scores
from ..kernels.block_sparse import blocks_with_columns
from ..kernels.indices import BlockSparseIndex
from ..kernels.library import NAMESPACE
from .base import SparsePattern
from .block_sparse import misjudged_heads
from .cost import SAMPLED_SCORING_COST_FACTOR, antidiagonal_extras


def best_columns(vertical: torch.Tensor, share: float) -> tuple[torch.Tensor, torch.Tensor]:
    """``vertical [B, H, Lk]`` column scores -> the ``ceil(share * Lk)`` best columns per head, ascending
    (``[B, H, n]`` int32), and their count (``[B, H]`` int32); ties go to either column."""
    n = _columns_wanted(vertical.shape[-1], share)
    columns = torch.topk(vertical, n, dim=-1, sorted=False).indices.sort(dim=-1).values.to(torch.int32)
    return columns, torch.full(vertical.shape[:2], n, dtype=torch.int32, device=vertical.device)


def _columns_wanted(k_len: int, share: float) -> int:
    return min(k_len, math.ceil(share * k_len))


@torch.library.custom_op(f"{NAMESPACE}::antidiagonal_estimate", mutates_args=())
def antidiagonal_estimate_op(
    q: torch.Tensor, k: torch.Tensor, kv_head_index: torch.Tensor, scale: float, softcap: float, stride: int,
    block_size: int, mass: float, sink_blocks: int, local_blocks: int, alternate: bool, sampled: bool,
    vertical_share: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(block_count [B, H, Rq], block_index [B, H, Rq, Rk], column_count [B, H, Rq], column_index
    [B, H, Rq, V])`` int32, V = ``ceil(vertical_share * Lk)`` (0: no columns); ``softcap`` 0 is none."""
    softcap_or_none = softcap or None
    block_mass = antidiagonal_block_mass(q, k, scale=scale, stride=stride, block_size=block_size,
                                         softcap=softcap_or_none, kv_head_index=kv_head_index,
                                         alternate=alternate, sampled=sampled)
    blocks = select_blocks(block_mass, q_len=q.shape[2], k_len=k.shape[2], block_size_q=block_size,
                           block_size_k=block_size, mass=mass, sink_blocks=sink_blocks,
                           local_blocks=local_blocks).at_full_width()
    if vertical_share == 0:
        count = torch.zeros_like(blocks.block_count)
        return blocks.block_count, blocks.block_index, count, count.new_zeros(*count.shape, 0)
    vertical, _ = vertical_slash_scores(q, k, scale=scale, last_queries=DEFAULT_LAST_QUERIES,
                                        softcap=softcap_or_none, kv_head_index=kv_head_index)
    both = blocks_with_columns(blocks, *best_columns(vertical, vertical_share), trim=False)
    return both.block_count, both.block_index, both.column_count, both.column_index


@antidiagonal_estimate_op.register_fake
def _(q, k, kv_head_index, scale, softcap, stride, block_size, mass, sink_blocks, local_blocks, alternate, sampled,
      vertical_share):
    b, h, q_len, _ = q.shape
    rows, key_blocks = -(-q_len // block_size), -(-k.shape[2] // block_size)
    columns = _columns_wanted(k.shape[2], vertical_share) if vertical_share else 0
    make = lambda *shape: q.new_empty(*shape, dtype=torch.int32)  # noqa: E731
    return make(b, h, rows), make(b, h, rows, key_blocks), make(b, h, rows), make(b, h, rows, columns)


class AntidiagonalPattern(SparsePattern):
    name = PatternName.ANTIDIAGONAL
    traceable_estimate = True

    def __init__(self, config: AntidiagonalConfig):
        self.config = config
        if config.scoring == AntidiagonalScoring.SAMPLED_MASS:
            self.estimate_cost_factor = SAMPLED_SCORING_COST_FACTOR
        self.cost_extras = antidiagonal_extras(config.mass, config.vertical_share)

    def estimate(self, q, k, *, scale, softcap, kv_head_index) -> BlockSparseIndex:
        cfg = self.config
        block_count, block_index, column_count, column_index = antidiagonal_estimate_op(
            q, k, kv_head_index, scale, softcap or 0.0, cfg.stride, cfg.block_size, cfg.mass, cfg.sink_blocks,
            cfg.local_blocks, cfg.alternate, cfg.scoring == AntidiagonalScoring.SAMPLED_MASS, cfg.vertical_share)
        has_columns = cfg.vertical_share > 0
        return BlockSparseIndex(block_count=block_count, block_index=block_index, block_size_q=cfg.block_size,
                                block_size_k=cfg.block_size, q_len=q.shape[2], k_len=k.shape[2],
                                column_count=column_count if has_columns else None,
                                column_index=column_index if has_columns else None)

    def unpredictable_heads(self, q, k, index, *, scale, softcap, kv_head_index):
        return misjudged_heads(q, k, index, self.config.spot_check_recall, scale=scale, softcap=softcap,
                               kv_head_index=kv_head_index, quantile=self.config.spot_check_quantile)
