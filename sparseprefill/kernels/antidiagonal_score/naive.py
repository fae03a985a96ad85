"""XAttention's strided antidiagonal block scoring.

Rows and keys are grouped by ``stride`` S. Reshaped row m scores reshaped key n with the antidiagonal
of their S x S sub-block of Q K^T, ``sum_i q[S m + S - 1 - i] . k[S n + i]`` (1/S of the FLOPs of
Q K^T, yet every query and key contributes). Scores are scaled by ``scale / S`` (an average logit),
masked causally at group granularity, softmaxed over each reshaped row, and summed into
``block_size`` x ``block_size`` blocks.
"""

from __future__ import annotations

import torch

from ..common import qk_scores
from ..geometry import query_offset

# Reshaped rows scored at once: bounds the fp32 buffer at Hq * ROW_CHUNK * (Lk / S) floats.
ROW_CHUNK = 1024


def _strided(x: torch.Tensor, stride: int, reverse: bool) -> torch.Tensor:
    """``[B, H, L, D]`` -> ``[B, H, ceil(L / S), S * D]``, zero-padding the last group."""
    b, h, length, d = x.shape
    pad = (-length) % stride
    if pad:
        x = torch.cat([x, x.new_zeros(b, h, pad, d)], dim=2)
    x = x.reshape(b, h, -1, stride, d)
    if reverse:
        x = x.flip(3)
    return x.reshape(b, h, -1, stride * d)


def antidiagonal_block_mass_naive(
    q: torch.Tensor,
    k: torch.Tensor,
    *,
    scale: float,
    stride: int,
    block_size: int,
    softcap: float | None,
    kv_head_index: torch.Tensor,
) -> torch.Tensor:
    b, hq, q_len, _ = q.shape
    k_len = k.shape[2]
    offset = query_offset(q_len, k_len)
    q_groups = _strided(q, stride, reverse=True)
    k_groups = _strided(k, stride, reverse=False)
    n_rows, n_cols = q_groups.shape[2], k_groups.shape[2]
    per_block = block_size // stride
    n_q_blocks = -(-q_len // block_size)
    n_k_blocks = -(-k_len // block_size)
    mass = torch.zeros(b, hq, n_q_blocks, n_k_blocks, dtype=torch.float32, device=q.device)
    rows_in_block = torch.zeros(n_q_blocks, dtype=torch.float32, device=q.device)
    col_first_key = torch.arange(n_cols, device=q.device) * stride
    col_block = torch.arange(n_cols, device=q.device) // per_block
    for m0 in range(0, n_rows, ROW_CHUNK):
        m1 = min(m0 + ROW_CHUNK, n_rows)
        scores = qk_scores(q_groups[:, :, m0:m1], k_groups, kv_head_index, scale / stride)
        if softcap is not None:
            scores = softcap * torch.tanh(scores / softcap)
        row_last_query = torch.clamp(torch.arange(m0, m1, device=q.device) * stride + stride - 1, max=q_len - 1) + offset
        causal = col_first_key[None, :] <= row_last_query[:, None]
        probs = torch.softmax(scores.masked_fill(~causal, float("-inf")), dim=-1)
        row_block = torch.arange(m0, m1, device=q.device) // per_block
        per_col_block = torch.zeros(b, hq, m1 - m0, n_k_blocks, dtype=torch.float32, device=q.device)
        per_col_block.index_add_(-1, col_block, probs)
        mass.index_add_(2, row_block, per_col_block)
        rows_in_block.index_add_(0, row_block, torch.ones(m1 - m0, device=q.device))
    return mass / rows_in_block[None, None, :, None]
