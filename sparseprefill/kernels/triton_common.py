"""Triton building blocks shared by the attention and estimation kernels (inlined by the compiler).

Scores live in the log2 domain: the softmax scale is multiplied by log2(e) = 1.4426950408889634 so the kernels use
``exp2``. Soft-capping (``c * tanh(s / c)``) is applied to the natural-scale score first.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def tanh(x):
    # Through exp2 (no tanh intrinsic in every Triton version): 1 - 2 / (exp(2x) + 1).
    return 1.0 - 2.0 / (tl.exp2(x * 2.8853900817779268) + 1.0)


@triton.jit
def load_rows(base, rows, row_ok, stride_row, offs_d, d_ok, stride_d, UPCAST: tl.constexpr):
    """``[len(rows), BLOCK_D]`` tile of rows ``rows`` (masked by ``row_ok`` and the head dim)."""
    tile = tl.load(base + rows[:, None] * stride_row + offs_d[None, :] * stride_d,
                   mask=row_ok[:, None] & d_ok[None, :], other=0.0)
    if UPCAST:
        # Triton's CPU interpreter computes bf16 arithmetic wrongly; fp32 inputs stay fp32.
        tile = tile.to(tl.float32)
    return tile


@triton.jit
def to_log2_scores(dots, score_scale, softcap, HAS_SOFTCAP: tl.constexpr):
    """Raw ``q . k`` products -> scaled (and soft-capped) scores in the log2 domain."""
    if HAS_SOFTCAP:
        return softcap * tanh(dots * (score_scale / softcap)) * 1.4426950408889634
    return dots * (score_scale * 1.4426950408889634)


@triton.jit
def exact_dot(a, b):
    """``a @ b``, in full fp32 when the operands are fp32: Triton's default for fp32 is TF32 (10-bit
    mantissa), a silent precision loss for an fp32 model that PyTorch's own attention does not take."""
    if a.dtype == tl.float32:
        return tl.dot(a, b, input_precision="ieee")
    return tl.dot(a, b)


@triton.jit
def log2_scores(q, k, score_scale, softcap, HAS_SOFTCAP: tl.constexpr):
    """``q @ k^T`` scaled (and soft-capped), in the log2 domain."""
    return to_log2_scores(exact_dot(q, tl.trans(k)), score_scale, softcap, HAS_SOFTCAP)


@triton.jit
def row_stats_step(s, m_i, l_i):
    """Fold a tile of log2 scores ``s [M, N]`` into each row's running max and sum of exp2."""
    m_new = tl.maximum(m_i, tl.max(s, 1))
    # A row that has seen no key keeps max -inf; shift by 0 so exp2 gives zeros, not NaN.
    m_shift = tl.where(m_new == float("-inf"), 0.0, m_new)
    l_i = l_i * tl.exp2(m_i - m_shift) + tl.sum(tl.exp2(s - m_shift[:, None]), 1)
    return m_new, l_i


@triton.jit
def log2_sum_exp2(m_i, l_i):
    """Each row's log2-sum-exp2 from its running max and sum. Rows that saw no key (``l == 0``) get a
    finite stand-in, so a masked-out ``exp2(s - lse)`` stays free of inf - inf."""
    seen = l_i > 0
    return tl.where(seen, m_i, 0.0) + tl.log2(tl.where(seen, l_i, 1.0))


@triton.jit
def mask_scores(s, offs_n, n_ok, q_pos, window, HAS_WINDOW: tl.constexpr):
    """-inf where key ``offs_n`` is invalid, in the future of ``q_pos`` or outside the window."""
    ok = (offs_n[None, :] <= q_pos[:, None]) & n_ok[None, :]
    if HAS_WINDOW:
        ok = ok & (offs_n[None, :] > q_pos[:, None] - window)
    return tl.where(ok, s, float("-inf"))


