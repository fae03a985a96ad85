"""Triton mean-pooled block probabilities.

Two launches:
1. mean pooling, parallel over (block, batch x head), once for q and once for k: fp32 sums of the real
   rows of each block divided by their count, so no fp32 copy of q or k is ever made and each KV head
   is pooled once whatever the GQA group;
2. scoring, parallel over (tile of query blocks, batch x query head): each program owns whole output
   rows and walks the causally visible key blocks twice, first for each row's online max and sum of
   exp2 (log2 domain), then to store the normalised probabilities.

The pooled operands are fp32 and a pooled logit can be large (means keep a head's bias direction), so
the dots run at full fp32 precision rather than TF32; at ``[L / bs, L / bs]`` per head this is cheap.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ..triton_common import load_rows, log2_sum_exp2, row_stats_step, to_log2_scores

# Rows summed per pooling step: bounds the [rows, head_dim] tile in registers for any block size.
POOL_ROWS = 32
# Query and key blocks per scoring tile: fp32 FMA dots, so modest tiles keep operands in registers.
TILE_BLOCKS = 32
# head_dim slice per dot: caps the fp32 operand tiles at [TILE_BLOCKS, 64] whatever the head_dim.
D_CHUNK = 64
# Two stages: the unrolled head_dim chunks already overlap loads; a third would only add shared memory.
SCORE_STAGES = 2

# jit functions read only constexpr globals.
ROW_STATS_PASS = tl.constexpr(1)  # each block row's online max and sum of exp2
PROBS_PASS = tl.constexpr(2)  # normalised probabilities stored


# Lengths and grid counts change with every prompt: specialising on them (== 1, divisible by 16) would
# only multiply compilations.
@triton.jit(do_not_specialize=["length", "n_blocks"])
def _mean_pool_kernel(
    X, Out, stride_xb, stride_xh, stride_xm, stride_xd, num_heads, length, n_blocks, block_size,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, POOL_ROWS: tl.constexpr,
):
    blk = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = (pid_bh // num_heads).to(tl.int64)
    h = pid_bh % num_heads
    base = X + b * stride_xb + h * stride_xh
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < HEAD_DIM
    start = blk * block_size
    end = tl.minimum(start + block_size, length)
    acc = tl.zeros([BLOCK_D], dtype=tl.float32)
    for r0 in range(start, end, POOL_ROWS):
        rows = r0 + tl.arange(0, POOL_ROWS)
        # Always upcast: the means are fp32 sums whatever the input dtype.
        acc += tl.sum(load_rows(base, rows, rows < end, stride_xm, offs_d, d_ok, stride_xd, True), 0)
    tl.store(Out + (pid_bh.to(tl.int64) * n_blocks + blk) * HEAD_DIM + offs_d, acc / (end - start).to(tl.float32),
             mask=d_ok)


@triton.jit
def _pooled_scores(q_base, k_base, rows, row_ok, cols, col_ok, score_scale, softcap,
                   HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, D_CHUNK: tl.constexpr,
                   BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, HAS_SOFTCAP: tl.constexpr):
    """``[BLOCK_M, BLOCK_N]`` log2-domain scores of pooled rows against pooled key blocks (contiguous fp32)."""
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    for d0 in tl.static_range(0, BLOCK_D, D_CHUNK):
        offs_d = d0 + tl.arange(0, D_CHUNK)
        d_ok = offs_d < HEAD_DIM
        q = load_rows(q_base, rows, row_ok, HEAD_DIM, offs_d, d_ok, 1, False)
        k = load_rows(k_base, cols, col_ok, HEAD_DIM, offs_d, d_ok, 1, False)
        acc = tl.dot(q, tl.trans(k), acc, input_precision="ieee")
    return to_log2_scores(acc, score_scale, softcap, HAS_SOFTCAP)


@triton.jit
def _pooled_pass(q_base, k_base, rows, row_ok, row_last, block_size, n_k_blocks, n_tiles, score_scale, softcap,
                 m_i, l_i, out_base,
                 HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, D_CHUNK: tl.constexpr, BLOCK_M: tl.constexpr,
                 BLOCK_N: tl.constexpr, HAS_SOFTCAP: tl.constexpr, PASS: tl.constexpr):
    # In pass 2 every row's log-sum-exp is final (padding rows never pass the mask below).
    lse = log2_sum_exp2(m_i, l_i)
    for t in range(n_tiles):
        cols = t * BLOCK_N + tl.arange(0, BLOCK_N)
        col_ok = cols < n_k_blocks
        s = _pooled_scores(q_base, k_base, rows, row_ok, cols, col_ok, score_scale, softcap,
                           HEAD_DIM, BLOCK_D, D_CHUNK, BLOCK_M, BLOCK_N, HAS_SOFTCAP)
        # causal_block_layout: a key block is valid once its first key is visible to the block's last query.
        ok = row_ok[:, None] & col_ok[None, :] & (cols[None, :] * block_size <= row_last[:, None])
        s = tl.where(ok, s, float("-inf"))
        if PASS == ROW_STATS_PASS:
            m_i, l_i = row_stats_step(s, m_i, l_i)
        else:
            p = tl.where(ok, tl.exp2(s - lse[:, None]), 0.0)
            tl.store(out_base + rows[:, None] * n_k_blocks + cols[None, :], p, mask=row_ok[:, None] & col_ok[None, :])
    return m_i, l_i


@triton.jit(do_not_specialize=["q_len", "q_offset", "n_q_blocks", "n_k_blocks", "n_programs"])
def _pooled_probs_kernel(
    QMean, KMean, KvHeadIndex, Out,
    num_heads, num_kv_heads, q_len, q_offset, block_size, n_q_blocks, n_k_blocks, n_programs, score_scale, softcap,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, D_CHUNK: tl.constexpr, BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr, HAS_SOFTCAP: tl.constexpr,
):
    # Later query blocks see more key blocks; launching them first evens out the causal tail.
    prog = n_programs - 1 - tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = (pid_bh // num_heads).to(tl.int64)
    h = pid_bh % num_heads
    kv_h = tl.load(KvHeadIndex + h).to(tl.int64)
    q_base = QMean + pid_bh.to(tl.int64) * n_q_blocks * HEAD_DIM
    k_base = KMean + (b * num_kv_heads + kv_h) * n_k_blocks * HEAD_DIM
    out_base = Out + pid_bh.to(tl.int64) * n_q_blocks * n_k_blocks

    rows = prog * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = rows < n_q_blocks
    # Key position of each query block's last query (query_block_bounds' p1).
    row_last = tl.minimum(rows * block_size + block_size, q_len) - 1 + q_offset
    last_row = tl.minimum(prog * BLOCK_M + BLOCK_M, n_q_blocks) - 1
    last_pos = tl.minimum(last_row * block_size + block_size, q_len) - 1 + q_offset
    n_tiles = (last_pos // block_size) // BLOCK_N + 1

    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    m_i, l_i = _pooled_pass(q_base, k_base, rows, row_ok, row_last, block_size, n_k_blocks, n_tiles, score_scale,
                            softcap, m_i, l_i, out_base,
                            HEAD_DIM, BLOCK_D, D_CHUNK, BLOCK_M, BLOCK_N, HAS_SOFTCAP, ROW_STATS_PASS)
    _pooled_pass(q_base, k_base, rows, row_ok, row_last, block_size, n_k_blocks, n_tiles, score_scale,
                 softcap, m_i, l_i, out_base,
                 HEAD_DIM, BLOCK_D, D_CHUNK, BLOCK_M, BLOCK_N, HAS_SOFTCAP, PROBS_PASS)


def _mean_pool(x: torch.Tensor, block_size: int, head_dim: int, block_d: int) -> torch.Tensor:
    """``[B, H, L, D]`` -> contiguous ``[B, H, ceil(L / bs), D]`` fp32 means over the real rows of each block."""
    b, h, length, _ = x.shape
    n_blocks = triton.cdiv(length, block_size)
    out = torch.empty(b, h, n_blocks, head_dim, device=x.device, dtype=torch.float32)
    if out.numel():
        _mean_pool_kernel[(n_blocks, b * h)](
            x, out, *x.stride(), h, length, n_blocks, block_size,
            HEAD_DIM=head_dim, BLOCK_D=block_d, POOL_ROWS=min(POOL_ROWS, triton.next_power_of_2(block_size)),
        )
    return out


def pooled_block_probs_triton(
    q: torch.Tensor,
    k: torch.Tensor,
    *,
    scale: float,
    block_size: int,
    softcap: float | None,
    kv_head_index: torch.Tensor,
) -> torch.Tensor:
    """``q [B, Hq, Lq, D]``, ``k [B, Hkv, Lk, D]`` -> ``[B, Hq, ceil(Lq / bs), ceil(Lk / bs)]`` fp32."""
    b, hq, q_len, head_dim = q.shape
    hkv, k_len = k.shape[1], k.shape[2]
    n_q_blocks = triton.cdiv(q_len, block_size)
    n_k_blocks = triton.cdiv(k_len, block_size)
    # Blocks no query of the row can see stay 0; the kernel stores only the visible tiles.
    out = torch.zeros(b, hq, n_q_blocks, n_k_blocks, device=q.device, dtype=torch.float32)
    if out.numel() == 0:
        return out
    block_d = max(16, triton.next_power_of_2(head_dim))  # tl.dot needs K >= 16
    d_chunk = min(D_CHUNK, block_d)
    q_mean = _mean_pool(q, block_size, head_dim, block_d)
    k_mean = _mean_pool(k, block_size, head_dim, block_d)
    n_programs = triton.cdiv(n_q_blocks, TILE_BLOCKS)
    # Passed in the interpreter too, which ignores them: tests/hopper_compile.py records them.
    launch = dict(num_warps=4, num_stages=SCORE_STAGES)
    _pooled_probs_kernel[(n_programs, b * hq)](
        q_mean, k_mean, kv_head_index.to(torch.int32), out,
        hq, hkv, q_len, k_len - q_len, block_size, n_q_blocks, n_k_blocks, n_programs,
        float(scale), float(softcap) if softcap is not None else 1.0,
        HEAD_DIM=head_dim, BLOCK_D=block_d, D_CHUNK=d_chunk, BLOCK_M=TILE_BLOCKS, BLOCK_N=TILE_BLOCKS,
        HAS_SOFTCAP=softcap is not None, **launch,
    )
    return out


__all__ = ["pooled_block_probs_triton"]
