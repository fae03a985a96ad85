"""Triton sparse decode attention, split-K (flash-decoding).

1. ``_sparse_decode_split_kernel``: one program per (split, batch x KV head). A split is a run of
   consecutive slots of the (batch, KV head)'s page list; the program walks it ``BLOCK_N`` keys at a
   time (``BLOCK_N / P`` pages per tile, each key's page id gathered from the list), for all ``G * T``
   query rows of the KV group at once (padded to 16 rows for ``tl.dot``), so each selected K/V page is
   read once per group. It writes its rows' partial (max, sum, unnormalised accumulator) in fp32.
2. ``_sparse_decode_reduce_kernel``: one program per (batch, query head, query) merges the splits'
   partials (log-sum-exp rescaling) and stores ``acc / sum`` in the output dtype.

"All pages" (dense decode) is the same kernel with the page id equal to the slot (``DENSE``).
Query ``t`` of ``T`` sits at key position ``L - T + t`` and sees keys ``<= `` it (causal).
"""

from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

from ..triton_common import (
    empty_softmax_state,
    load_rows,
    log2_scores,
    online_softmax_step,
)
from .attention import MAX_GROUP_ROWS

# Keys per inner-loop tile: 4 pages of 16, or one page of 64 (a tile is at least one page).
TILE_KEYS = 64
# A split reads at least this many keys, so its partial write (rows x D fp32) stays small next to
# the K/V it reads.
MIN_SPLIT_KEYS = 128
# Programs to aim for per SM: enough to hide memory latency on a bandwidth-bound kernel.
PROGRAMS_PER_SM = 2


@functools.lru_cache(maxsize=None)
def _sm_count(device_index: int) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count


@triton.jit
def _sparse_decode_split_kernel(
    Q, K, V, PageIndex, PageCount, PartMax, PartSum, PartAcc,
    stride_qb, stride_qh, stride_qt, stride_qd,
    stride_kb, stride_kh, stride_kn, stride_kd,
    stride_vb, stride_vh, stride_vn, stride_vd,
    stride_ib, stride_ih, stride_in,
    stride_cb, stride_ch,
    num_kv_heads, k_len, num_pages, slots_per_split, num_splits, score_scale, softcap,
    GROUP: tl.constexpr, T: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
    BLOCK_R: tl.constexpr, PAGE: tl.constexpr, BLOCK_N: tl.constexpr,
    DENSE: tl.constexpr, HAS_SOFTCAP: tl.constexpr, UPCAST: tl.constexpr,
):
    pid_s = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = pid_bh // num_kv_heads
    h = pid_bh % num_kv_heads
    rows = tl.arange(0, BLOCK_R)
    r_ok = rows < GROUP * T
    hq = h * GROUP + rows // T
    t = rows % T
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < HEAD_DIM
    q = tl.load(Q + b * stride_qb + hq[:, None] * stride_qh + t[:, None] * stride_qt + offs_d[None, :] * stride_qd,
                mask=r_ok[:, None] & d_ok[None, :], other=0.0)
    if UPCAST:
        q = q.to(tl.float32)
    q_pos = k_len - T + t
    if DENSE:
        count = num_pages
    else:
        count = tl.load(PageCount + b * stride_cb + h * stride_ch)
    slot_begin = pid_s * slots_per_split
    slot_end = tl.minimum(slot_begin + slots_per_split, count)
    k_base = K + b * stride_kb + h * stride_kh
    v_base = V + b * stride_vb + h * stride_vh
    index_row = PageIndex + b * stride_ib + h * stride_ih
    m_i, l_i, acc = empty_softmax_state(BLOCK_R, BLOCK_D)
    offs_n = tl.arange(0, BLOCK_N)
    PAGES_PER_TILE: tl.constexpr = BLOCK_N // PAGE
    for first_slot in range(slot_begin, slot_end, PAGES_PER_TILE):
        slot = first_slot + offs_n // PAGE
        slot_ok = slot < slot_end
        if DENSE:
            page = slot
        else:
            page = tl.load(index_row + slot * stride_in, mask=slot_ok, other=0)
        pos = page * PAGE + offs_n % PAGE
        n_ok = slot_ok & (pos < k_len)
        k = load_rows(k_base, pos, n_ok, stride_kn, offs_d, d_ok, stride_kd, UPCAST)
        v = load_rows(v_base, pos, n_ok, stride_vn, offs_d, d_ok, stride_vd, UPCAST)
        s = log2_scores(q, k, score_scale, softcap, HAS_SOFTCAP)
        s = tl.where(n_ok[None, :] & (pos[None, :] <= q_pos[:, None]), s, float("-inf"))
        m_i, l_i, acc = online_softmax_step(s, v, m_i, l_i, acc, UPCAST)
    # Partials laid out [B, Hq, T, num_splits] (+ [.., D] for the accumulator), contiguous.
    part = ((b * num_kv_heads * GROUP + hq) * T + t) * num_splits + pid_s
    tl.store(PartMax + part, m_i, mask=r_ok)
    tl.store(PartSum + part, l_i, mask=r_ok)
    tl.store(PartAcc + part[:, None] * HEAD_DIM + offs_d[None, :], acc, mask=r_ok[:, None] & d_ok[None, :])