@triton.jit
def online_softmax_step(s, v, m_i, l_i, acc, UPCAST: tl.constexpr, RESCALE_SLACK: tl.constexpr = 0.0):
    """Fold one tile of log2 scores ``s [M, N]`` and values ``v [N, D]`` into the running max, sum and
    accumulator (FlashAttention-2's rescaling).

    ``RESCALE_SLACK > 0`` (log2 units) rescales lazily, as FlashAttention-4 does: the running max moves,
    and ``acc`` and ``l`` are rescaled, only when some row of the tile exceeds it by more than the slack;
    otherwise the tile's probabilities are taken against the stale max, so they stay below
    ``2 ** RESCALE_SLACK``, which fp32 sums and bf16 / fp16 probabilities hold (``MAX_RESCALE_SLACK``). The result is
    the same softmax: ``acc / l`` does not depend on which max both were taken against. It spares the
    ``[M, D]`` multiply of every tile whose maxima barely move, at the price of a block-wide max and a
    branch per tile."""
    m_new = tl.maximum(m_i, tl.max(s, 1))
    if RESCALE_SLACK > 0:
        # A row still at -inf that now sees a key counts as growing without bound: it must rescale.
        growth = tl.max(tl.where(m_new > m_i, m_new - m_i, 0.0), 0)
        if growth > RESCALE_SLACK:
            m_shift = tl.where(m_new == float("-inf"), 0.0, m_new)
            alpha = tl.exp2(m_i - m_shift)
            l_i = l_i * alpha
            acc = acc * alpha[:, None]
            m_i = m_new
        m_shift = tl.where(m_i == float("-inf"), 0.0, m_i)
        p = tl.exp2(s - m_shift[:, None])
        l_i = l_i + tl.sum(p, 1)
        if UPCAST:
            acc = acc + exact_dot(p, v)
        else:
            acc = acc + tl.dot(p.to(v.dtype), v)
        return m_i, l_i, acc
    # A row that has seen no key yet keeps max -inf; shift by 0 so exp2 gives exact zeros, not NaN.
    m_shift = tl.where(m_new == float("-inf"), 0.0, m_new)
    alpha = tl.exp2(m_i - m_shift)
    p = tl.exp2(s - m_shift[:, None])
    l_i = l_i * alpha + tl.sum(p, 1)
    if UPCAST:
        acc = acc * alpha[:, None] + exact_dot(p, v)
    else:
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v)
    return m_new, l_i, acc


@triton.jit
def store_rows(base, rows, row_ok, stride_row, offs_d, d_ok, stride_d, acc, l_i):
    """Normalise and store ``acc / l``; rows that saw no key (``l == 0``) store zeros."""
    out = acc / tl.where(l_i > 0, l_i, 1.0)[:, None]
    tl.store(base + rows[:, None] * stride_row + offs_d[None, :] * stride_d, out.to(base.dtype.element_ty),
             mask=row_ok[:, None] & d_ok[None, :])


@triton.jit
def attend_key_tile(q, k_base, v_base, start_n, limit, offs_d, d_ok, stride_kn, stride_kd, stride_vn, stride_vd,
                    q_pos, first_q_pos, last_q_pos, m_i, l_i, acc, score_scale, softcap, window,
                    BLOCK_N: tl.constexpr, HAS_WINDOW: tl.constexpr, HAS_SOFTCAP: tl.constexpr,
                    UPCAST: tl.constexpr, RESCALE_SLACK: tl.constexpr = 0.0):
    """Attend the contiguous keys ``[start_n, start_n + BLOCK_N)`` below ``limit``. Masks are applied
    only when the tile can cross ``limit``, the diagonal or the window edge, so interior tiles run
    mask-free."""
    offs_n = start_n + tl.arange(0, BLOCK_N)
    n_ok = offs_n < limit
    k = load_rows(k_base, offs_n, n_ok, stride_kn, offs_d, d_ok, stride_kd, UPCAST)
    v = load_rows(v_base, offs_n, n_ok, stride_vn, offs_d, d_ok, stride_vd, UPCAST)
    return attend_loaded_tile(q, k, v, offs_n, n_ok, start_n, limit, q_pos, first_q_pos, last_q_pos, m_i, l_i, acc,
                              score_scale, softcap, window, BLOCK_N, HAS_WINDOW, HAS_SOFTCAP, UPCAST, RESCALE_SLACK)


