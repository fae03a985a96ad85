"""Attention-mass recall of a sparse index against exact attention, computed blockwise.

Recall of query row ``i`` is the share of its exact softmax mass that falls on the keys an index
lists for it. Exact probabilities are computed one chunk of query rows at a time, so memory is
``O(chunk x Lk)`` per head, never ``L x L``; several indices are scored against the same chunk (the
exact attention is the expensive part, shared by every candidate).

Range keys are summed through a prefix sum over the chunk's probabilities (fp32: probabilities of a
row sum to 1, so the running sum's rounding error stays near 1e-7 x sqrt(Lk), far below the recall
differences between candidates), columns and KV blocks by gathering. Ranges and columns are disjoint by the ``VerticalSlashIndex`` contract, so no key is
counted twice; keys in a row's future have probability 0, so listing them costs no recall.
"""

from __future__ import annotations

import functools
from typing import Sequence

import torch

from .common import check_qkv, qk_scores, resolve_kv_head_index
from .geometry import query_offset
from .indices import BlockSparseIndex, VerticalSlashIndex

# Bytes of fp32 probabilities per chunk: bounds the memory of a recall pass whatever the length.
CHUNK_BYTES = 256 * 2**20

SparseIndex = BlockSparseIndex | VerticalSlashIndex | None


def exact_probs(q: torch.Tensor, k: torch.Tensor, r0: int, r1: int, *, scale: float, softcap: float | None,
                kv_head_index: torch.Tensor) -> torch.Tensor:
    """Rows ``[r0, r1)`` of causal softmax attention: ``[B, H, r1 - r0, Lk]`` fp32."""
    q_len, k_len = q.shape[2], k.shape[2]
    scores = qk_scores(q[:, :, r0:r1], k, kv_head_index, scale)
    if softcap is not None:
        scores = softcap * torch.tanh(scores / softcap)
    q_pos = torch.arange(r0, r1, device=q.device) + query_offset(q_len, k_len)
    causal = torch.arange(k_len, device=q.device)[None, :] <= q_pos[:, None]
    return torch.softmax(scores.masked_fill(~causal, float("-inf")), dim=-1)


def _kept_mass(index: SparseIndex, probs: torch.Tensor, prefix: torch.Tensor, r0: int) -> torch.Tensor:
    """``[B, H, C]`` probability mass on the keys ``index`` lists for rows ``r0 .. r0 + C``."""
    if index is None:  # dense: every key
        return probs.sum(-1)
    rows = torch.arange(r0, r0 + probs.shape[2], device=probs.device) // index.block_size_q
    if isinstance(index, VerticalSlashIndex):
        k_len = probs.shape[-1]
        count, start, end = index.block_ranges(rows)
        start, end = start.long().clamp(0, k_len), end.long().clamp(0, k_len)
        in_ranges = torch.gather(prefix, -1, end) - torch.gather(prefix, -1, start)
        range_ok = torch.arange(start.shape[-1], device=start.device) < count[..., None]
        kept = torch.where(range_ok, in_ranges, 0.0).sum(-1)
        if index.columns_per_head:  # one list per head, masked per block
            columns = index.column_index.long().clamp(0, k_len - 1).expand(-1, -1, rows.numel(), -1)
            column_ok = index.column_valid(rows)
        else:
            columns = index.column_index[:, :, rows].long().clamp(0, k_len - 1)
            column_ok = index.column_valid()[:, :, rows]
        on_columns = torch.where(column_ok, torch.gather(probs, -1, columns), 0.0)
        return kept + on_columns.sum(-1)
    if isinstance(index, BlockSparseIndex):
        bs = index.block_size_k
        n_blocks = index.num_kv_blocks
        pad = n_blocks * bs - probs.shape[-1]
        padded = torch.nn.functional.pad(probs, (0, pad)) if pad else probs
        block_mass = padded.reshape(*probs.shape[:3], n_blocks, bs).sum(-1)
        ids = index.block_index[:, :, rows].long().clamp(0, n_blocks - 1)
        kept = torch.where(index.slot_valid()[:, :, rows], torch.gather(block_mass, -1, ids), 0.0).sum(-1)
        if index.column_index is not None:  # columns lie outside the kept blocks (the index contract)
            columns = index.column_index[:, :, rows].long().clamp(0, probs.shape[-1] - 1)
            on_columns = torch.where(index.column_valid()[:, :, rows], torch.gather(probs, -1, columns), 0.0)
            kept = kept + on_columns.sum(-1)
        return kept
    raise TypeError(f"cannot score an index of type {type(index).__name__}")


