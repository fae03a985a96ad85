"""fp32 references of the block-sparse kernels (also their CPU implementation): strided antidiagonal
block scores (XAttention), mean-pooled block scores, and attention over listed KV blocks.
"""

from __future__ import annotations

from dataclasses import replace

import torch

from ..common import attend_gathered, compact, qk_scores
from ..geometry import causal_block_layout, query_offset
from ..indices import BlockSparseIndex
from ..mass_select import keep_by_cumulative_mass

# XAttention's strided antidiagonal block scoring.
# 
# Rows and keys are grouped by ``stride`` S. Reshaped row m scores reshaped key n with the antidiagonal
# of their S x S sub-block of Q K^T, ``sum_i q[S m + S - 1 - i] . k[S n + i]`` (1/S of the FLOPs of
# Q K^T, yet every query and key contributes); with ``alternate``, odd rows use
# ``q[S m + S - 2 - i]``, the antidiagonal of the other offset parity. Scores are scaled by ``scale / S`` (an average logit),
# masked causally at group granularity, softmaxed over each reshaped row, and summed into
# ``block_size`` x ``block_size`` blocks.

# Reshaped rows scored at once: bounds the fp32 buffer at Hq * ROW_CHUNK * (Lk / S) floats.
ROW_CHUNK = 1024
# The sampled scoring keeps each pair's logit: Hq * SAMPLED_ROW_CHUNK * Lk floats (117 MB at 128K, 14 heads).
SAMPLED_ROW_CHUNK = 16


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
    alternate: bool = False,
    sampled: bool = False,
) -> torch.Tensor:
    """Reference of ``antidiagonal_block_mass``: ``q [B, Hq, Lq, D]``, ``k [B, Hkv, Lk, D]`` ->
    ``[B, Hq, ceil(Lq / block_size), ceil(Lk / block_size)]`` fp32 block mass, rows summing to 1.
    ``alternate``: odd reshaped rows read queries ``S m + S - 2 - i`` (one earlier). ``sampled``: the
    softmax mass of the sampled pairs themselves (``_sampled_block_mass``)."""
    if sampled:
        return _sampled_block_mass(q, k, scale=scale, stride=stride, block_size=block_size, softcap=softcap,
                                   kv_head_index=kv_head_index, alternate=alternate)
    b, hq, q_len, _ = q.shape
    k_len = k.shape[2]
    offset = query_offset(q_len, k_len)
    q_groups = _strided(q, stride, reverse=True)
    if alternate and q_groups.shape[2] > 1:
        # One zero row in front shifts every group's queries one position earlier.
        shifted = _strided(torch.cat([q.new_zeros(*q.shape[:2], 1, q.shape[3]), q], dim=2), stride, reverse=True)
        odd = (torch.arange(q_groups.shape[2], device=q.device) % 2 == 1)[None, None, :, None]
        q_groups = torch.where(odd, shifted[:, :, : q_groups.shape[2]], q_groups)
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