@triton.jit
def attend_key_tile_tma(q, k_desc, v_desc, b, kv_h, start_n, limit, q_pos, first_q_pos, last_q_pos, m_i, l_i, acc,
                        score_scale, softcap, window, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
                        HAS_WINDOW: tl.constexpr, HAS_SOFTCAP: tl.constexpr, UPCAST: tl.constexpr,
                        RESCALE_SLACK: tl.constexpr = 0.0):
    """``attend_key_tile`` with K and V loaded through tensor descriptors (``[B, Hkv, Lk, D]``, box
    ``[1, 1, BLOCK_N, BLOCK_D]``; Hopper's TMA): one copy per tile instead of per-element addresses and
    bounds. Keys past ``Lk`` and head-dim lanes past ``D`` arrive as zeros; keys of the head at or
    past ``limit`` arrive as they are and are masked out of the scores (finite values, zero weight)."""
    offs_n = start_n + tl.arange(0, BLOCK_N)
    n_ok = offs_n < limit
    k = k_desc.load([b, kv_h, start_n, 0]).reshape(BLOCK_N, BLOCK_D)
    v = v_desc.load([b, kv_h, start_n, 0]).reshape(BLOCK_N, BLOCK_D)
    if UPCAST:
        k = k.to(tl.float32)
        v = v.to(tl.float32)
    return attend_loaded_tile(q, k, v, offs_n, n_ok, start_n, limit, q_pos, first_q_pos, last_q_pos, m_i, l_i, acc,
                              score_scale, softcap, window, BLOCK_N, HAS_WINDOW, HAS_SOFTCAP, UPCAST, RESCALE_SLACK)


@triton.jit
def attend_loaded_tile(q, k, v, offs_n, n_ok, start_n, limit, q_pos, first_q_pos, last_q_pos, m_i, l_i, acc,
                       score_scale, softcap, window, BLOCK_N: tl.constexpr, HAS_WINDOW: tl.constexpr,
                       HAS_SOFTCAP: tl.constexpr, UPCAST: tl.constexpr, RESCALE_SLACK: tl.constexpr):
    """Scores, masks (only where the tile can cross ``limit``, the diagonal or the window edge) and the
    online-softmax step of a loaded key tile ``k, v [BLOCK_N, D]`` at keys ``offs_n``."""
    s = log2_scores(q, k, score_scale, softcap, HAS_SOFTCAP)
    needs_mask = (start_n + BLOCK_N > limit) | (start_n + BLOCK_N - 1 > first_q_pos)
    if HAS_WINDOW:
        needs_mask = needs_mask | (start_n <= last_q_pos - window)
    if needs_mask:
        s = mask_scores(s, offs_n, n_ok, q_pos, window, HAS_WINDOW)
    return online_softmax_step(s, v, m_i, l_i, acc, UPCAST, RESCALE_SLACK)


@triton.jit
def attend_key_range_tma(q, k_desc, v_desc, b, kv_h, start, end, q_pos, first_q_pos, last_q_pos, m_i, l_i, acc,
                         score_scale, softcap, window, RANGE_N: tl.constexpr, BLOCK_D: tl.constexpr,
                         HAS_WINDOW: tl.constexpr, HAS_SOFTCAP: tl.constexpr, UPCAST: tl.constexpr,
                         RESCALE_SLACK: tl.constexpr = 0.0):
    """Attend the contiguous keys ``[start, end)`` in ``RANGE_N``-key tiles loaded by TMA."""
    for start_n in range(start, end, RANGE_N):
        m_i, l_i, acc = attend_key_tile_tma(q, k_desc, v_desc, b, kv_h, start_n, end, q_pos, first_q_pos,
                                            last_q_pos, m_i, l_i, acc, score_scale, softcap, window, RANGE_N,
                                            BLOCK_D, HAS_WINDOW, HAS_SOFTCAP, UPCAST, RESCALE_SLACK)
    return m_i, l_i, acc


