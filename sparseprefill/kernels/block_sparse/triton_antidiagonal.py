"""Triton antidiagonal block mass, without a ``[Lq / S, Lk / S]`` score matrix.

One launch, parallel over (tile of query blocks, batch x query head). Each program owns whole output
rows, so it stores plain values (no atomics) and walks the causally visible key groups twice:
1. the online max and sum of exp2 of every reshaped row's scores (log2 domain): its log-sum-exp;
2. the normalised probabilities, summed over the rows of each query block and the key groups of each
   key block, divided by the query block's row count, one store per (query block, key block).

``sweeps=1`` computes each score tile once instead: the sweep keeps each row's running max and sum
and stores, per (reshaped row, key block), the tile's exp2 sum relative to the running max of that
moment (plus that max), in a scratch buffer; a short second loop over the stored partials rescales
them by ``exp2(max_then - max_final) / sum_final`` and sums the rows of each query block. Half the
GEMM work for ``[rows, key blocks]`` fp32 of scratch traffic (heads are launched in groups so the
scratch stays under ``ONE_SWEEP_SCRATCH_BYTES``).

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
# experiments/antidiagonal_tiles.py sweeps these (and the warps) on the GPU.
TILE_ROWS = 64
TILE_GROUPS = 128
NUM_WARPS = 4
# 2: every score tile computed twice (row statistics, then block mass), no scratch; 1: once, with scratch.
SWEEPS = 1
# head_dim slice per dot (the GEMM's K step): operand tiles stay [rows, <= 64] whatever the head_dim.
MAX_D_CHUNK = 64
# Scratch of the one-sweep variant per launch; heads are launched in groups to stay under it (at
# least one head per launch: 84 MB per head at 128K with the default tiles, stride 8 and block 128).
ONE_SWEEP_SCRATCH_BYTES = 256 * 1024 * 1024
# Shared memory allowed for the pipelined operand buffers; num_stages is as many stages as fit (1..3).
PIPELINE_SHARED_BYTES = 96 * 1024

# jit functions read only constexpr globals.
ROW_STATS_PASS = tl.constexpr(1)  # each reshaped row's online max and sum of exp2
BLOCK_MASS_PASS = tl.constexpr(2)  # normalised probabilities summed per (query block, key block)


@triton.jit
def _group_scores(q_base, k_base, rows, row_ok, cols, col_ok, q_len, k_len,
                  stride_qm, stride_qd, stride_kn, stride_kd, score_scale, softcap, stride, row_shift,
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
        # row_shift: 1 on odd rows when alternating (their antidiagonal one query earlier), else 0.
        q_rows = rows * stride + (stride - 1 - i) - row_shift
        k_rows = cols * stride + i
        q = load_rows(q_base, q_rows, row_ok & (q_rows < q_len), stride_qm, offs_d, d_ok, stride_qd, UPCAST)
        k = load_rows(k_base, k_rows, col_ok & (k_rows < k_len), stride_kn, offs_d, d_ok, stride_kd, UPCAST)
        acc = tl.dot(q, tl.trans(k), acc)
    # score_scale is scale / S: the antidiagonal sum is S logits, the estimate uses their mean.
    return to_log2_scores(acc, score_scale, softcap, HAS_SOFTCAP)


@triton.jit
def _sampled_group_mass(q_base, k_base, rows, row_ok, cols, col_ok, q_len, k_len, q_offset,
                        stride_qm, stride_qd, stride_kn, stride_kd, score_scale, softcap, stride, row_shift,
                        HEAD_DIM: tl.constexpr, D_CHUNK: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                        HAS_SOFTCAP: tl.constexpr, UPCAST: tl.constexpr):
    """The sampled scoring of one tile: per (row, key group), the sum over the ``S`` antidiagonal pairs of
    exp2 of each pair's own log2 score, relative to the row's max over the tile (returned with it: a
    ``[BLOCK_M, BLOCK_N]`` sum and a ``[BLOCK_M]`` max, -inf for rows without a valid pair). Pairs
    outside the sequences or in their query's future count zero."""
    N_CHUNKS: tl.constexpr = (HEAD_DIM + D_CHUNK - 1) // D_CHUNK
    p_tile = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    m_tile = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    for i in range(stride):
        q_rows = rows * stride + (stride - 1 - i) - row_shift
        k_rows = cols * stride + i
        q_ok = row_ok & (q_rows < q_len)
        k_ok = col_ok & (k_rows < k_len)
        acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
        for c in tl.static_range(N_CHUNKS):
            offs_d = c * D_CHUNK + tl.arange(0, D_CHUNK)
            d_ok = offs_d < HEAD_DIM
            q = load_rows(q_base, q_rows, q_ok, stride_qm, offs_d, d_ok, stride_qd, UPCAST)
            k = load_rows(k_base, k_rows, k_ok, stride_kn, offs_d, d_ok, stride_kd, UPCAST)
            acc = tl.dot(q, tl.trans(k), acc)
        s = to_log2_scores(acc, score_scale, softcap, HAS_SOFTCAP)
        ok = q_ok[:, None] & k_ok[None, :] & (k_rows[None, :] <= q_rows[:, None] + q_offset)
        s = tl.where(ok, s, float("-inf"))
        m_new = tl.maximum(m_tile, tl.max(s, 1))
        m_shift = tl.where(m_new == float("-inf"), 0.0, m_new)
        p_tile = p_tile * tl.exp2(m_tile - m_shift)[:, None] + tl.exp2(s - m_shift[:, None])
        m_tile = m_new
    return p_tile, m_tile