def _sampled_block_mass(q, k, *, scale, stride, block_size, softcap, kv_head_index, alternate) -> torch.Tensor:
    """The antidiagonal sample's own softmax mass per block: reshaped row ``m`` holds the ``S``
    antidiagonal pairs ``(S m + S - 1 - i [- 1 on odd rows when alternating], S n + i)`` of every key
    group ``n``; each pair's logit is exact (scaled, soft-capped), pairs outside the sequences or in the
    future of their query are dropped, and each row is normalised over all its pairs:
    ``p[m, n] = sum_i exp(s[m, n, i]) / sum_{n', i} exp(s[m, n', i])``. Unlike the mean of the ``S``
    logits, a sum of their exponentials keeps a spike on one key, so the estimate tracks the true
    mass. A row without any valid pair (only when ``Lq + Lk < S``) contributes nothing."""
    b, hq, q_len, d = q.shape
    k_len = k.shape[2]
    offset = query_offset(q_len, k_len)
    n_rows, n_cols = -(-q_len // stride), -(-k_len // stride)
    per_block = block_size // stride
    n_q_blocks, n_k_blocks = -(-q_len // block_size), -(-k_len // block_size)
    dev = q.device
    slots = torch.arange(stride, device=dev)
    rows = torch.arange(n_rows, device=dev)
    # Query position of (row, slot) and key position of (group, slot); slot i pairs them.
    q_pos = rows[:, None] * stride + (stride - 1 - slots)[None, :]
    if alternate:
        q_pos = q_pos - (rows % 2)[:, None]
    k_pos = torch.arange(n_cols, device=dev)[:, None] * stride + slots[None, :]
    q_ok, k_ok = q_pos < q_len, k_pos < k_len
    q_rows = q.float()[:, :, q_pos.clamp(max=q_len - 1)]  # [B, Hq, rows, S, D]
    k_rows = k.float()[:, kv_head_index][:, :, k_pos.clamp(max=k_len - 1)]  # [B, Hq, groups, S, D]
    mass = torch.zeros(b, hq, n_q_blocks, n_k_blocks, dtype=torch.float32, device=dev)
    rows_in_block = torch.zeros(n_q_blocks, dtype=torch.float32, device=dev)
    col_block = torch.arange(n_cols, device=dev) // per_block
    for m0 in range(0, n_rows, SAMPLED_ROW_CHUNK):
        m1 = min(m0 + SAMPLED_ROW_CHUNK, n_rows)
        logits = torch.einsum("bhmid,bhnid->bhmni", q_rows[:, :, m0:m1], k_rows) * scale
        if softcap is not None:
            logits = softcap * torch.tanh(logits / softcap)
        ok = (q_ok[m0:m1, None, :] & k_ok[None, :, :]
              & (k_pos[None, :, :] <= q_pos[m0:m1, None, :] + offset))  # [rows, groups, S]
        logits = logits.masked_fill(~ok, float("-inf"))
        top = logits.amax(dim=(3, 4), keepdim=True)
        top = torch.where(torch.isfinite(top), top, torch.zeros_like(top))
        weights = torch.exp(logits - top).sum(-1)  # [B, Hq, rows, groups]
        total = weights.sum(-1, keepdim=True)
        probs = weights / torch.where(total > 0, total, torch.ones_like(total))
        row_block = torch.arange(m0, m1, device=dev) // per_block
        per_col_block = torch.zeros(b, hq, m1 - m0, n_k_blocks, dtype=torch.float32, device=dev)
        per_col_block.index_add_(-1, col_block, probs)
        mass.index_add_(2, row_block, per_col_block)
        rows_in_block.index_add_(0, row_block, torch.ones(m1 - m0, device=dev))
    return mass / rows_in_block[None, None, :, None]


# Mean-pooled block scores (FlexPrefill's query-aware map, MInference's block-sparse estimate).

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
    """Reference of ``pooled_block_probs``: ``q [B, Hq, Lq, D]``, ``k [B, Hkv, Lk, D]`` ->
    ``[B, Hq, ceil(Lq / bs), ceil(Lk / bs)]`` fp32 softmax over the causal blocks of pooled scores."""
    q_len, k_len = q.shape[2], k.shape[2]
    scores = qk_scores(_mean_pool(q, block_size), _mean_pool(k, block_size), kv_head_index, scale)
    if softcap is not None:
        scores = softcap * torch.tanh(scores / softcap)
    valid, _ = causal_block_layout(q_len, k_len, block_size, block_size, 0, q.device)
    return torch.softmax(scores.masked_fill(~valid, float("-inf")), dim=-1)


# fp32 reference for block-sparse attention; also the CPU implementation.
# 
# Walks the query blocks; for each, gathers only the listed KV blocks of each head's KV head, so the
# work is proportional to the index density, like the GPU kernel's.

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
    """Reference of ``block_sparse_attention``: ``q [B, Hq, Lq, D]``, ``k, v [B, Hkv, Lk, D]``, ``index``
    ``[B, Hq, ceil(Lq / block_size_q), N]`` -> ``out [B, Hq, Lq, D]`` (exact softmax over the listed blocks
    and columns)."""
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
        if index.column_index is not None:
            n_columns = max(int(index.column_count[:, :, r].max()) if index.column_count.numel() else 0, 1)
            columns = index.column_index[:, :, r, :n_columns].long()
            column_ok = index.column_valid()[:, :, r, :n_columns] & (columns >= 0) & (columns < k_len)
            positions = torch.cat([positions, torch.where(column_ok, columns, 0)], dim=-1)
            valid = torch.cat([valid, column_ok], dim=-1)
        q_positions = torch.arange(row0, row1, device=q.device) + offset
        block_out = attend_gathered(
            q[:, :, row0:row1], k, v, positions, valid, q_positions, kv_head_index, scale, window, softcap
        )
        out[:, :, row0:row1] = block_out.to(out.dtype)
    return out


def select_blocks_naive(
    block_scores: torch.Tensor, *, q_len: int, k_len: int, block_size_q: int, block_size_k: int, mass: float,
    top_k: int | None = None, sink_blocks: int = 1, local_blocks: int = 0,
) -> BlockSparseIndex:
    """``select_blocks`` by sorting (``keep_by_cumulative_mass``), lists padded to the longest row."""
    valid, forced = causal_block_layout(q_len, k_len, block_size_q, block_size_k, sink_blocks, block_scores.device,
                                        local_blocks)
    if block_scores.shape[-2:] != valid.shape:
        raise ValueError(f"block_scores {tuple(block_scores.shape)} do not match block grid {tuple(valid.shape)}")
    valid = valid.expand_as(block_scores)
    keep = keep_by_cumulative_mass(block_scores, valid, forced.expand_as(block_scores), mass, top_k=top_k)
    count, index = compact(keep)
    return BlockSparseIndex(
        block_count=count, block_index=index, block_size_q=block_size_q, block_size_k=block_size_k,
        q_len=q_len, k_len=k_len,
    )


def blocks_with_columns_naive(
    blocks: BlockSparseIndex, vertical_index: torch.Tensor, vertical_count: torch.Tensor
) -> BlockSparseIndex:
    """Reference of ``blocks_with_columns``, one query block at a time: the listed columns that the
    block's last row can see and whose KV block the row does not keep, ascending."""
    b_size, h_size, n_rows = blocks.block_count.shape
    offset = query_offset(blocks.q_len, blocks.k_len)
    picked = {}
    for b in range(b_size):
        for h in range(h_size):
            head_columns = sorted(set(vertical_index[b, h, :int(vertical_count[b, h])].tolist()))
            for r in range(n_rows):
                kept = set(blocks.block_index[b, h, r, :int(blocks.block_count[b, h, r])].tolist())
                last_row = offset + min((r + 1) * blocks.block_size_q, blocks.q_len) - 1
                picked[b, h, r] = [c for c in head_columns if 0 <= c < blocks.k_len and c <= last_row
                                   and c // blocks.block_size_k not in kept]
    width = max([len(cols) for cols in picked.values()] + [1])
    column_count = torch.zeros(b_size, h_size, n_rows, dtype=torch.int32)
    column_index = torch.zeros(b_size, h_size, n_rows, width, dtype=torch.int32)
    for key, cols in picked.items():
        column_count[key] = len(cols)
        column_index[key][: len(cols)] = torch.tensor(cols, dtype=torch.int32)
    device = blocks.block_index.device
    return replace(blocks, column_count=column_count.to(device), column_index=column_index.to(device))
