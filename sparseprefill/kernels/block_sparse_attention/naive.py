"""fp32 reference for block-sparse attention; also the CPU implementation.

Walks the query blocks; for each, gathers only the listed KV blocks of each head's KV head, so the
work is proportional to the index density, like the GPU kernel's.
"""

from __future__ import annotations

import torch

from ..common import attend_gathered
from ..geometry import query_offset
from ..indices import BlockSparseIndex


def block_sparse_attention_naive(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    index: BlockSparseIndex,
    *,
    scale: float,
    window: int | None,
    softcap: float | None,
    kv_head_index: torch.Tensor,
    out: torch.Tensor,
) -> torch.Tensor:
    q_len, k_len = q.shape[2], k.shape[2]
    offset = query_offset(q_len, k_len)
    bq, bk = index.block_size_q, index.block_size_k
    slot_valid = index.slot_valid()
    within_block = torch.arange(bk, device=q.device)
    for r in range(index.block_count.shape[2]):
        row0, row1 = r * bq, min((r + 1) * bq, q_len)
        n = int(index.block_count[:, :, r].max()) if index.block_count.numel() else 0
        n = max(n, 1)  # keep shapes non-empty; rows with no valid slot produce zeros
        ids = index.block_index[:, :, r, :n].long()
        positions = (ids[..., None] * bk + within_block).flatten(-2)
        valid = (slot_valid[:, :, r, :n, None] & (positions.view(*ids.shape, bk) < k_len)).flatten(-2)
        q_positions = torch.arange(row0, row1, device=q.device) + offset
        block_out = attend_gathered(
            q[:, :, row0:row1], k, v, positions, valid, q_positions, kv_head_index, scale, window, softcap
        )
        out[:, :, row0:row1] = block_out.to(out.dtype)
    return out
