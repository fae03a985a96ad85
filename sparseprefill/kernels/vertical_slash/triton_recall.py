"""Triton recall of a vertical-slash index on a few query blocks: the share of each row's exact
attention mass that the block's listed keys hold, averaged over the block's rows.

One program per (checked query block, batch x query head, part of the keys): a check scores only a
few query blocks per head, so the keys are split into ``RECALL_SPLIT_KEYS``-key parts to fill the GPU.
Pass 1 walks the part's causally visible keys in ``BLOCK_N``-key tiles and keeps each row's running
max and sum of ``exp2`` (the dense softmax normaliser); pass 2 walks the block's ranges clipped to the
part (and, in the first part, its columns) the way the attention kernel does and keeps the same
statistics over the listed keys only. The parts' statistics are folded on the host side of the launch
(rescaled to their common max, as the online softmax does between tiles); a row's recall is then
``exp2(m_kept - m_all) * l_kept / l_all``. No probability matrix is materialised: the torch
reference (``recall.window_recall``) holds ``rows x Lk`` fp32 probabilities and their prefix sums,
tens of milliseconds per layer at 128K, where this costs about two 64-row attention passes.
A block-sparse index's checked rows, written as one range per kept KV block, take the same kernel
(``listed_keys_recall_triton(rows_per_check=True)``; ``block_sparse.block_sparse_block_recall``).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ..indices import VerticalSlashIndex
from ..recall import checked_blocks_on
from ..triton_common import column_keys, load_rows, log2_scores, mask_scores, program_head, query_rows, row_stats_step

RECALL_KEY_TILE = 64  # keys per tile of the dense pass; ranges and columns use the attention's tile
_NO_WINDOW = tl.constexpr(0)  # mask_scores takes a window argument; this kernel never has one
# Keys each program walks: a check has only a few query blocks per head (8 at 128K: 112 programs for
# Qwen's 14 heads on an H100's 132 SMs, 2.5-3.7 ms per layer, each program walking 128K keys twice), so
# the keys are split across programs and the per-row statistics of the parts are folded afterwards.
RECALL_SPLIT_KEYS = 8192


@triton.jit
def _block_recall_kernel(
    Q, K, KvHeadIndex, Blocks, RangeCount, RangeStart, RangeEnd, ColumnCount, ColumnIndex, Out,
    stride_qb, stride_qh, stride_qm, stride_qd,
    stride_kb, stride_kh, stride_kn, stride_kd,
    stride_rcb, stride_rch, stride_rcm,
    stride_rb, stride_rh, stride_rm, stride_rn,
    stride_ccb, stride_cch, stride_ccm,
    stride_cb, stride_ch, stride_cm, stride_cn,
    num_heads, n_checked, q_len, k_len, q_offset, score_scale, softcap, split_keys, n_splits,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_Q: tl.constexpr, DENSE_N: tl.constexpr,
    SPARSE_N: tl.constexpr, HAS_SOFTCAP: tl.constexpr, UPCAST: tl.constexpr, ROW_PER_CHECK: tl.constexpr = False,
):
    w = tl.program_id(0)
    pid_bh = tl.program_id(1)
    split = tl.program_id(2)  # this program's keys: [lo, hi); the columns all go to split 0
    lo = split * split_keys
    hi = lo + split_keys
    b, h, kv_h = program_head(KvHeadIndex, num_heads)
    r = tl.load(Blocks + w)  # the index row (query block) this program checks
    offs_m, m_ok, offs_d, d_ok, q = query_rows(Q, b, h, r * BLOCK_Q, q_len, stride_qb, stride_qh, stride_qm,
                                               stride_qd, HEAD_DIM, BLOCK_D, BLOCK_Q, UPCAST)
    q_pos = offs_m + q_offset
    last_key = tl.minimum(r * BLOCK_Q + BLOCK_Q, q_len) - 1 + q_offset
    k_base = K + b * stride_kb + kv_h * stride_kh

    # --- pass 1: every visible key (the dense normaliser)
    m_all = tl.full([BLOCK_Q], float("-inf"), dtype=tl.float32)
    l_all = tl.zeros([BLOCK_Q], dtype=tl.float32)
    for start_n in range(lo, tl.minimum(hi, last_key + 1), DENSE_N):
        offs_n = start_n + tl.arange(0, DENSE_N)
        n_ok = (offs_n < k_len) & (offs_n < hi)
        k = load_rows(k_base, offs_n, n_ok, stride_kn, offs_d, d_ok, stride_kd, UPCAST)
        s = mask_scores(log2_scores(q, k, score_scale, softcap, HAS_SOFTCAP), offs_n, n_ok, q_pos, _NO_WINDOW, False)
        m_all, l_all = row_stats_step(s, m_all, l_all)

    # --- pass 2: the listed keys only (ranges, then columns; disjoint by the index contract)
    m_kept = tl.full([BLOCK_Q], float("-inf"), dtype=tl.float32)
    l_kept = tl.zeros([BLOCK_Q], dtype=tl.float32)
    # ROW_PER_CHECK: the index holds only the checked blocks, row w for Blocks[w] (a block-sparse index's
    # checked rows as ranges); otherwise it is a whole index and the checked block is its row.
    if ROW_PER_CHECK:
        r_wide = w.to(tl.int64)
    else:
        r_wide = r.to(tl.int64)
    n_ranges = tl.load(RangeCount + b * stride_rcb + h * stride_rch + r_wide * stride_rcm)
    range_row = b * stride_rb + h * stride_rh + r_wide * stride_rm
    for i in range(0, n_ranges):
        start = tl.maximum(tl.load(RangeStart + range_row + i * stride_rn), lo)
        end = tl.minimum(tl.minimum(tl.load(RangeEnd + range_row + i * stride_rn), k_len), hi)
        for start_n in range(start, end, SPARSE_N):
            offs_n = start_n + tl.arange(0, SPARSE_N)
            n_ok = offs_n < end
            k = load_rows(k_base, offs_n, n_ok, stride_kn, offs_d, d_ok, stride_kd, UPCAST)
            s = mask_scores(log2_scores(q, k, score_scale, softcap, HAS_SOFTCAP), offs_n, n_ok, q_pos, _NO_WINDOW,
                            False)
            m_kept, l_kept = row_stats_step(s, m_kept, l_kept)
    n_columns = tl.where(split == 0, tl.load(ColumnCount + b * stride_ccb + h * stride_cch + r_wide * stride_ccm), 0)
    column_row = ColumnIndex + b * stride_cb + h * stride_ch + r_wide * stride_cm
    for c0 in range(0, n_columns, SPARSE_N):
        offs_n, n_ok = column_keys(column_row, c0, n_columns, k_len, stride_cn, SPARSE_N)
        k = load_rows(k_base, offs_n, n_ok, stride_kn, offs_d, d_ok, stride_kd, UPCAST)
        s = mask_scores(log2_scores(q, k, score_scale, softcap, HAS_SOFTCAP), offs_n, n_ok, q_pos, _NO_WINDOW, False)
        m_kept, l_kept = row_stats_step(s, m_kept, l_kept)

    # Out [4, B x Hq, nb, n_splits, BLOCK_Q]: this part's running max and sum, over every key, then over
    # the listed keys, for each row (rows past the prompt saw nothing: max -inf, sum 0).
    offs_row = tl.arange(0, BLOCK_Q)
    part = Out + ((pid_bh * n_checked + w) * n_splits + split) * BLOCK_Q + offs_row
    plane = tl.num_programs(1) * n_checked * n_splits * BLOCK_Q
    tl.store(part, tl.where(m_ok, m_all, float("-inf")))
    tl.store(part + plane, tl.where(m_ok, l_all, 0.0))
    tl.store(part + 2 * plane, tl.where(m_ok, m_kept, float("-inf")))
    tl.store(part + 3 * plane, tl.where(m_ok, l_kept, 0.0))


def block_recall_triton(
    q: torch.Tensor,
    k: torch.Tensor,
    index: VerticalSlashIndex,
    blocks: torch.Tensor,
    *,
    scale: float,
    softcap: float | None,
    kv_head_index: torch.Tensor,
    split_keys: int = RECALL_SPLIT_KEYS,
) -> torch.Tensor:
    """GPU ``vertical_slash_block_recall``: ``q [B, Hq, Lq, D]``, ``k [B, Hkv, Lk, D]``, ``index``
    ``[B, Hq, Rq, ...]``, ``blocks [nb]`` index rows -> ``[B, Hq, nb]`` fp32 mean recall per block."""
    per_check = index.columns_per_head or index.ranges_per_head
    if per_check:
        # The checked blocks' own lists (a few blocks: O(checked x lines)), one row per check.
        rows = torch.as_tensor(blocks, dtype=torch.long).to(index.range_count.device)
        lists = (*index.block_ranges(rows), *index.block_columns(rows))
    else:
        lists = (index.range_count, index.range_start, index.range_end, index.column_count, index.column_index)
    return listed_keys_recall_triton(q, k, lists, blocks, index.block_size_q, rows_per_check=per_check,
                                     scale=scale, softcap=softcap, kv_head_index=kv_head_index, split_keys=split_keys)


def listed_keys_recall_triton(
    q: torch.Tensor,
    k: torch.Tensor,
    lists: tuple[torch.Tensor, ...],
    blocks: torch.Tensor,
    block_q: int,
    *,
    rows_per_check: bool,
    scale: float,
    softcap: float | None,
    kv_head_index: torch.Tensor,
    per_row: bool = False,
    split_keys: int = RECALL_SPLIT_KEYS,
) -> torch.Tensor:
    """Mean recall per checked query block of the keys ``lists`` name: ``(range_count [B, Hq, R],
    range_start / range_end [B, Hq, R, W], column_count [B, Hq, R], column_index [B, Hq, R, C])`` in the
    ``VerticalSlashIndex`` layout, with ``R`` every query block (``rows_per_check=False``) or one row per
    entry of ``blocks [nb]`` (``True``) -> ``[B, Hq, nb]`` fp32; with ``per_row`` each row's recall instead,
    ``[B, Hq, nb, block_q]``, NaN on rows past the prompt. Each program walks ``split_keys`` keys (a
    multiple of the key tiles); the parts' row statistics are folded here."""
    from .triton_attention import vertical_slash_tile_sizes

    b, hq, q_len, head_dim = q.shape
    k_len = k.shape[2]
    range_count, range_start, range_end, column_count, column_index = lists
    _, sparse_n, _, num_warps, num_stages, block_d = vertical_slash_tile_sizes(head_dim, block_q, q.element_size())
    dense_n = min(RECALL_KEY_TILE, sparse_n * 2)
    if split_keys < 1 or split_keys % max(dense_n, sparse_n):
        raise ValueError(f"split_keys must be a positive multiple of the key tiles ({max(dense_n, sparse_n)}), "
                         f"got {split_keys}")
    blocks = checked_blocks_on(tuple(int(b) for b in blocks.tolist()), q.device, torch.int32)
    if blocks.numel() == 0:
        return torch.empty(b, hq, 0, *((block_q,) if per_row else ()), dtype=torch.float32, device=q.device)
    n_splits = -(-k_len // split_keys)
    parts = torch.empty(4, b * hq, blocks.numel(), n_splits, block_q, dtype=torch.float32, device=q.device)
    _block_recall_kernel[(blocks.numel(), b * hq, n_splits)](
        q, k, kv_head_index.to(torch.int32), blocks, range_count, range_start, range_end, column_count,
        column_index, parts,
        *q.stride(), *k.stride(),
        *range_count.stride(), *range_start.stride(),
        *column_count.stride(), *column_index.stride(),
        hq, blocks.numel(), q_len, k_len, k_len - q_len,
        float(scale), float(softcap) if softcap is not None else 1.0, split_keys, n_splits,
        HEAD_DIM=head_dim, BLOCK_D=block_d, BLOCK_Q=block_q, DENSE_N=dense_n,
        SPARSE_N=sparse_n, HAS_SOFTCAP=softcap is not None,
        UPCAST=q.device.type == "cpu" or q.dtype == torch.float32, ROW_PER_CHECK=rows_per_check,
        num_warps=num_warps, num_stages=num_stages,
    )
    recall, seen = _fold_parts(parts)
    recall = recall.view(b, hq, blocks.numel(), block_q)
    seen = seen.view(b, hq, blocks.numel(), block_q)
    if per_row:
        return torch.where(seen, recall, float("nan"))
    rows = seen.sum(-1)
    mean = torch.where(seen, recall, 0.0).sum(-1) / rows.clamp_min(1)
    return torch.where(rows > 0, mean, 1.0)


def _fold_parts(parts: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``parts [4, ..., n_splits, rows]`` (max and sum over every key, then over the listed keys, per part)
    -> each row's recall ``[..., rows]`` and whether the row saw any key: the parts' sums rescaled to the
    common max, as the online softmax does between tiles."""
    m_all, l_all, m_kept, l_kept = parts.unbind(0)

    def fold(m, l):
        top = m.amax(dim=-2)
        shift = torch.where(top == float("-inf"), 0.0, top)
        return top, (l * torch.exp2(torch.where(m == float("-inf"), float("-inf"), m - shift[..., None, :]))).sum(-2)

    top_all, sum_all = fold(m_all, l_all)
    top_kept, sum_kept = fold(m_kept, l_kept)
    seen = sum_all > 0
    kept_shift = torch.where(top_kept == float("-inf"), 0.0, torch.exp2(top_kept - torch.where(seen, top_all, 0.0)))
    recall = torch.where(seen, kept_shift * sum_kept / torch.where(seen, sum_all, 1.0), 0.0)
    return recall.clamp(max=1.0), seen  # the clamp: fp32 rounding of two sums over the same keys


__all__ = ["block_recall_triton", "listed_keys_recall_triton"]