@triton.jit
def _sparse_decode_reduce_kernel(
    PartMax, PartSum, PartAcc, Out,
    stride_ob, stride_oh, stride_ot, stride_od,
    num_heads, num_splits,
    T: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_S: tl.constexpr,
):
    row = tl.program_id(0)  # (b * Hq + hq) * T + t
    b = row // (num_heads * T)
    hq = (row // T) % num_heads
    t = row % T
    offs_s = tl.arange(0, BLOCK_S)
    s_ok = offs_s < num_splits
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < HEAD_DIM
    m = tl.load(PartMax + row * num_splits + offs_s, mask=s_ok, other=float("-inf"))
    l = tl.load(PartSum + row * num_splits + offs_s, mask=s_ok, other=0.0)
    m_all = tl.max(m, 0)
    # Splits that saw no key have max -inf (weight 0); a row no split saw shifts by 0 and stores zeros.
    m_shift = tl.where(m_all == float("-inf"), 0.0, m_all)
    w = tl.exp2(m - m_shift)
    total = tl.sum(l * w, 0)
    acc = tl.load(PartAcc + (row * num_splits + offs_s[:, None]) * HEAD_DIM + offs_d[None, :],
                  mask=s_ok[:, None] & d_ok[None, :], other=0.0)
    out = tl.sum(acc * w[:, None], 0) / tl.where(total > 0, total, 1.0)
    tl.store(Out + b * stride_ob + hq * stride_oh + t * stride_ot + offs_d * stride_od,
             out.to(Out.dtype.element_ty), mask=d_ok)


def split_plan(total_slots: int, page_size: int, programs_per_split: int, device: torch.device) -> tuple[int, int, int]:
    """(block_n, slots_per_split, num_splits): splits of whole tiles, about ``PROGRAMS_PER_SM`` programs per
    SM over the ``programs_per_split`` (batch x KV head) programs of one split, each at least
    ``MIN_SPLIT_KEYS`` keys."""
    block_n = max(TILE_KEYS, page_size)
    pages_per_tile = block_n // page_size
    if device.type == "cuda":
        target = max(1, -(-PROGRAMS_PER_SM * _sm_count(device.index or 0) // programs_per_split))
    else:
        target = 4  # the interpreter: a few splits, so the merge is exercised
    slots = max(-(-max(total_slots, 1) // target), -(-MIN_SPLIT_KEYS // page_size) if device.type == "cuda" else 1)
    slots = -(-slots // pages_per_tile) * pages_per_tile
    return block_n, slots, max(1, -(-total_slots // slots))


def sparse_decode_attention_triton(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    page_index: torch.Tensor | None,
    page_count: torch.Tensor | None,
    *,
    page_size: int,
    scale: float,
    softcap: float | None,
    out: torch.Tensor,
) -> torch.Tensor:
    """GPU ``sparse_decode_attention`` (split-K): ``q [B, Hq, T, D]``, ``k, v [B, Hkv, L, D]``, optional
    ``page_index [B, Hkv, W]`` / ``page_count [B, Hkv]`` -> ``out [B, Hq, T, D]`` (written in place)."""
    b, hq, t, d = q.shape
    hkv, k_len = k.shape[1], k.shape[2]
    group = hq // hkv
    if group * t > MAX_GROUP_ROWS:
        raise ValueError(f"G * T = {group} * {t} query rows per KV head exceeds {MAX_GROUP_ROWS}")
    dense = page_index is None
    num_pages = -(-k_len // page_size)
    total_slots = num_pages if dense else page_index.shape[-1]
    block_n, slots_per_split, num_splits = split_plan(total_slots, page_size, b * hkv, q.device)
    if dense:
        # Unused pointers/strides in the DENSE specialisation.
        page_index = torch.zeros(1, 1, 1, dtype=torch.int32, device=q.device)
        page_count = torch.zeros(1, 1, dtype=torch.int32, device=q.device)
    part_max = torch.empty(b, hq, t, num_splits, dtype=torch.float32, device=q.device)
    part_sum = torch.empty_like(part_max)
    part_acc = torch.empty(b, hq, t, num_splits, d, dtype=torch.float32, device=q.device)
    block_d = triton.next_power_of_2(d)
    interpret = q.device.type == "cpu"
    _sparse_decode_split_kernel[(num_splits, b * hkv)](
        q, k, v, page_index, page_count, part_max, part_sum, part_acc,
        *q.stride(), *k.stride(), *v.stride(), *page_index.stride(), *page_count.stride(),
        hkv, k_len, num_pages, slots_per_split, num_splits, float(scale), float(softcap) if softcap is not None else 1.0,
        GROUP=group, T=t, HEAD_DIM=d, BLOCK_D=block_d, BLOCK_R=max(16, triton.next_power_of_2(group * t)),
        PAGE=page_size, BLOCK_N=block_n, DENSE=dense, HAS_SOFTCAP=softcap is not None,
        UPCAST=interpret or q.dtype == torch.float32,
        num_warps=4, num_stages=2,
    )
    _sparse_decode_reduce_kernel[(b * hq * t,)](
        part_max, part_sum, part_acc, out, *out.stride(), hq, num_splits,
        T=t, HEAD_DIM=d, BLOCK_D=block_d, BLOCK_S=triton.next_power_of_2(num_splits),
        num_warps=4,
    )
    return out


__all__ = ["sparse_decode_attention_triton", "split_plan"]
