"""Triton vertical-slash attention (forward).

One program per (query block, batch x query head). It walks the block's merged key ranges in
``RANGE_N``-key tiles (contiguous loads), then its vertical columns ``COLUMN_N`` at a time (gathered row
loads), with one online softmax across both. Ranges and columns are disjoint by the index contract,
so no key is counted twice.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ..indices import VerticalSlashIndex
from ..triton_common import (
    LARGE_TILE_BYTES,
    attend_key_range,
    attend_key_range_tma,
    attend_key_tile,
    attend_key_tile_tma,
    checked_rescale_slack,
    column_keys,
    key_tile_descriptor,
    tma_by_default,
    empty_softmax_state,
    load_rows,
    log2_scores,
    mask_scores,
    online_softmax_step,
    query_tile,
    store_rows,
    tile_sizes,
)


@triton.jit
def _range_bounds(RangeStart, RangeEnd, slot, shift, k_len, HEAD_RANGES: tl.constexpr):
    """Keys ``[start, end)`` of the range at ``slot``: per-head ranges are relative to the block (``shift``:
    its first position) and clipped at key 0; every range is cut at ``k_len``."""
    start = tl.load(RangeStart + slot) + shift
    if HEAD_RANGES:
        start = tl.maximum(start, 0)
    return start, tl.minimum(tl.load(RangeEnd + slot) + shift, k_len)


@triton.jit
def _vertical_slash_fwd_kernel(
    Q, K, V, Out, RangeCount, RangeStart, RangeEnd, ColumnCount, ColumnIndex, KvHeadIndex, KDesc, VDesc, ColumnCover,
    stride_qb, stride_qh, stride_qm, stride_qd,
    stride_kb, stride_kh, stride_kn, stride_kd,
    stride_vb, stride_vh, stride_vn, stride_vd,
    stride_ob, stride_oh, stride_om, stride_od,
    stride_rcb, stride_rch, stride_rcm,
    stride_rb, stride_rh, stride_rm, stride_rn,
    stride_ccb, stride_cch, stride_ccm,
    stride_cb, stride_ch, stride_cm, stride_cn,
    num_heads, q_len, k_len, q_offset, n_range_slots,
    score_scale, softcap, window,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr, RANGE_N: tl.constexpr,
    COLUMN_N: tl.constexpr, BLOCK_Q: tl.constexpr, HAS_WINDOW: tl.constexpr, HAS_SOFTCAP: tl.constexpr, UPCAST: tl.constexpr,
    COLUMN_STAGES: tl.constexpr, RANGE_PIECES: tl.constexpr = False, WIDE_N: tl.constexpr = 0,
    RESCALE_SLACK: tl.constexpr = 0.0, RANGE_TMA: tl.constexpr = False, HEAD_COLUMNS: tl.constexpr = False,
    HEAD_RANGES: tl.constexpr = False,
):
    b, h, index_row_id, offs_m, m_ok, offs_d, d_ok, q, q_pos, first_q_pos, last_q_pos, k_base, v_base = query_tile(
        Q, K, V, KvHeadIndex, stride_qb, stride_qh, stride_qm, stride_qd, stride_kb, stride_kh, stride_vb, stride_vh,
        num_heads, q_len, q_offset, HEAD_DIM, BLOCK_D, BLOCK_M, BLOCK_Q, UPCAST)
    m_i, l_i, acc = empty_softmax_state(BLOCK_M, BLOCK_D)

    # The index block's bounds, not this program's rows (a block of BLOCK_Q rows may span several
    # programs, and its ranges were merged over all of them).
    block_p0 = (index_row_id * BLOCK_Q + q_offset).to(tl.int32)
    block_p1 = (tl.minimum(index_row_id * BLOCK_Q + BLOCK_Q, q_len) - 1 + q_offset).to(tl.int32)
    n_ranges = tl.load(RangeCount + b * stride_rcb + h * stride_rch + index_row_id * stride_rcm)
    if HEAD_RANGES:
        # One table per head, relative to the block's first position (row 1: the last block): the
        # block's ranges are the row's last n_ranges slots, shifted by p0 and clipped at key 0.
        table_row = (index_row_id == tl.cdiv(q_len, BLOCK_Q) - 1).to(tl.int32)
        range_row = b * stride_rb + h * stride_rh + table_row * stride_rm + (n_range_slots - n_ranges) * stride_rn
        range_shift = block_p0
    else:
        range_row = b * stride_rb + h * stride_rh + index_row_id * stride_rm
        range_shift = 0
    if RANGE_TMA:
        # Range tiles by tensor descriptor (KDesc / VDesc over [B, Hkv, Lk, D]): the counters put the
        # pointer path's per-element addresses, bounds and cp.async loads at most of its excess
        # instructions over cuDNN's (integer ALU 43% vs 24%, load/store 21% vs 1.7% busy at d64).
        b32 = b.to(tl.int32)
        kv_h32 = tl.load(KvHeadIndex + h).to(tl.int32)
        for r in range(0, n_ranges):
            start, end = _range_bounds(RangeStart, RangeEnd, range_row + r * stride_rn, range_shift, k_len, HEAD_RANGES)
            if RANGE_PIECES:
                m_i, l_i, acc = attend_key_tile_tma(q, KDesc, VDesc, b32, kv_h32, start, end, q_pos, first_q_pos,
                                                    last_q_pos, m_i, l_i, acc, score_scale, softcap, window, RANGE_N,
                                                    BLOCK_D, HAS_WINDOW, HAS_SOFTCAP, UPCAST, RESCALE_SLACK)
            else:
                m_i, l_i, acc = attend_key_range_tma(q, KDesc, VDesc, b32, kv_h32, start, end, q_pos, first_q_pos,
                                                     last_q_pos, m_i, l_i, acc, score_scale, softcap, window,
                                                     RANGE_N, BLOCK_D, HAS_WINDOW, HAS_SOFTCAP, UPCAST,
                                                     RESCALE_SLACK)
    elif RANGE_PIECES:
        # Every range fits one tile (the builder cut them): one flat loop, which the compiler
        # software-pipelines across ranges; a merged band is ~3 tiles, too short a loop to pipeline.
        for r in range(0, n_ranges):
            start, end = _range_bounds(RangeStart, RangeEnd, range_row + r * stride_rn, range_shift, k_len, HEAD_RANGES)
            m_i, l_i, acc = attend_key_tile(q, k_base, v_base, start, end, offs_d, d_ok, stride_kn, stride_kd,
                                            stride_vn, stride_vd, q_pos, first_q_pos, last_q_pos, m_i, l_i, acc,
                                            score_scale, softcap, window, RANGE_N, HAS_WINDOW, HAS_SOFTCAP, UPCAST,
                                            RESCALE_SLACK)
    else:
        for r in range(0, n_ranges):
            start, end = _range_bounds(RangeStart, RangeEnd, range_row + r * stride_rn, range_shift, k_len, HEAD_RANGES)
            m_i, l_i, acc = attend_key_range(q, k_base, v_base, start, end, offs_d, d_ok, stride_kn, stride_kd,
                                             stride_vn, stride_vd, q_pos, first_q_pos, last_q_pos, m_i, l_i, acc,
                                             score_scale, softcap, window, RANGE_N, WIDE_N, HAS_WINDOW, HAS_SOFTCAP,
                                             UPCAST, RESCALE_SLACK)

    n_columns = tl.load(ColumnCount + b * stride_ccb + h * stride_cch + index_row_id * stride_ccm)
    # Per-head columns: every block reads its head's one list (stride_cm is 0) and skips the columns a
    # band of its block covers.
    column_row = ColumnIndex + b * stride_cb + h * stride_ch + index_row_id * stride_cm
    cover = ColumnCover + (b * num_heads + h) * (k_len + 2)
    # Gathered rows pipeline best at another depth than contiguous tiles: the loop carries its own.
    for c0 in tl.range(0, n_columns, COLUMN_N, num_stages=COLUMN_STAGES):
        offs_n, n_ok = column_keys(column_row, c0, n_columns, k_len, stride_cn, COLUMN_N)
        k = load_rows(k_base, offs_n, n_ok, stride_kn, offs_d, d_ok, stride_kd, UPCAST)
        v = load_rows(v_base, offs_n, n_ok, stride_vn, offs_d, d_ok, stride_vd, UPCAST)
        if HEAD_COLUMNS:
            # Diagonals covering column c for this block lie in [max(p0 - c, 0), p1 - c]; read columns
            # lie below p1 + 1. K/V rows load under the slot mask: their loads need not wait on these.
            in_band = (tl.load(cover + block_p1 - offs_n + 1, mask=n_ok, other=0)
                       - tl.load(cover + tl.maximum(block_p0 - offs_n, 0), mask=n_ok, other=0))
            n_ok = n_ok & (in_band == 0)
        s = mask_scores(log2_scores(q, k, score_scale, softcap, HAS_SOFTCAP), offs_n, n_ok, q_pos, window, HAS_WINDOW)
        m_i, l_i, acc = online_softmax_step(s, v, m_i, l_i, acc, UPCAST, RESCALE_SLACK)

    store_rows(Out + b * stride_ob + h * stride_oh, offs_m, m_ok, stride_om, offs_d, d_ok, stride_od, acc, l_i)


# Keys per tile for ranges and columns. Measured on an H200 (head_dim 128, bf16, 64-row blocks, auto
# index on structured input): 32-key tiles ran 8% faster than 64 at 128K (180 vs 195 ms) and 9% at
# 32K, since merged ranges are short (median ~80 keys) and a 64-key grid wastes their last tile;
# 128-key column tiles and 8 warps were slower (experiments/vertical_slash_tiles.py --sweep).
VERTICAL_SLASH_KEY_TILE = 32


# Whole tiles of this many keys lead each merged range (the rest in VERTICAL_SLASH_KEY_TILE tiles), where
# K and V tiles this wide fit the shared-memory budget of the large tiles (LARGE_TILE_BYTES): 64-key
# tiles ran every causal pair at 0.72 of cuDNN's rate against 0.61-0.63 for 32-key ones at head_dim 128
# (0.82 at 64), but lost 7-16% on the default's short bands as the only tile (partial last tiles).
# Off (0): as leading tiles they made the index kernel 1.15-1.30x slower (64) and 1.50-2.34x (128) at
# 32K and 128K on Llama and Qwen shapes (H100, experiments/wide_tiles.py, stop 35).
VERTICAL_SLASH_WIDE_KEY_TILE = 0


def vertical_slash_wide_tile(head_dim: int, element_bytes: int) -> int:
    """Keys per leading whole tile of a merged range (0: none), for this head_dim and element size."""
    fits = element_bytes * triton.next_power_of_2(head_dim) <= LARGE_TILE_BYTES
    return VERTICAL_SLASH_WIDE_KEY_TILE if fits else 0


# Range pieces (bands cut to the key tile, walked as one flat loop) measured faster above this
# head_dim and not at it (H100, bf16, experiments/vertical_slash_ceiling.py and layer_trace.py): at
# head_dim 128 on Llama shapes at 32K the default's index ran at 0.51 of cuDNN's rate instead of 0.44,
# every causal pair as 64-key ranges at 0.63 instead of 0.48; at head_dim 64 on real Qwen q/k the
# patched layers took 0.99-1.03x the whole-band time at 32K and 128K (a long band cut into 32-key
# pieces pays two index loads per tile, where the whole-band loop reads its bounds once).
RANGE_PIECES_ABOVE_HEAD_DIM = 64

# The gathered-column loop's own pipeline depth (None: the kernel's num_stages, as for ranges).
VERTICAL_SLASH_COLUMN_STAGES: int | None = None


def vertical_slash_column_stages(num_stages: int) -> int:
    """Software-pipeline depth of the gathered-column loop, given the kernel's ``num_stages`` (its
    range loops')."""
    return num_stages if VERTICAL_SLASH_COLUMN_STAGES is None else VERTICAL_SLASH_COLUMN_STAGES


