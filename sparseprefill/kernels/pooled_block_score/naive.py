"""Mean-pooled block scores (FlexPrefill's query-aware map, MInference's block-sparse estimate)."""

from __future__ import annotations

import torch

from ..common import qk_scores
from ..mass_select import causal_block_layout


def _mean_pool(x: torch.Tensor, block_size: int) -> torch.Tensor:
    """``[B, H, L, D]`` -> ``[B, H, ceil(L / bs), D]`` fp32 means over the real rows of each block."""
    b, h, length, d = x.shape
    n_blocks = -(-length // block_size)
    pad = n_blocks * block_size - length
    x = x.float()
    if pad:
        x = torch.cat([x, x.new_zeros(b, h, pad, d)], dim=2)
    sums = x.reshape(b, h, n_blocks, block_size, d).sum(dim=3)
    counts = torch.full((n_blocks,), float(block_size), device=x.device)
    counts[-1] = block_size - pad
    return sums / counts[:, None]


def pooled_block_probs_naive(
    q: torch.Tensor,
    k: torch.Tensor,
    *,
    scale: float,
    block_size: int,
    softcap: float | None,
    kv_head_index: torch.Tensor,
) -> torch.Tensor:
    q_len, k_len = q.shape[2], k.shape[2]
    scores = qk_scores(_mean_pool(q, block_size), _mean_pool(k, block_size), kv_head_index, scale)
    if softcap is not None:
        scores = softcap * torch.tanh(scores / softcap)
    valid, _ = causal_block_layout(q_len, k_len, block_size, block_size, 0, q.device)
    return torch.softmax(scores.masked_fill(~valid, float("-inf")), dim=-1)
