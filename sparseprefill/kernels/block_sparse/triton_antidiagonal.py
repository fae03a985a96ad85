"""Triton antidiagonal block mass, without a ``[Lq / S, Lk / S]`` score matrix.

One launch, parallel over (tile of query blocks, batch x query head). Each program owns whole output
rows, so it stores plain values (no atomics) and walks the causally visible key groups twice:
1. the online max and sum of exp2 of every reshaped row's scores (log2 domain): its log-sum-exp;
2. the normalised probabilities, summed over the rows of each query block and the key groups of each
   key block, divided by the query block's row count, one store per (query block, key block).

A score tile is a GEMM whose K loop runs over ``i < S`` (and head_dim chunks) with strided row loads:
reshaped row ``m`` and key group ``n`` accumulate ``q[S m + S - 1 - i] . k[S n + i]`` (the reversed
antidiagonal), so the reshaped ``[L / S, S * D]`` operands are never built. Rows and keys past the
sequence load as zeros, exactly like the naive twin's zero-padded last group.

Tiles are laid out by block: a tile's rows are ``Q_BLOCKS`` query blocks of ``BLOCK_PB`` slots each and
its columns ``K_BLOCKS`` key blocks of ``BLOCK_PB`` slots, ``BLOCK_PB = next_pow2(block_size / S)``;
slots past ``block_size / S`` are masked. A reshape to ``[Q_BLOCKS, BLOCK_PB, K_BLOCKS, BLOCK_PB]``
then turns block sums into two ``tl.sum``'s for any ``block_size / S`` (a power of two or not).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ..triton_common import load_rows, log2_sum_exp2, row_stats_step, to_log2_scores

# Reshaped rows (and key groups) per tile. 64 x 64 keeps tensor-core tiles busy when block_size / S is
# small (16 with XAttention's 128 / 8) while bounding the rows that causally see only part of a tile.
TILE_ROWS = 64
TILE_GROUPS = 64
# head_dim slice per dot (the GEMM's K step): operand tiles stay [rows, <= 64] whatever the head_dim.
MAX_D_CHUNK = 64
# Shared memory allowed for the pipelined operand buffers; num_stages is as many stages as fit (1..3).
PIPELINE_SHARED_BYTES = 96 * 1024

# jit functions read only constexpr globals.
ROW_STATS_PASS = tl.constexpr(1)  # each reshaped row's online max and sum of exp2
BLOCK_MASS_PASS = tl.constexpr(2)  # normalised probabilities summed per (query block, key block)


@triton.jit
def _group_scores(q_base, k_base, rows, row_ok, cols, col_ok, q_len, k_len,
                  stride_qm, stride_qd, stride_kn, stride_kd, score_scale, softcap, stride,
                  HEAD_DIM: tl.constexpr, D_CHUNK: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                  HAS_SOFTCAP: tl.constexpr, UPCAST: tl.constexpr):
    """``[BLOCK_M, BLOCK_N]`` log2-domain scores of reshaped rows ``rows`` against key groups ``cols``."""
    N_CHUNKS: tl.constexpr = (HEAD_DIM + D_CHUNK - 1) // D_CHUNK
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    # One flat K loop over (antidiagonal step i, head_dim chunk): the reduction dim of the reshaped
    # [L / S, S * D] operands. A runtime stride (not constexpr) lets one compilation serve every stride.
    for step in range(stride * N_CHUNKS):
        i = step // N_CHUNKS
        offs_d = (step % N_CHUNKS) * D_CHUNK + tl.arange(0, D_CHUNK)
        d_ok = offs_d < HEAD_DIM
        q_rows = rows * stride + (stride - 1 - i)
        k_rows = cols * stride + i
        q = load_rows(q_base, q_rows, row_ok & (q_rows < q_len), stride_qm, offs_d, d_ok, stride_qd, UPCAST)
        k = load_rows(k_base, k_rows, col_ok & (k_rows < k_len), stride_kn, offs_d, d_ok, stride_kd, UPCAST)
        acc = tl.dot(q, tl.trans(k), acc)
    # score_scale is scale / S: the antidiagonal sum is S logits, the estimate uses their mean.
    return to_log2_scores(acc, score_scale, softcap, HAS_SOFTCAP)


@triton.jit
def _antidiagonal_pass(q_base, k_base, rows, row_ok, row_last, q_len, k_len, per_block, n_tiles,
                       stride_qm, stride_qd, stride_kn, stride_kd, score_scale, softcap,
                       m_i, l_i, out_base, out_q_blocks, out_q_ok, inv_rows, n_k_blocks, stride,
                       HEAD_DIM: tl.constexpr, D_CHUNK: tl.constexpr, BLOCK_PB: tl.constexpr, Q_BLOCKS: tl.constexpr,
                       K_BLOCKS: tl.constexpr, HAS_SOFTCAP: tl.constexpr, UPCAST: tl.constexpr,
                       PASS: tl.constexpr):
    BLOCK_M: tl.constexpr = Q_BLOCKS * BLOCK_PB
    BLOCK_N: tl.constexpr = K_BLOCKS * BLOCK_PB
    offs_c = tl.arange(0, BLOCK_N)
    col_slot = offs_c % BLOCK_PB
    col_ok = col_slot < per_block
    # In pass 2 every row's log-sum-exp is final (padding rows never pass the mask below).
    lse = log2_sum_exp2(m_i, l_i)
    for t in range(n_tiles):
        k_blocks = t * K_BLOCKS + offs_c // BLOCK_PB
        cols = k_blocks * per_block + col_slot
        s = _group_scores(q_base, k_base, rows, row_ok, cols, col_ok, q_len, k_len, stride_qm, stride_qd,
                          stride_kn, stride_kd, score_scale, softcap, stride,
                          HEAD_DIM, D_CHUNK, BLOCK_M, BLOCK_N, HAS_SOFTCAP, UPCAST)
        # Causal at group granularity: a group is visible once its first key is; groups past the
        # sequence start beyond row_last <= Lk - 1, so this also drops them.
        ok = row_ok[:, None] & col_ok[None, :] & (cols[None, :] * stride <= row_last[:, None])
        s = tl.where(ok, s, float("-inf"))
        if PASS == ROW_STATS_PASS:
            m_i, l_i = row_stats_step(s, m_i, l_i)
        else:
            p = tl.where(ok, tl.exp2(s - lse[:, None]), 0.0)
            mass = tl.sum(tl.sum(tl.reshape(p, [Q_BLOCKS, BLOCK_PB, K_BLOCKS, BLOCK_PB]), 3), 1)
            mass = mass * inv_rows[:, None]
            out_k_blocks = t * K_BLOCKS + tl.arange(0, K_BLOCKS)
            tl.store(out_base + out_q_blocks[:, None] * n_k_blocks + out_k_blocks[None, :], mass,
                     mask=out_q_ok[:, None] & (out_k_blocks < n_k_blocks)[None, :])
    return m_i, l_i


# Lengths and grid counts change with every prompt: specialising on them (== 1, divisible by 16) would
# only multiply compilations.
@triton.jit(do_not_specialize=["q_len", "k_len", "q_offset", "n_rows", "n_q_blocks", "n_k_blocks", "n_programs"])
def _antidiagonal_mass_kernel(
    Q, K, KvHeadIndex, Out,
    stride_qb, stride_qh, stride_qm, stride_qd, stride_kb, stride_kh, stride_kn, stride_kd,
    num_heads, q_len, k_len, q_offset, n_rows, stride, per_block, n_q_blocks, n_k_blocks, n_programs,
    score_scale, softcap,
    HEAD_DIM: tl.constexpr, D_CHUNK: tl.constexpr, BLOCK_PB: tl.constexpr,
    Q_BLOCKS: tl.constexpr, K_BLOCKS: tl.constexpr, HAS_SOFTCAP: tl.constexpr, UPCAST: tl.constexpr,
):
    BLOCK_M: tl.constexpr = Q_BLOCKS * BLOCK_PB
    # Later query blocks see more key groups; launching them first evens out the causal tail.
    prog = n_programs - 1 - tl.program_id(0)
    pid_bh = tl.program_id(1)
    # int64 bases: batch x head offsets pass 2^31 elements at long contexts with batch > 1.
    b = (pid_bh // num_heads).to(tl.int64)
    h = pid_bh % num_heads
    kv_h = tl.load(KvHeadIndex + h).to(tl.int64)
    q_base = Q + b * stride_qb + h * stride_qh
    k_base = K + b * stride_kb + kv_h * stride_kh
    offs_m = tl.arange(0, BLOCK_M)
    row_slot = offs_m % BLOCK_PB
    rows = (prog * Q_BLOCKS + offs_m // BLOCK_PB) * per_block + row_slot
    row_ok = (row_slot < per_block) & (rows < n_rows)
    # Key position of each reshaped row's last real query (bottom-right aligned).
    row_last = tl.minimum(rows * stride + stride - 1, q_len - 1) + q_offset

    # The program's last real row sees the most key groups: it bounds both loops.
    last_row = tl.minimum((prog + 1) * Q_BLOCKS * per_block, n_rows) - 1
    last_pos = tl.minimum(last_row * stride + stride - 1, q_len - 1) + q_offset
    n_tiles = (last_pos // stride // per_block) // K_BLOCKS + 1

    out_q_blocks = prog * Q_BLOCKS + tl.arange(0, Q_BLOCKS)
    out_q_ok = out_q_blocks < n_q_blocks
    rows_in_block = tl.minimum(per_block, n_rows - out_q_blocks * per_block)
    inv_rows = 1.0 / tl.where(rows_in_block > 0, rows_in_block, 1).to(tl.float32)
    out_base = Out + pid_bh.to(tl.int64) * n_q_blocks * n_k_blocks

    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    m_i, l_i = _antidiagonal_pass(q_base, k_base, rows, row_ok, row_last, q_len, k_len, per_block, n_tiles,
                                  stride_qm, stride_qd, stride_kn, stride_kd, score_scale, softcap,
                                  m_i, l_i, out_base, out_q_blocks, out_q_ok, inv_rows, n_k_blocks, stride,
                                  HEAD_DIM, D_CHUNK, BLOCK_PB, Q_BLOCKS, K_BLOCKS, HAS_SOFTCAP, UPCAST,
                                  ROW_STATS_PASS)
    _antidiagonal_pass(q_base, k_base, rows, row_ok, row_last, q_len, k_len, per_block, n_tiles,
                       stride_qm, stride_qd, stride_kn, stride_kd, score_scale, softcap,
                       m_i, l_i, out_base, out_q_blocks, out_q_ok, inv_rows, n_k_blocks, stride,
                       HEAD_DIM, D_CHUNK, BLOCK_PB, Q_BLOCKS, K_BLOCKS, HAS_SOFTCAP, UPCAST,
                       BLOCK_MASS_PASS)


def _d_chunk(head_dim: int) -> int:
    """The K step padding ``head_dim`` least, the larger on ties: 64, 128 and 256 take 64; 80 and 96
    take 32 (3 x 32 = 96 columns, not 2 x 64 = 128). Never below 16 (tl.dot's minimum K); 16 only for
    head dims that small, as narrower loads and more steps cost more than the padding saves."""
    if head_dim <= 16:
        return 16
    return min((MAX_D_CHUNK, 32), key=lambda c: (triton.cdiv(head_dim, c) * c, -c))


def antidiagonal_block_mass_triton(
    q: torch.Tensor,
    k: torch.Tensor,
    *,
    scale: float,
    stride: int,
    block_size: int,
    softcap: float | None,
    kv_head_index: torch.Tensor,
) -> torch.Tensor:
    """``q [B, Hq, Lq, D]``, ``k [B, Hkv, Lk, D]`` -> ``[B, Hq, ceil(Lq / bs), ceil(Lk / bs)]`` fp32."""
    b, hq, q_len, head_dim = q.shape
    k_len = k.shape[2]
    per_block = block_size // stride
    n_rows = triton.cdiv(q_len, stride)
    n_q_blocks = triton.cdiv(q_len, block_size)
    n_k_blocks = triton.cdiv(k_len, block_size)
    # Blocks no row can see stay 0; the kernel stores only the visible tiles.
    out = torch.zeros(b, hq, n_q_blocks, n_k_blocks, device=q.device, dtype=torch.float32)
    if out.numel() == 0:
        return out
    d_chunk = _d_chunk(head_dim)
    block_pb = triton.next_power_of_2(per_block)
    # A tile holds whole blocks, so a block wider than the tile target widens the tile.
    q_blocks = max(1, TILE_ROWS // block_pb)
    k_blocks = max(1, TILE_GROUPS // block_pb)
    n_programs = triton.cdiv(n_q_blocks, q_blocks)
    interpret = q.device.type == "cpu"
    upcast = interpret or q.dtype == torch.float32
    stage_bytes = (q_blocks + k_blocks) * block_pb * d_chunk * q.element_size()
    launch = {} if interpret else dict(num_warps=4, num_stages=max(1, min(3, PIPELINE_SHARED_BYTES // stage_bytes)))
    _antidiagonal_mass_kernel[(n_programs, b * hq)](
        q, k, kv_head_index.to(torch.int32), out,
        *q.stride(), *k.stride(),
        hq, q_len, k_len, k_len - q_len, n_rows, stride, per_block, n_q_blocks, n_k_blocks, n_programs,
        float(scale) / stride, float(softcap) if softcap is not None else 1.0,
        HEAD_DIM=head_dim, D_CHUNK=d_chunk, BLOCK_PB=block_pb, Q_BLOCKS=q_blocks,
        K_BLOCKS=k_blocks, HAS_SOFTCAP=softcap is not None, UPCAST=upcast,
        **launch,
    )
    return out


__all__ = ["antidiagonal_block_mass_triton"]
