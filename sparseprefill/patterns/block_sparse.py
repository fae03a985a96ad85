"""Block-sparse from mean-pooled Q/K block scores (FlexPrefill's query-aware map).

Blocks are ranked by softmax over pooled scores; each query-block row keeps the sink and diagonal
blocks plus the best others until ``mass`` of the row is covered (or the ``top_k`` best). The estimate
is one ``torch.library`` op of fixed output shapes, so torch.compile traces through it.
"""

from __future__ import annotations

import math

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
                    kv_head_index, quantile: float | None = None) -> torch.Tensor | None:
    """``[B, H]`` bool: heads whose ``index`` keeps less than ``threshold`` of the exact mass on the
    spot-checked query blocks (``quantile`` None: the mean over a block's rows, on any checked block;
    else that quantile of the per-row recall over every checked row); None when the check is off."""
    if threshold is None:
        return None
    q_len, rows = q.shape[2], index.block_size_q
    blocks = spot_check_blocks(q_len, rows)
    recall = library.call_block_sparse_block_recall(q, k, index, blocks, scale=scale, softcap=softcap,
                                                    kv_head_index=kv_head_index, per_row=quantile is not None)
    if quantile is None:
        return recall.amin(dim=-1) < threshold
    # The rows past the prompt (NaN) are dropped by position, known from the shapes alone, so that the
    # quantile is taken over real rows and the check stays traceable. Only the prompt's last block can be
    # partial and it is the last one checked, so the real rows are a prefix: a slice, not an index tensor
    # (whose host-to-device copy could not run inside a CUDA-graph capture).
    real_rows = sum(min(rows, q_len - block * rows) for block in blocks)
    return _quantile_last_dim(recall.flatten(-2)[..., :real_rows], quantile) < threshold


def _quantile_last_dim(values: torch.Tensor, quantile: float) -> torch.Tensor:
    """``torch.quantile(values, quantile, dim=-1)`` (linear interpolation) from a sort and two fixed
    positions: torch.quantile checks its arguments with data-dependent ops that torch.compile (2.11) cannot
    trace in a full graph."""
    ordered = values.sort(dim=-1).values
    position = quantile * (values.shape[-1] - 1)
    below, above = math.floor(position), math.ceil(position)
    return torch.lerp(ordered[..., below], ordered[..., above], position - below)


@torch.library.custom_op(f"{library.NAMESPACE}::pooled_block_estimate", mutates_args=())
def pooled_block_estimate_op(
    q: torch.Tensor, k: torch.Tensor, kv_head_index: torch.Tensor, scale: float, softcap: float, block_size: int,
    mass: float, top_k: int, sink_blocks: int, local_blocks: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(block_count [B, H, Rq], block_index [B, H, Rq, Rk])`` int32 (lists at the full key-block width);
    ``top_k`` 0 and ``softcap`` 0 are none."""
    probs = pooled_block_probs(q, k, scale=scale, block_size=block_size, softcap=softcap or None,
                               kv_head_index=kv_head_index)
    index = select_blocks(probs, q_len=q.shape[2], k_len=k.shape[2], block_size_q=block_size,
                          block_size_k=block_size, mass=mass, top_k=top_k or None, sink_blocks=sink_blocks,
                          local_blocks=local_blocks).at_full_width()
    return index.block_count, index.block_index


@pooled_block_estimate_op.register_fake
def _(q, k, kv_head_index, scale, softcap, block_size, mass, top_k, sink_blocks, local_blocks):
    b, h, q_len, _ = q.shape
    rows, key_blocks = -(-q_len // block_size), -(-k.shape[2] // block_size)
    return q.new_empty(b, h, rows, dtype=torch.int32), q.new_empty(b, h, rows, key_blocks, dtype=torch.int32)


class BlockSparsePattern(SparsePattern):
    name = PatternName.BLOCK_SPARSE
    traceable_estimate = True

    def __init__(self, config: BlockSparseConfig):
        self.config = config

    def estimate(self, q, k, *, scale, softcap, kv_head_index) -> BlockSparseIndex:
        cfg = self.config
        block_count, block_index = pooled_block_estimate_op(
            q, k, kv_head_index, scale, softcap or 0.0, cfg.block_size, cfg.mass, cfg.top_k or 0, cfg.sink_blocks,
            cfg.local_blocks)
        return BlockSparseIndex(block_count=block_count, block_index=block_index, block_size_q=cfg.block_size,
                                block_size_k=cfg.block_size, q_len=q.shape[2], k_len=k.shape[2])

    def unpredictable_heads(self, q, k, index, *, scale, softcap, kv_head_index) -> torch.Tensor | None:
        return misjudged_heads(q, k, index, self.config.spot_check_recall, scale=scale, softcap=softcap,
                               kv_head_index=kv_head_index, quantile=self.config.spot_check_quantile)
