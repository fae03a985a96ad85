"""Triton block-sparse attention (forward), FlashAttention-2 style.

One program per (query block, batch x query head). It walks the KV blocks its index row lists, then
the row's single key columns if the index has them (gathered rows, ``COLUMN_N`` at a time), with one
online softmax in fp32 (base-2 exponentials, the log2(e) folded into the scale). Causal,
window and sequence-end masks are applied only on tiles that can need them (tiles straddling the
diagonal, the window edge or the last key), so interior tiles run mask-free.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ..indices import BlockSparseIndex
from ..triton_common import (
    attend_key_tile,
    attend_key_tile_tma,
    checked_rescale_slack,
    column_keys,
    empty_softmax_state,
    key_tile_descriptor,
    load_rows,
    log2_scores,
    mask_scores,
    online_softmax_step,
    query_tile,
    store_rows,
    tile_sizes,
    tma_by_default,
)

# K/V block tiles loaded through tensor descriptors (Hopper's TMA) instead of per-element pointers, where
# TMA can address K/V (``tma_by_default``). Timed on an H100 (stop 36, experiments/kernel_profile.py
# --time-slacks, structured input, the antidiagonal estimate's index): 2.4% faster at 32K and 4.2% at
# 128K on Llama-3.1-8B shapes (head_dim 128), -0.4% to +0.2% on Qwen2.5-0.5B's (head_dim 64); its GPU
# fuzz (1,000 cases, a third of them with TMA tiles) passed.
BLOCK_SPARSE_TMA = True

# Gathered key columns per tile: the vertical-slash kernel's column tile (VERTICAL_SLASH_KEY_TILE), not
# tuned separately here; the columns are a small share of a block index's keys.
BLOCK_COLUMN_TILE = 32


@triton.jit
def _block_sparse_fwd_kernel(
    Q, K, V, Out, BlockCount, BlockIndex, ColumnCount, ColumnIndex, KvHeadIndex, KDesc, VDesc,
    stride_qb, stride_qh, stride_qm, stride_qd,
    stride_kb, stride_kh, stride_kn, stride_kd,
    stride_vb, stride_vh, stride_vn, stride_vd,
    stride_ob, stride_oh, stride_om, stride_od,
    stride_cb, stride_ch, stride_cm,
    stride_ib, stride_ih, stride_im, stride_in,
    stride_ccb, stride_cch, stride_ccm,
    stride_colb, stride_colh, stride_colm, stride_coln,
    num_heads, q_len, k_len, q_offset,
    score_scale, softcap, window,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    BLOCK_Q: tl.constexpr, KV_BLOCK: tl.constexpr, HAS_WINDOW: tl.constexpr, HAS_SOFTCAP: tl.constexpr,
    UPCAST: tl.constexpr, HAS_COLUMNS: tl.constexpr = False, COLUMN_N: tl.constexpr = 32,
    RESCALE_SLACK: tl.constexpr = 0.0, BLOCK_TMA: tl.constexpr = False,
):
    b, h, index_row_id, offs_m, m_ok, offs_d, d_ok, q, q_pos, first_q_pos, last_q_pos, k_base, v_base = query_tile(
        Q, K, V, KvHeadIndex, stride_qb, stride_qh, stride_qm, stride_qd, stride_kb, stride_kh, stride_vb, stride_vh,
        num_heads, q_len, q_offset, HEAD_DIM, BLOCK_D, BLOCK_M, BLOCK_Q, UPCAST)
    m_i, l_i, acc = empty_softmax_state(BLOCK_M, BLOCK_D)

    count = tl.load(BlockCount + b * stride_cb + h * stride_ch + index_row_id * stride_cm)
    index_row = BlockIndex + b * stride_ib + h * stride_ih + index_row_id * stride_im
    # One flat loop over (listed block, tile within it): a single loop the compiler can software-
    # pipeline, and one set of staged K/V buffers (an unrolled inner loop multiplies them).
    SUBS: tl.constexpr = KV_BLOCK // BLOCK_N
    if BLOCK_TMA:
        b32 = b.to(tl.int32)
        kv_h32 = tl.load(KvHeadIndex + h).to(tl.int32)
    else:  # unread: the pointer path needs no descriptor coordinates
        b32 = 0
        kv_h32 = 0
    for t in range(0, count * SUBS):
        kv_block = tl.load(index_row + (t // SUBS) * stride_in)
        start_n = kv_block * KV_BLOCK + (t % SUBS) * BLOCK_N
        if BLOCK_TMA:  # K/V tiles by tensor descriptor (TMA), as the vertical-slash kernel's range_tma
            m_i, l_i, acc = attend_key_tile_tma(q, KDesc, VDesc, b32, kv_h32, start_n, k_len, q_pos, first_q_pos,
                                                last_q_pos, m_i, l_i, acc, score_scale, softcap, window, BLOCK_N,
                                                BLOCK_D, HAS_WINDOW, HAS_SOFTCAP, UPCAST, RESCALE_SLACK)
        else:
            m_i, l_i, acc = attend_key_tile(q, k_base, v_base, start_n, k_len, offs_d, d_ok, stride_kn, stride_kd,
                                            stride_vn, stride_vd, q_pos, first_q_pos, last_q_pos, m_i, l_i, acc,
                                            score_scale, softcap, window, BLOCK_N, HAS_WINDOW, HAS_SOFTCAP, UPCAST,
                                            RESCALE_SLACK)

    if HAS_COLUMNS:
        n_columns = tl.load(ColumnCount + b * stride_ccb + h * stride_cch + index_row_id * stride_ccm)
        column_row = ColumnIndex + b * stride_colb + h * stride_colh + index_row_id * stride_colm
        for c0 in range(0, n_columns, COLUMN_N):
            offs_n, n_ok = column_keys(column_row, c0, n_columns, k_len, stride_coln, COLUMN_N)
            k = load_rows(k_base, offs_n, n_ok, stride_kn, offs_d, d_ok, stride_kd, UPCAST)
            v = load_rows(v_base, offs_n, n_ok, stride_vn, offs_d, d_ok, stride_vd, UPCAST)
            s = mask_scores(log2_scores(q, k, score_scale, softcap, HAS_SOFTCAP), offs_n, n_ok, q_pos, window,
                            HAS_WINDOW)
            m_i, l_i, acc = online_softmax_step(s, v, m_i, l_i, acc, UPCAST, RESCALE_SLACK)

    store_rows(Out + b * stride_ob + h * stride_oh, offs_m, m_ok, stride_om, offs_d, d_ok, stride_od, acc, l_i)


def block_sparse_attention_triton(
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
    rescale_slack: float | None = None,
    block_tma: bool | None = None,
) -> torch.Tensor:
    """GPU ``block_sparse_attention``: ``q [B, Hq, Lq, D]``, ``k, v [B, Hkv, Lk, D]``, ``index``
    ``[B, Hq, ceil(Lq / block_size_q), N]`` -> ``out [B, Hq, Lq, D]`` (written in place).
    ``rescale_slack``: the online softmax's lazy-rescale slack (None: the shipped one); ``block_tma``: K/V
    tiles through tensor descriptors (None: ``BLOCK_SPARSE_TMA`` where TMA can address K/V; True refuses K/V it
    cannot address); both for measurements."""
    b, hq, q_len, head_dim = q.shape
    k_len = k.shape[2]
    block_m, block_n, num_warps, num_stages, block_d = tile_sizes(
        head_dim, index.block_size_q, index.block_size_k, q.element_size()
    )
    interpret = q.device.type == "cpu"
    count = index.block_count
    ids = index.block_index
    has_columns = index.column_index is not None
    # Without columns the block lists stand in for the column pointers, which the kernel never reads.
    column_count = index.column_count if has_columns else count
    column_index = index.column_index if has_columns else ids
    use_tma = BLOCK_SPARSE_TMA and tma_by_default(k, v) if block_tma is None else bool(block_tma)
    k_desc, v_desc = ((key_tile_descriptor(x, block_n, block_d, "block_tma") for x in (k, v)) if use_tma
                      else (k, v))  # unread without BLOCK_TMA
    grid = (count.shape[2] * (index.block_size_q // block_m), b * hq)
    _block_sparse_fwd_kernel[grid](
        q, k, v, out, count, ids, column_count, column_index, kv_head_index.to(torch.int32), k_desc, v_desc,
        *q.stride(), *k.stride(), *v.stride(), *out.stride(),
        *count.stride(), *ids.stride(), *column_count.stride(), *column_index.stride(),
        hq, q_len, k_len, k_len - q_len,
        float(scale), float(softcap) if softcap is not None else 1.0, int(window) if window is not None else 0,
        HEAD_DIM=head_dim, BLOCK_D=block_d, BLOCK_M=block_m, BLOCK_N=block_n,
        BLOCK_Q=index.block_size_q, KV_BLOCK=index.block_size_k, HAS_WINDOW=window is not None, HAS_SOFTCAP=softcap is not None,
        UPCAST=interpret or q.dtype == torch.float32, HAS_COLUMNS=has_columns, COLUMN_N=BLOCK_COLUMN_TILE,
        RESCALE_SLACK=checked_rescale_slack(rescale_slack), BLOCK_TMA=use_tma, num_warps=num_warps,
        num_stages=num_stages,
    )
    return out


__all__ = ["BLOCK_SPARSE_TMA", "block_sparse_attention_triton", "tile_sizes"]