@triton.jit
def _antidiagonal_pass(q_base, k_base, rows, row_ok, row_last, q_len, k_len, per_block, n_tiles,
                       stride_qm, stride_qd, stride_kn, stride_kd, score_scale, softcap,
                       m_i, l_i, out_base, out_q_blocks, out_q_ok, inv_rows, n_k_blocks, stride, row_shift,
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
                          stride_kn, stride_kd, score_scale, softcap, stride, row_shift,
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


@triton.jit
def _one_sweep(q_base, k_base, rows, row_ok, row_last, q_len, k_len, q_offset, per_block, n_tiles,
               stride_qm, stride_qd, stride_kn, stride_kd, score_scale, softcap,
               part_base, tile_max_base, slots, n_k_slots, n_tile_slots, stride, row_shift,
               HEAD_DIM: tl.constexpr, D_CHUNK: tl.constexpr, BLOCK_PB: tl.constexpr, Q_BLOCKS: tl.constexpr,
               K_BLOCKS: tl.constexpr, HAS_SOFTCAP: tl.constexpr, UPCAST: tl.constexpr, SAMPLED: tl.constexpr):
    """Each score tile once: running row stats, and per (row, key block) the exp2 sum relative to the
    row's running max at this tile, stored with that max. Returns the final max (shifted) and sum."""
    BLOCK_M: tl.constexpr = Q_BLOCKS * BLOCK_PB
    BLOCK_N: tl.constexpr = K_BLOCKS * BLOCK_PB
    offs_c = tl.arange(0, BLOCK_N)
    col_slot = offs_c % BLOCK_PB
    col_ok = col_slot < per_block
    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    m_shift = tl.zeros([BLOCK_M], dtype=tl.float32)
    for t in range(n_tiles):
        k_blocks = t * K_BLOCKS + offs_c // BLOCK_PB
        cols = k_blocks * per_block + col_slot
        if SAMPLED:
            p_tile, m_tile = _sampled_group_mass(q_base, k_base, rows, row_ok, cols, col_ok, q_len, k_len, q_offset,
                                                 stride_qm, stride_qd, stride_kn, stride_kd, score_scale, softcap,
                                                 stride, row_shift, HEAD_DIM, D_CHUNK, BLOCK_M, BLOCK_N,
                                                 HAS_SOFTCAP, UPCAST)
            m_new = tl.maximum(m_i, m_tile)
            m_shift = tl.where(m_new == float("-inf"), 0.0, m_new)
            # A tile without a valid pair in a row has an empty sum there: its factor is 0, not exp2(inf).
            factor = tl.where(m_tile == float("-inf"), 0.0, tl.exp2(m_tile - m_shift))
            p = p_tile * factor[:, None]
        else:
            s = _group_scores(q_base, k_base, rows, row_ok, cols, col_ok, q_len, k_len, stride_qm, stride_qd,
                              stride_kn, stride_kd, score_scale, softcap, stride, row_shift,
                              HEAD_DIM, D_CHUNK, BLOCK_M, BLOCK_N, HAS_SOFTCAP, UPCAST)
            ok = row_ok[:, None] & col_ok[None, :] & (cols[None, :] * stride <= row_last[:, None])
            s = tl.where(ok, s, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(s, 1))
            # A row that has seen no group keeps max -inf; shift by 0 so exp2 gives zeros, not NaN.
            m_shift = tl.where(m_new == float("-inf"), 0.0, m_new)
            p = tl.exp2(s - m_shift[:, None])
        l_i = l_i * tl.exp2(m_i - m_shift) + tl.sum(p, 1)
        m_i = m_new
        part = tl.sum(tl.reshape(p, [BLOCK_M, K_BLOCKS, BLOCK_PB]), 2)
        k_out = t * K_BLOCKS + tl.arange(0, K_BLOCKS)
        tl.store(part_base + slots[:, None] * n_k_slots + k_out[None, :], part)
        tl.store(tile_max_base + slots * n_tile_slots + t, m_shift)
    return m_shift, l_i


@triton.jit
def _fold_partials(part_base, tile_max_base, slots, row_ok, m_final, l_final, n_tiles, n_k_slots, n_tile_slots,
                   out_base, out_q_blocks, out_q_ok, inv_rows, n_k_blocks,
                   BLOCK_PB: tl.constexpr, Q_BLOCKS: tl.constexpr, K_BLOCKS: tl.constexpr):
    """Block mass from the stored partials: rescale each row's to its final max and sum, add up the rows
    of each query block."""
    seen = row_ok & (l_final > 0)
    inv_l = 1.0 / tl.where(seen, l_final, 1.0)
    for t in range(n_tiles):
        k_out = t * K_BLOCKS + tl.arange(0, K_BLOCKS)
        part = tl.load(part_base + slots[:, None] * n_k_slots + k_out[None, :])
        m_then = tl.load(tile_max_base + slots * n_tile_slots + t)
        # The running max only grows, so m_then <= m_final; the clamp keeps a row that had seen no group
        # by then (stand-in max 0, partial 0) from turning into inf * 0.
        weight = tl.where(seen, tl.exp2(tl.minimum(m_then - m_final, 0.0)) * inv_l, 0.0)
        mass = tl.sum(tl.reshape(part * weight[:, None], [Q_BLOCKS, BLOCK_PB, K_BLOCKS]), 1)
        mass = mass * inv_rows[:, None]
        tl.store(out_base + out_q_blocks[:, None] * n_k_blocks + k_out[None, :], mass,
                 mask=out_q_ok[:, None] & (k_out < n_k_blocks)[None, :])


# Lengths and grid counts change with every prompt: specialising on them (== 1, divisible by 16) would
# only multiply compilations.
@triton.jit(do_not_specialize=["q_len", "k_len", "q_offset", "n_rows", "n_q_blocks", "n_k_blocks", "n_programs",
                               "first_bh", "n_k_slots", "n_tile_slots"])
def _antidiagonal_mass_kernel(
    Q, K, KvHeadIndex, Out, Partial, TileMax,
    stride_qb, stride_qh, stride_qm, stride_qd, stride_kb, stride_kh, stride_kn, stride_kd,
    num_heads, q_len, k_len, q_offset, n_rows, stride, per_block, n_q_blocks, n_k_blocks, n_programs,
    first_bh, n_k_slots, n_tile_slots, alternate, score_scale, softcap,
    HEAD_DIM: tl.constexpr, D_CHUNK: tl.constexpr, BLOCK_PB: tl.constexpr,
    Q_BLOCKS: tl.constexpr, K_BLOCKS: tl.constexpr, HAS_SOFTCAP: tl.constexpr, UPCAST: tl.constexpr,
    SWEEPS: tl.constexpr, SAMPLED: tl.constexpr,
):
    BLOCK_M: tl.constexpr = Q_BLOCKS * BLOCK_PB
    # Later query blocks see more key groups; launching them first evens out the causal tail.
    prog = n_programs - 1 - tl.program_id(0)
    pid_bh = first_bh + tl.program_id(1)
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
    row_shift = (rows % 2) * alternate
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

    if SWEEPS == 1:
        # Scratch rows are the launch-local head's padded row slots: [heads in launch, programs * BLOCK_M, ...].
        slots = prog * BLOCK_M + offs_m
        local = tl.program_id(1).to(tl.int64) * n_programs * BLOCK_M
        part_base = Partial + local * n_k_slots
        tile_max_base = TileMax + local * n_tile_slots
        m_final, l_final = _one_sweep(q_base, k_base, rows, row_ok, row_last, q_len, k_len, q_offset, per_block,
                                      n_tiles,
                                      stride_qm, stride_qd, stride_kn, stride_kd, score_scale, softcap,
                                      part_base, tile_max_base, slots, n_k_slots, n_tile_slots, stride,
                                      row_shift, HEAD_DIM, D_CHUNK, BLOCK_PB, Q_BLOCKS, K_BLOCKS, HAS_SOFTCAP, UPCAST,
                                      SAMPLED)
        # The fold reads partials other threads of this program stored.
        tl.debug_barrier()
        _fold_partials(part_base, tile_max_base, slots, row_ok, m_final, l_final, n_tiles, n_k_slots, n_tile_slots,
                       out_base, out_q_blocks, out_q_ok, inv_rows, n_k_blocks, BLOCK_PB, Q_BLOCKS, K_BLOCKS)
    else:
        m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
        l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
        m_i, l_i = _antidiagonal_pass(q_base, k_base, rows, row_ok, row_last, q_len, k_len, per_block, n_tiles,
                                      stride_qm, stride_qd, stride_kn, stride_kd, score_scale, softcap,
                                      m_i, l_i, out_base, out_q_blocks, out_q_ok, inv_rows, n_k_blocks, stride,
                                      row_shift, HEAD_DIM, D_CHUNK, BLOCK_PB, Q_BLOCKS, K_BLOCKS, HAS_SOFTCAP, UPCAST,
                                      ROW_STATS_PASS)
        _antidiagonal_pass(q_base, k_base, rows, row_ok, row_last, q_len, k_len, per_block, n_tiles,
                           stride_qm, stride_qd, stride_kn, stride_kd, score_scale, softcap,
                           m_i, l_i, out_base, out_q_blocks, out_q_ok, inv_rows, n_k_blocks, stride,
                           row_shift, HEAD_DIM, D_CHUNK, BLOCK_PB, Q_BLOCKS, K_BLOCKS, HAS_SOFTCAP, UPCAST,
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
    tile_rows: int = TILE_ROWS,
    tile_groups: int = TILE_GROUPS,
    num_warps: int = NUM_WARPS,
    sweeps: int = SWEEPS,
    alternate: bool = False,
    sampled: bool = False,
) -> torch.Tensor:
    """``q [B, Hq, Lq, D]``, ``k [B, Hkv, Lk, D]`` -> ``[B, Hq, ceil(Lq / bs), ceil(Lk / bs)]`` fp32.

    ``tile_rows`` / ``tile_groups`` (powers of two), ``num_warps`` and ``sweeps`` (2: every score tile
    twice, no scratch; 1: once, with scratch, module docstring) are the launch's tuning knobs, exposed
    for the tile sweep; they change the schedule, not the result."""
    if sweeps not in (1, 2):
        raise ValueError(f"sweeps must be 1 or 2, got {sweeps}")
    if sampled and sweeps != 1:
        raise ValueError("the sampled scoring runs in one sweep only (sweeps=1), got sweeps=2")
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
    q_blocks = max(1, tile_rows // block_pb)
    k_blocks = max(1, tile_groups // block_pb)
    n_programs = triton.cdiv(n_q_blocks, q_blocks)
    interpret = q.device.type == "cpu"
    upcast = interpret or q.dtype == torch.float32
    # A pipelined step loads one head_dim chunk (mean logit) or every chunk of the head (the sampled
    # scoring's step is one antidiagonal slot, all of head_dim: 98 KB of operands at 64 x 128 tiles, d 256).
    step_depth = d_chunk if not sampled else triton.cdiv(head_dim, d_chunk) * d_chunk
    stage_bytes = (q_blocks + k_blocks) * block_pb * step_depth * q.element_size()
    # The interpreter ignores launch options; passing them anyway lets tests/hopper_compile.py record the
    # GPU's options (and check the compiled kernel's shared memory against Hopper's limit).
    launch = dict(num_warps=num_warps, num_stages=max(1, min(3, PIPELINE_SHARED_BYTES // stage_bytes)))
    heads = b * hq
    n_tile_slots = triton.cdiv(n_k_blocks, k_blocks)
    n_k_slots = n_tile_slots * k_blocks
    if sweeps == 1:
        row_slots = n_programs * q_blocks * block_pb
        per_head_bytes = row_slots * (n_k_slots + n_tile_slots) * 4
        group = max(1, min(heads, ONE_SWEEP_SCRATCH_BYTES // per_head_bytes))
        partial = torch.empty(group, row_slots, n_k_slots, device=q.device, dtype=torch.float32)
        tile_max = torch.empty(group, row_slots, n_tile_slots, device=q.device, dtype=torch.float32)
    else:
        group = heads
        partial = tile_max = out  # unread by the two-sweep kernel
    kv_map = kv_head_index.to(torch.int32)
    for first in range(0, heads, group):
        _antidiagonal_mass_kernel[(n_programs, min(group, heads - first))](
            q, k, kv_map, out, partial, tile_max,
            *q.stride(), *k.stride(),
            hq, q_len, k_len, k_len - q_len, n_rows, stride, per_block, n_q_blocks, n_k_blocks, n_programs,
            first, n_k_slots, n_tile_slots, int(alternate),
            # The mean-logit scoring scales the antidiagonal sum by scale / S (the mean of its S logits).
            float(scale) if sampled else float(scale) / stride, float(softcap) if softcap is not None else 1.0,
            HEAD_DIM=head_dim, D_CHUNK=d_chunk, BLOCK_PB=block_pb, Q_BLOCKS=q_blocks,
            K_BLOCKS=k_blocks, HAS_SOFTCAP=softcap is not None, UPCAST=upcast, SWEEPS=sweeps, SAMPLED=sampled,
            **launch,
        )
    return out


__all__ = ["antidiagonal_block_mass_triton"]
