"""Triton recall of a block-sparse index on a few query blocks, through the vertical-slash recall kernel.

The checked rows of the index are rewritten as one key range per kept KV block (``[id x bs, id x bs +
bs)``, clipped to ``Lk``), plus the index's single columns if it has them, in a table with one row per
checked block, and the vertical-slash recall
kernel walks them (``listed_keys_recall_triton(rows_per_check=True)``): the same two passes (the dense
normaliser over every visible key, then the listed keys), so the two estimators' checks share one kernel.
"""

from __future__ import annotations

import torch

from ..indices import BlockSparseIndex
from ..recall import checked_blocks_on
from ..vertical_slash.triton_recall import RECALL_SPLIT_KEYS, listed_keys_recall_triton


def block_sparse_recall_triton(
    q: torch.Tensor,
    k: torch.Tensor,
    index: BlockSparseIndex,
    blocks: torch.Tensor,
    *,
    scale: float,
    softcap: float | None,
    kv_head_index: torch.Tensor,
    per_row: bool = False,
    split_keys: int = RECALL_SPLIT_KEYS,
) -> torch.Tensor:
    """GPU ``block_sparse_block_recall``: ``q [B, Hq, Lq, D]``, ``k [B, Hkv, Lk, D]``, ``index``
    ``[B, Hq, Rq, N]``, ``blocks [nb]`` query blocks -> ``[B, Hq, nb]`` fp32 mean recall per block
    (``per_row``: ``[B, Hq, nb, block_size_q]``, each row's, NaN past the prompt)."""
    rows = checked_blocks_on(tuple(blocks.tolist()), index.block_index.device, torch.long)
    count = index.block_count[:, :, rows].to(torch.int32).contiguous()
    first_key = index.block_index[:, :, rows].to(torch.int64) * index.block_size_k
    start = first_key.clamp(max=index.k_len).to(torch.int32).contiguous()
    end = (first_key + index.block_size_k).clamp(max=index.k_len).to(torch.int32).contiguous()
    if index.column_index is not None:
        column_count = index.column_count[:, :, rows].to(torch.int32).contiguous()
        column_slot = index.column_index[:, :, rows].to(torch.int32).contiguous()
    else:
        column_count = torch.zeros_like(count)
        column_slot = torch.zeros(*count.shape, 1, dtype=torch.int32, device=count.device)
    return listed_keys_recall_triton(q, k, (count, start, end, column_count, column_slot), blocks, index.block_size_q,
                                     rows_per_check=True, scale=scale, softcap=softcap, kv_head_index=kv_head_index,
                                     per_row=per_row, split_keys=split_keys)


__all__ = ["block_sparse_recall_triton"]
