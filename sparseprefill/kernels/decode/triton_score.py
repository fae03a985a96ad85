"""Triton page scoring, two small kernels over (page block, batch x KV head):

1. ``_page_logits_kernel`` loads the block's two summary tiles ``[BLOCK_P, D]`` once and, for each of
   the ``G * T`` rows of the KV group, writes the page logits (log2 domain, fp32) and the block's
   running (max, sum of exp2) for that row, so the summaries are read once per group.
2. ``_page_combine_kernel`` merges each row's per-block (max, sum) into its log-sum-exp over all pages,
   normalises the row's logits to log-probabilities and combines the rows (max, or log-sum-exp for
   "sum"), writing one natural-log score per (batch, KV head, page).

The scores are elementwise products and sums in fp32 (no ``tl.dot``): the work is tiny next to the
summary reads, and the Quest bound keeps its exact ``max(q m, q M)`` form.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ..triton_common import head_block

LOG2E = 1.4426950408889634
# Elements of one summary tile per program: [BLOCK_P, BLOCK_D] fp32, 32 pages at head_dim 128.
TILE_ELEMENTS = 4096


@triton.jit
def _page_logits_kernel(
    Q, First, Second, Logits, PartMax, PartSum,
    stride_qb, stride_qh, stride_qt, stride_qd,
    stride_sb, stride_sh, stride_sp, stride_sd,
    stride_lb, stride_lh, stride_lr, stride_lp,
    stride_pb, stride_ph, stride_pr, stride_pn,
    num_kv_heads, num_pages, log2_scale, spread_weight,
    GROUP: tl.constexpr, T: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
    BLOCK_P: tl.constexpr, QUEST: tl.constexpr,
):
    b, h, pid_p, offs_p, p_ok = head_block(num_kv_heads, num_pages, 0, BLOCK_P)
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < HEAD_DIM
    s_off = b * stride_sb + h * stride_sh + offs_p[:, None] * stride_sp + offs_d[None, :] * stride_sd
    ok = p_ok[:, None] & d_ok[None, :]
    first = tl.load(First + s_off, mask=ok, other=0.0).to(tl.float32)
    second = tl.load(Second + s_off, mask=ok, other=0.0).to(tl.float32)
    for r in tl.static_range(GROUP * T):
        hq = h * GROUP + r // T
        q = tl.load(Q + b * stride_qb + hq * stride_qh + (r % T) * stride_qt + offs_d * stride_qd,
                    mask=d_ok, other=0.0).to(tl.float32)
        if QUEST:
            prod = tl.maximum(q[None, :] * first, q[None, :] * second)
        else:
            prod = q[None, :] * first + spread_weight * tl.abs(q)[None, :] * second
        s = tl.where(p_ok, tl.sum(prod, 1) * log2_scale, float("-inf"))
        tl.store(Logits + b * stride_lb + h * stride_lh + r * stride_lr + offs_p * stride_lp, s, mask=p_ok)
        m = tl.max(s, 0)
        part = b * stride_pb + h * stride_ph + r * stride_pr + pid_p * stride_pn
        tl.store(PartMax + part, m)
        tl.store(PartSum + part, tl.sum(tl.exp2(s - m), 0))


@triton.jit
def _page_combine_kernel(
    Logits, PartMax, PartSum, Out,
    stride_lb, stride_lh, stride_lr, stride_lp,
    stride_pb, stride_ph, stride_pr, stride_pn,
    stride_ob, stride_oh, stride_op,
    num_kv_heads, num_pages, num_blocks,
    ROWS: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_NB: tl.constexpr, REDUCE_SUM: tl.constexpr,
):
    b, h, pid_p, offs_p, p_ok = head_block(num_kv_heads, num_pages, 0, BLOCK_P)
    offs_nb = tl.arange(0, BLOCK_NB)
    nb_ok = offs_nb < num_blocks
    best = tl.zeros([BLOCK_P], dtype=tl.float32)
    total = tl.zeros([BLOCK_P], dtype=tl.float32)
    for r in tl.static_range(ROWS):
        part = b * stride_pb + h * stride_ph + r * stride_pr + offs_nb * stride_pn
        m_parts = tl.load(PartMax + part, mask=nb_ok, other=float("-inf"))
        l_parts = tl.load(PartSum + part, mask=nb_ok, other=0.0)
        m_row = tl.max(m_parts, 0)
        lse = m_row + tl.log2(tl.sum(l_parts * tl.exp2(m_parts - m_row), 0))
        s = tl.load(Logits + b * stride_lb + h * stride_lh + r * stride_lr + offs_p * stride_lp, mask=p_ok, other=0.0)
        x = s - lse
        if r == 0:
            best = x
            total = tl.full([BLOCK_P], 1.0, dtype=tl.float32)
        else:
            new_best = tl.maximum(best, x)
            if REDUCE_SUM:
                total = total * tl.exp2(best - new_best) + tl.exp2(x - new_best)
            best = new_best
    if REDUCE_SUM:
        best = best + tl.log2(total)
    # Scores were kept in log2 units; * ln 2 (a literal: compiled kernels read no plain module globals)
    # returns the natural-log probabilities the contract promises.
    tl.store(Out + b * stride_ob + h * stride_oh + offs_p * stride_op, best * 0.6931471805599453, mask=p_ok)


def page_scores_triton(
    q: torch.Tensor,
    first: torch.Tensor,
    second: torch.Tensor,
    *,
    scale: float,
    method: str,
    spread_weight: float,
    group_reduce: str,
) -> torch.Tensor:
    """Same contract as ``page_scores_naive``: ``q [B, Hq, T, D]``, ``first, second [B, Hkv, N, D]``
    (may be strided views of larger buffers) -> ``[B, Hkv, N]`` fp32 log-probabilities."""
    b, hq, t, d = q.shape
    hkv, n = first.shape[1], first.shape[2]
    group = hq // hkv
    rows = group * t
    block_d = triton.next_power_of_2(d)
    block_p = max(16, min(128, TILE_ELEMENTS // block_d))
    num_blocks = triton.cdiv(n, block_p)
    logits = torch.empty(b, hkv, rows, n, dtype=torch.float32, device=q.device)
    part_max = torch.empty(b, hkv, rows, num_blocks, dtype=torch.float32, device=q.device)
    part_sum = torch.empty_like(part_max)
    out = torch.empty(b, hkv, n, dtype=torch.float32, device=q.device)
    if first.stride() != second.stride():
        second = second.contiguous()
        first = first.contiguous()
    grid = (num_blocks, b * hkv)
    _page_logits_kernel[grid](
        q, first, second, logits, part_max, part_sum,
        *q.stride(), *first.stride(), *logits.stride(), *part_max.stride(),
        hkv, n, float(scale) * LOG2E, float(spread_weight),
        GROUP=group, T=t, HEAD_DIM=d, BLOCK_D=block_d, BLOCK_P=block_p, QUEST=method == "quest",
        num_warps=4,
    )
    _page_combine_kernel[grid](
        logits, part_max, part_sum, out,
        *logits.stride(), *part_max.stride(), *out.stride(),
        hkv, n, num_blocks,
        ROWS=rows, BLOCK_P=block_p, BLOCK_NB=triton.next_power_of_2(num_blocks), REDUCE_SUM=group_reduce == "sum",
        num_warps=4,
    )
    return out


__all__ = ["page_scores_triton"]