def vertical_slash_tile_sizes(head_dim: int, block_q: int, element_bytes: int) -> tuple[int, int, int, int, int, int]:
    """(BLOCK_M, RANGE_N, COLUMN_N, num_warps, num_stages, BLOCK_D). Range tiles start wherever a
    merged range starts, so the last tile of each range is partial; columns are gathered and fill
    their tiles. Rows, warps and stages follow the block-sparse kernel's shared-memory budget."""
    block_m, block_n, num_warps, num_stages, block_d = tile_sizes(head_dim, block_q, 64, element_bytes)
    key_tile = min(block_n, VERTICAL_SLASH_KEY_TILE)
    return block_m, key_tile, key_tile, num_warps, num_stages, block_d


# Range tiles loaded through tensor descriptors (Hopper's TMA) instead of per-element pointers, for whole
# merged bands, where TMA can address K/V (``tma_by_default``). Written after Nsight Compute placed the
# kernel's excess instructions in address/mask arithmetic and per-thread loads (stop 35); timed on an
# H100 (stop 36, experiments/kernel_profile.py --time-slacks, structured input, the default's lines):
# whole bands 2.0-2.4% faster on Qwen2.5-0.5B shapes (head_dim 64) and 13-14% on Llama-3.1-8B's (128) at
# 32K and 128K; range pieces -1.3% to +1.1%, so pieces keep the pointer path.
VERTICAL_SLASH_RANGE_TMA = True