def window_recall(
    indices: Sequence[SparseIndex],
    q: torch.Tensor,
    k: torch.Tensor,
    r0: int,
    r1: int,
    *,
    scale: float,
    softcap: float | None,
    kv_head_index: torch.Tensor,
) -> list[torch.Tensor]:
    """Recall of each index on query rows ``[r0, r1)`` only: a list of ``[B, H, r1 - r0]`` fp32.

    For sampling recall at long lengths (a few windows spread over the prompt) without the
    ``O(L^2)`` exact pass of ``index_recall``; memory is ``O((r1 - r0) x Lk)`` per head.
    """
    probs = exact_probs(q, k, r0, r1, scale=scale, softcap=softcap, kv_head_index=kv_head_index)
    prefix = None
    if any(isinstance(ix, VerticalSlashIndex) for ix in indices):
        prefix = torch.zeros(*probs.shape[:3], k.shape[2] + 1, dtype=probs.dtype, device=probs.device)
        torch.cumsum(probs, -1, out=prefix[..., 1:])
    total = probs.sum(-1)
    return [(_kept_mass(ix, probs, prefix, r0) / total).clamp_(max=1.0) for ix in indices]


def index_recall(
    indices: Sequence[SparseIndex],
    q: torch.Tensor,
    k: torch.Tensor,
    *,
    scale: float,
    softcap: float | None,
    kv_head_index: torch.Tensor,
) -> list[torch.Tensor]:
    """Per-row recall of each index: a list of ``[B, H, Lq]`` fp32 (one per index, in order).

    Args:
        indices: indices over the same ``H`` query heads of ``q [B, H, Lq, D]`` (``None`` = dense).
        k: ``[B, Hkv, Lk, D]``; ``kv_head_index`` maps query heads to KV heads.
    """
    b, h, q_len, _ = q.shape
    k_len = k.shape[2]
    block = max((ix.block_size_q for ix in indices if ix is not None), default=1)
    if any(ix is not None and block % ix.block_size_q for ix in indices):
        block = 1  # chunks need only align with every index's query blocks; 1 always does
    rows_per_chunk = max(block, (CHUNK_BYTES // max(b * h * (k_len + 1) * 4, 1)) // block * block)
    recalls = [torch.empty(b, h, q_len, dtype=torch.float32, device=q.device) for _ in indices]
    for r0 in range(0, q_len, rows_per_chunk):
        r1 = min(q_len, r0 + rows_per_chunk)
        chunk = window_recall(indices, q, k, r0, r1, scale=scale, softcap=softcap, kv_head_index=kv_head_index)
        for recall, part in zip(recalls, chunk):
            recall[:, :, r0:r1] = part
    return recalls


def checked_recall_blocks(q: torch.Tensor, k: torch.Tensor, index: BlockSparseIndex | VerticalSlashIndex, blocks,
                          kv_head_index: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    """The arguments of a per-block recall check, validated: ``(kv_head_index, blocks)`` with ``blocks``
    a CPU int64 tensor of query blocks of ``index`` (checked on the host, so the check never waits for
    the device)."""
    _, hq, q_len, hkv, _, _ = check_qkv(q, k, k)
    kv_head_index = resolve_kv_head_index(kv_head_index, hq, hkv, q.device)
    n_blocks = -(-q_len // index.block_size_q)
    blocks = torch.as_tensor(blocks, dtype=torch.long).cpu()
    if blocks.numel() and not (0 <= int(blocks.min()) and int(blocks.max()) < n_blocks):
        raise ValueError(f"blocks must be query blocks of the index (0..{n_blocks - 1}), got {blocks.tolist()}")
    return kv_head_index, blocks


@functools.lru_cache(maxsize=256)
def checked_blocks_on(blocks: tuple[int, ...], device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """The checked query blocks as a tensor on ``device``, built once per (blocks, device, dtype): a
    host-to-device copy on every call cannot run inside a CUDA-graph capture, and a capture replays
    the first call's buffer, which this keeps alive. Callers must not write to it."""
    return torch.tensor(blocks, dtype=dtype, device=device)