@triton.jit
def attend_key_range(q, k_base, v_base, start, end, offs_d, d_ok, stride_kn, stride_kd, stride_vn, stride_vd,
                     q_pos, first_q_pos, last_q_pos, m_i, l_i, acc, score_scale, softcap, window,
                     RANGE_N: tl.constexpr, WIDE_N: tl.constexpr, HAS_WINDOW: tl.constexpr,
                     HAS_SOFTCAP: tl.constexpr, UPCAST: tl.constexpr, RESCALE_SLACK: tl.constexpr = 0.0):
    """Attend the contiguous keys ``[start, end)``: whole ``WIDE_N``-key tiles while they fit, then
    ``RANGE_N``-key tiles for the rest (``WIDE_N == 0``: ``RANGE_N`` tiles only). A range starts
    wherever its band does, so its last tile is partial: narrow tiles waste little of it, wide tiles
    run each key at a higher rate; the split keeps both."""
    if WIDE_N > 0:
        wide_end = start + (tl.maximum(end - start, 0) // WIDE_N) * WIDE_N
        for start_n in range(start, wide_end, WIDE_N):
            m_i, l_i, acc = attend_key_tile(q, k_base, v_base, start_n, end, offs_d, d_ok, stride_kn, stride_kd,
                                            stride_vn, stride_vd, q_pos, first_q_pos, last_q_pos, m_i, l_i, acc,
                                            score_scale, softcap, window, WIDE_N, HAS_WINDOW, HAS_SOFTCAP, UPCAST,
                                            RESCALE_SLACK)
        start = wide_end
    for start_n in range(start, end, RANGE_N):
        m_i, l_i, acc = attend_key_tile(q, k_base, v_base, start_n, end, offs_d, d_ok, stride_kn, stride_kd,
                                        stride_vn, stride_vd, q_pos, first_q_pos, last_q_pos, m_i, l_i, acc,
                                        score_scale, softcap, window, RANGE_N, HAS_WINDOW, HAS_SOFTCAP, UPCAST,
                                        RESCALE_SLACK)
    return m_i, l_i, acc


@triton.jit
def head_block(num_heads, length, first_block, BLOCK: tl.constexpr):
    """Prologue of a grid (blocks of ``BLOCK`` positions, batch x head): the program's batch row, head,
    block number (``first_block + program_id(0)``), its ``BLOCK`` position offsets and their in-range
    mask (``offs < length``)."""
    pid_bh = tl.program_id(1)
    block = first_block + tl.program_id(0)
    offs = block * BLOCK + tl.arange(0, BLOCK)
    return pid_bh // num_heads, pid_bh % num_heads, block, offs, offs < length


@triton.jit
def program_head(KvHeadIndex, num_heads):
    """Batch row, query head and KV head of a program whose grid axis 1 is batch x query head, in int64:
    a per-head index table can pass 2^31 elements (e.g. 14 heads x 2048 query blocks x 80K columns at
    128K), and head x head-stride products overflow int32 long before memory runs out."""
    pid_bh = tl.program_id(1)
    b = (pid_bh // num_heads).to(tl.int64)
    h = (pid_bh % num_heads).to(tl.int64)
    return b, h, tl.load(KvHeadIndex + h).to(tl.int64)


@triton.jit
def query_rows(Q, b, h, first_row, q_len, stride_qb, stride_qh, stride_qm, stride_qd,
               HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, ROWS: tl.constexpr, UPCAST: tl.constexpr):
    """Rows ``[first_row, first_row + ROWS)`` of query head ``h``: their offsets and in-range mask, the
    head-dim offsets and mask, and the ``[ROWS, BLOCK_D]`` tile."""
    offs_m = first_row + tl.arange(0, ROWS)
    m_ok = offs_m < q_len
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < HEAD_DIM
    q = load_rows(Q + b * stride_qb + h * stride_qh, offs_m, m_ok, stride_qm, offs_d, d_ok, stride_qd, UPCAST)
    return offs_m, m_ok, offs_d, d_ok, q


@triton.jit
def column_keys(column_row, c0, n_columns, k_len, stride_cn, COLUMN_N: tl.constexpr):
    """Key positions in the column slots ``[c0, c0 + COLUMN_N)`` of one index row (``column_row``
    points at its first slot) and which of them are real keys."""
    slots = c0 + tl.arange(0, COLUMN_N)
    slot_ok = slots < n_columns
    offs_n = tl.load(column_row + slots * stride_cn, mask=slot_ok, other=0)
    return offs_n, slot_ok & (offs_n < k_len)


@triton.jit
def query_tile(Q, K, V, KvHeadIndex, stride_qb, stride_qh, stride_qm, stride_qd, stride_kb, stride_kh,
               stride_vb, stride_vh, num_heads, q_len, q_offset,
               HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_Q: tl.constexpr,
               UPCAST: tl.constexpr):
    """The attention kernels' common prologue for program (query tile, batch x query head): its batch
    row and head, the index row it reads (an index row of ``BLOCK_Q`` rows may span several
    ``BLOCK_M``-row programs), its query tile and positions, and its KV head's K/V bases."""
    pid_m = tl.program_id(0)
    b, h, kv_h = program_head(KvHeadIndex, num_heads)
    index_row_id = (pid_m // (BLOCK_Q // BLOCK_M)).to(tl.int64)
    offs_m, m_ok, offs_d, d_ok, q = query_rows(Q, b, h, pid_m * BLOCK_M, q_len, stride_qb, stride_qh, stride_qm,
                                               stride_qd, HEAD_DIM, BLOCK_D, BLOCK_M, UPCAST)
    q_pos = offs_m + q_offset
    first_q_pos = pid_m * BLOCK_M + q_offset
    last_q_pos = tl.minimum(pid_m * BLOCK_M + BLOCK_M, q_len) - 1 + q_offset
    k_base = K + b * stride_kb + kv_h * stride_kh
    v_base = V + b * stride_vb + kv_h * stride_vh
    return b, h, index_row_id, offs_m, m_ok, offs_d, d_ok, q, q_pos, first_q_pos, last_q_pos, k_base, v_base


@triton.jit
def empty_softmax_state(BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr):
    """Running max (-inf), sum (0) and fp32 accumulator (0) of an online softmax over no key yet."""
    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    return m_i, l_i, acc


# The online softmax's lazy-rescale slack in log2 units (``online_softmax_step``; 0: rescale every tile,
# FlashAttention-2's way). Nsight Compute put the vertical-slash kernel at 2.7-3.2x cuDNN's instructions
# per computed pair, issue-bound (H100, experiments/kernel_profile.py, stop 35); an [M, D] rescale per
# 32-key tile is one of the per-tile costs a slack of 8 (FlashAttention-4's: probabilities < 256) skips.
# Off until the GPU fuzz has run it; the attention kernels take ``rescale_slack=`` to measure it.
ONLINE_SOFTMAX_RESCALE_SLACK = 0.0


def checked_rescale_slack(rescale_slack: float | None) -> float:
    """The lazy-rescale slack a kernel launches with: ``rescale_slack``, or the shipped one for None.
    Refused outside [0, MAX_RESCALE_SLACK]."""
    slack = ONLINE_SOFTMAX_RESCALE_SLACK if rescale_slack is None else float(rescale_slack)
    if not 0.0 <= slack <= MAX_RESCALE_SLACK:
        raise ValueError(f"rescale_slack must lie in [0, {MAX_RESCALE_SLACK:g}] (log2 units), got {rescale_slack}")
    return slack


# Stale-max probabilities reach 2**slack and are cast to the value dtype for the PV product: fp16's
# largest finite value is 65504 < 2**16, so 15 is the widest slack every supported dtype holds.
MAX_RESCALE_SLACK = 15.0


def _host_descriptors():
    try:
        from triton.tools.tensor_descriptor import TensorDescriptor
    except ImportError:
        return None
    return TensorDescriptor


def tma_unaddressable(x: torch.Tensor, option: str) -> str | None:
    """Why TMA key tiles cannot read ``x [B, Hkv, Lk, D]`` (None: they can): TMA needs Triton's host
    tensor descriptors, a 16-byte aligned base, a contiguous last dimension and 16-byte multiples for
    the other strides (``option`` names the kernel option in the reason)."""
    if _host_descriptors() is None:
        return (f"{option} needs Triton's host tensor descriptors (triton.tools.tensor_descriptor); "
                f"Triton {triton.__version__} has none")
    element = x.element_size()
    misaligned = [s for s in x.stride()[:-1] if (s * element) % 16]
    if x.stride(-1) != 1 or misaligned or x.data_ptr() % 16:
        return (f"{option} needs K/V with a contiguous last dimension, 16-byte strides and a 16-byte "
                f"aligned base; got strides {tuple(x.stride())} of {element}-byte elements at "
                f"address {x.data_ptr()} mod 16 = {x.data_ptr() % 16}")
    return None


def tma_by_default(k: torch.Tensor, v: torch.Tensor) -> bool:
    """Whether a kernel whose TMA tiles measured faster takes them by default for these K/V: on Hopper
    or newer (where they were timed; TMA is Hopper's copy engine) and the Triton interpreter (which
    the CPU tests run), where TMA can address both; otherwise the pointer path, the same keys."""
    on_hopper = k.device.type == "cpu" or torch.cuda.get_device_capability(k.device)[0] >= HOPPER_MAJOR
    return on_hopper and tma_unaddressable(k, "tma") is None and tma_unaddressable(v, "tma") is None


HOPPER_MAJOR = 9  # compute capability of the first GPUs with TMA (sm_90)


def key_tile_descriptor(x: torch.Tensor, keys: int, block_d: int, option: str):
    """A tensor descriptor over ``x [B, Hkv, Lk, D]`` with a ``[1, 1, keys, block_d]`` box (rows past ``Lk``
    and lanes past ``D`` read as zeros), for the kernels' TMA key tiles (``option`` names the kernel
    option in errors); refused where TMA cannot address ``x`` (``tma_unaddressable``), with what was found."""
    reason = tma_unaddressable(x, option)
    if reason is not None:
        raise ValueError(reason)
    return _host_descriptors()(x, list(x.shape), list(x.stride()), [1, 1, keys, block_d])


# Shared memory per SM on Hopper is 228 KB; Q, K and V tiles (K/V staged num_stages deep) must fit.
# Rows per program and keys per tile shrink for head_dim 256 and for fp32 inputs (twice the bytes).
LARGE_TILE_BYTES = 2 * 128  # element bytes x padded head_dim up to which 128-row programs fit


def tile_sizes(head_dim: int, block_q: int, block_k: int, element_bytes: int) -> tuple[int, int, int, int, int]:
    """(BLOCK_M, BLOCK_N, num_warps, num_stages, BLOCK_D) for an index with ``block_q`` query rows and
    ``block_k``-key blocks. BLOCK_M divides ``block_q`` and BLOCK_N divides ``block_k``."""
    block_d = triton.next_power_of_2(head_dim)
    fits_large = element_bytes * block_d <= LARGE_TILE_BYTES
    block_m = min(block_q, 128 if fits_large else 64)
    block_n = min(block_k, 64 if fits_large else 32)
    while block_k % block_n:
        block_n //= 2
    num_warps = 8 if block_m >= 128 else 4
    num_stages = 3 if fits_large else 2
    return block_m, block_n, num_warps, num_stages, block_d