def vertical_slash_launch(q: torch.Tensor, block_q: int, scale: float, window: int | None,
                          softcap: float | None, wide_key_tile: int | None = None,
                          rescale_slack: float | None = None) -> tuple[int, tuple, dict]:
    """What both vertical-slash attention kernels are launched with: ``(BLOCK_M, trailing scalars
    (scale, softcap, window), tile constexprs and launch options)``. ``wide_key_tile`` overrides the
    leading whole tiles' width (``vertical_slash_wide_tile``; 0: none) and ``rescale_slack`` the online
    softmax's lazy-rescale slack (``checked_rescale_slack``), for measurements."""
    head_dim = q.shape[-1]
    if wide_key_tile is None:
        wide_key_tile = vertical_slash_wide_tile(head_dim, q.element_size())
    elif wide_key_tile and (wide_key_tile & (wide_key_tile - 1) or wide_key_tile < 16):
        raise ValueError(f"wide_key_tile must be 0 or a power of two >= 16 (a Triton tile), got {wide_key_tile}")
    block_m, range_n, column_n, num_warps, num_stages, block_d = vertical_slash_tile_sizes(
        head_dim, block_q, q.element_size()
    )
    scalars = (float(scale), float(softcap) if softcap is not None else 1.0, int(window) if window is not None else 0)
    options = dict(
        HEAD_DIM=head_dim, BLOCK_D=block_d, BLOCK_M=block_m, RANGE_N=range_n, COLUMN_N=column_n, BLOCK_Q=block_q,
        HAS_WINDOW=window is not None, HAS_SOFTCAP=softcap is not None,
        UPCAST=q.device.type == "cpu" or q.dtype == torch.float32,  # the CPU interpreter gets bf16 wrong
        WIDE_N=wide_key_tile, RESCALE_SLACK=checked_rescale_slack(rescale_slack), num_warps=num_warps,
        num_stages=num_stages,
    )
    return block_m, scalars, options


