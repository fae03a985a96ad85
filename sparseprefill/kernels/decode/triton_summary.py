"""Triton page summaries: one program per (page, batch x KV head) reads the page's ``[P, D]`` key tile
once and writes its min, max, mean and std (two-pass over the tile in registers, fp32)."""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ..triton_common import head_block


@triton.jit
def _page_summary_kernel(
    K, Min, Max, Mean, Std,
    stride_kb, stride_kh, stride_kn, stride_kd,
    stride_sb, stride_sh, stride_sp, stride_sd,
    num_heads, k_len, first_page,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, PAGE: tl.constexpr,
    MINMAX: tl.constexpr, MEANSTD: tl.constexpr,
):
    b, h, page, offs_n, n_ok = head_block(num_heads, k_len, first_page, PAGE)
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < HEAD_DIM
    ok = n_ok[:, None] & d_ok[None, :]
    keys = tl.load(K + b * stride_kb + h * stride_kh + offs_n[:, None] * stride_kn + offs_d[None, :] * stride_kd,
                   mask=ok, other=0.0).to(tl.float32)
    # Summaries are stored in one layout; the same offset addresses all four buffers.
    s_off = b * stride_sb + h * stride_sh + page * stride_sp + offs_d * stride_sd
    if MINMAX:
        tl.store(Min + s_off, tl.min(tl.where(ok, keys, float("inf")), 0).to(Min.dtype.element_ty), mask=d_ok)
        tl.store(Max + s_off, tl.max(tl.where(ok, keys, float("-inf")), 0).to(Max.dtype.element_ty), mask=d_ok)
    if MEANSTD:
        count = tl.minimum(k_len - page * PAGE, PAGE).to(tl.float32)
        mu = tl.sum(keys, 0) / count
        diff = tl.where(ok, keys - mu[None, :], 0.0)
        sd = tl.sqrt(tl.sum(diff * diff, 0) / count)
        tl.store(Mean + s_off, mu.to(Mean.dtype.element_ty), mask=d_ok)
        tl.store(Std + s_off, sd.to(Std.dtype.element_ty), mask=d_ok)


def page_summary_triton(
    k: torch.Tensor,
    page_size: int,
    first_page: int,
    last_page: int,
    minimum: torch.Tensor | None,
    maximum: torch.Tensor | None,
    mean: torch.Tensor | None,
    std: torch.Tensor | None,
) -> None:
    """GPU ``page_summary_naive``: writes pages ``[first_page, last_page)`` of the summary buffers
    (each ``[B, Hkv, capacity, D]``, None when not kept) from ``k [B, Hkv, L, D]``."""
    b, h, k_len, d = k.shape
    bufs = [t for t in (minimum, maximum, mean, std) if t is not None]
    ref = bufs[0]
    if any(t.stride() != ref.stride() for t in bufs):
        raise ValueError("summary buffers must share one layout (strides)")
    dummy = ref  # placeholder pointer for the statistics not requested (never touched: constexpr off)
    grid = (last_page - first_page, b * h)
    _page_summary_kernel[grid](
        k, minimum if minimum is not None else dummy, maximum if maximum is not None else dummy,
        mean if mean is not None else dummy, std if std is not None else dummy,
        *k.stride(), *ref.stride(),
        h, k_len, first_page,
        HEAD_DIM=d, BLOCK_D=triton.next_power_of_2(d), PAGE=page_size,
        MINMAX=minimum is not None, MEANSTD=mean is not None,
        num_warps=4 if page_size * d <= 64 * 128 else 8,
    )


__all__ = ["page_summary_triton"]