def vertical_slash_attention_triton(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    index: VerticalSlashIndex,
    *,
    scale: float,
    window: int | None,
    softcap: float | None,
    kv_head_index: torch.Tensor,
    out: torch.Tensor,
    wide_key_tile: int | None = None,
    rescale_slack: float | None = None,
    range_tma: bool | None = None,
) -> torch.Tensor:
    """GPU ``vertical_slash_attention``: ``q [B, Hq, Lq, D]``, ``k, v [B, Hkv, Lk, D]``, ``index``
    ``[B, Hq, ceil(Lq / block_size_q), ...]`` -> ``out [B, Hq, Lq, D]`` (written in place).
    ``wide_key_tile``: keys per leading whole tile of a range (0: none; None: the shipped policy);
    ``rescale_slack``: the online softmax's lazy-rescale slack (None: the shipped one); ``range_tma``:
    range tiles through tensor descriptors (None: ``VERTICAL_SLASH_RANGE_TMA`` on whole bands where TMA can
    address K/V; True refuses K/V it cannot address), for measurements."""
    b, hq, q_len, _ = q.shape
    k_len = k.shape[2]
    block_m, scalars, options = vertical_slash_launch(q, index.block_size_q, scale, window, softcap, wide_key_tile,
                                                      rescale_slack)
    options["RANGE_PIECES"] = index.max_range_keys is not None and index.max_range_keys <= options["RANGE_N"]
    options["COLUMN_STAGES"] = vertical_slash_column_stages(options["num_stages"])
    if range_tma is None:
        range_tma = (VERTICAL_SLASH_RANGE_TMA and not options["RANGE_PIECES"] and not options["WIDE_N"]
                     and tma_by_default(k, v))
    options["RANGE_TMA"] = bool(range_tma)
    k_desc, v_desc = k, v  # unread unless RANGE_TMA
    if options["RANGE_TMA"]:
        if options["WIDE_N"]:
            raise ValueError(f"range_tma walks ranges in {options['RANGE_N']}-key tiles; wide_key_tile must be 0, "
                             f"got {options['WIDE_N']}")
        k_desc, v_desc = (key_tile_descriptor(x, options["RANGE_N"], options["BLOCK_D"], "range_tma") for x in (k, v))
    options["HEAD_COLUMNS"] = index.columns_per_head
    options["HEAD_RANGES"] = index.ranges_per_head
    # Per-head columns: one list for every block (stride 0 over blocks), masked by the contiguous cover.
    cover = index.column_cover.contiguous() if index.columns_per_head else index.column_count  # unread if not
    column_strides = list(index.column_index.stride())
    if index.columns_per_head:
        column_strides[2] = 0
    grid = (index.range_count.shape[2] * (index.block_size_q // block_m), b * hq)
    _vertical_slash_fwd_kernel[grid](
        q, k, v, out, index.range_count, index.range_start, index.range_end, index.column_count,
        index.column_index, kv_head_index.to(torch.int32), k_desc, v_desc, cover,
        *q.stride(), *k.stride(), *v.stride(), *out.stride(),
        *index.range_count.stride(), *index.range_start.stride(),
        *index.column_count.stride(), *column_strides,
        hq, q_len, k_len, k_len - q_len, index.range_start.shape[-1], *scalars, **options,
    )
    return out


__all__ = ["RANGE_PIECES_ABOVE_HEAD_DIM", "VERTICAL_SLASH_RANGE_TMA", "VERTICAL_SLASH_WIDE_KEY_TILE", "vertical_slash_attention_triton",
           "vertical_slash_launch", "vertical_slash_wide_tile",
           "vertical_slash_tile_sizes"]
