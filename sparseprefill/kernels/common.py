"""Argument checks and the fp32 reference building blocks shared by the ``naive.py`` twins."""

from __future__ import annotations

from typing import Any

import torch

from .geometry import visible

__all__ = ["check_qkv", "prepare_sparse_attention", "check_triton_query_block", "default_kv_head_index", "resolve_kv_head_index", "prepare_out", "masked_softmax_attend", "attend_gathered", "qk_scores", "compact"]

SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def check_qkv(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> tuple[int, int, int, int, int, int]:
    """Validate the HF attention layout and return ``(B, Hq, Lq, Hkv, Lk, D)``.

    ``q [B, Hq, Lq, D]``, ``k, v [B, Hkv, Lk, D]`` (not repeated for GQA), ``Lq <= Lk``.
    """
    for name, t in (("q", q), ("k", k), ("v", v)):
        if t.ndim != 4:
            raise ValueError(f"{name} must be [B, H, L, D], got shape {tuple(t.shape)}")
        if t.dtype not in SUPPORTED_DTYPES:
            raise TypeError(f"{name} dtype {t.dtype} unsupported; expected one of {SUPPORTED_DTYPES}")
    b, hq, lq, d = q.shape
    bk, hkv, lk, dk = k.shape
    if k.shape != v.shape:
        raise ValueError(f"k {tuple(k.shape)} and v {tuple(v.shape)} must have the same shape")
    if bk != b or dk != d:
        raise ValueError(f"q {tuple(q.shape)} and k {tuple(k.shape)} disagree on batch or head_dim")
    if lq > lk:
        raise ValueError(f"Lq={lq} > Lk={lk}: queries must be the last Lq of the Lk key positions")
    if not (q.device == k.device == v.device):
        raise ValueError(f"q, k, v on different devices: {q.device}, {k.device}, {v.device}")
    return b, hq, lq, hkv, lk, d


def default_kv_head_index(hq: int, hkv: int, device: torch.device) -> torch.Tensor:
    """Query head ``h`` reads KV head ``h // (Hq / Hkv)`` (the HF GQA layout)."""
    if hq % hkv:
        raise ValueError(f"query heads ({hq}) must be a multiple of KV heads ({hkv})")
    return torch.arange(hq, device=device) // (hq // hkv)


def resolve_kv_head_index(kv_head_index: torch.Tensor | None, hq: int, hkv: int, device: torch.device) -> torch.Tensor:
    if kv_head_index is None:
        return default_kv_head_index(hq, hkv, device)
    kv_head_index = kv_head_index.to(device=device, dtype=torch.long)
    if kv_head_index.shape != (hq,):
        raise ValueError(f"kv_head_index must have shape ({hq},), got {tuple(kv_head_index.shape)}")
    if not hq:
        return kv_head_index
    in_range = (kv_head_index.min() >= 0) & (kv_head_index.max() < hkv)
    message = f"kv_head_index values must be in [0, {hkv})"
    if kv_head_index.device.type == "cpu":
        if not bool(in_range):
            raise ValueError(message)
    else:
        # Reading the check back would stall the host on every attention call (several per layer);
        # a device-side assert still stops a bad index before a kernel reads out of bounds.
        torch._assert_async(in_range, message)
    return kv_head_index


def prepare_out(out: torch.Tensor | None, q: torch.Tensor) -> torch.Tensor:
    """Return ``out`` (checked) or a fresh ``[B, Hq, Lq, D]`` tensor in q's dtype.

    ``out`` may be a strided view, e.g. ``buf.transpose(1, 2)`` of a ``[B, Lq, Hq, D]`` buffer so the
    result lands directly in the layout transformers expects.
    """
    if out is None:
        return torch.empty_like(q, memory_format=torch.contiguous_format)
    if out.shape != q.shape:
        raise ValueError(f"out must have shape {tuple(q.shape)}, got {tuple(out.shape)}")
    if out.device != q.device:
        raise ValueError(f"out on {out.device}, q on {q.device}")
    return out


def masked_softmax_attend(scores: torch.Tensor, ok: torch.Tensor, values: torch.Tensor, softcap: float | None) -> torch.Tensor:
    """fp32 softmax(scores) @ values over the keys where ``ok``; rows with no visible key give 0.

    ``scores [..., Q, K]`` fp32 (already scaled), ``ok`` broadcastable bool, ``values [..., K, D]``.
    """
    if scores.shape[-1] == 0:
        # No key listed for this block at all: every row sees nothing and outputs zeros.
        batch = torch.broadcast_shapes(scores.shape[:-2], values.shape[:-2])
        return scores.new_zeros(*batch, scores.shape[-2], values.shape[-1])
    if softcap is not None:
        scores = softcap * torch.tanh(scores / softcap)
    scores = scores.masked_fill(~ok, float("-inf"))
    row_max = scores.amax(dim=-1, keepdim=True)
    # A row that sees no key has max -inf; shift by 0 so exp() gives exact zeros, not NaN.
    row_max = torch.where(torch.isfinite(row_max), row_max, torch.zeros_like(row_max))
    probs = torch.exp(scores - row_max)
    denom = probs.sum(dim=-1, keepdim=True)
    out = probs @ values
    return torch.where(denom > 0, out / denom.clamp_min(torch.finfo(torch.float32).tiny), torch.zeros_like(out))


def attend_gathered(
    q_block: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    key_positions: torch.Tensor,
    key_valid: torch.Tensor,
    q_positions: torch.Tensor,
    kv_head_index: torch.Tensor,
    scale: float,
    window: int | None,
    softcap: float | None,
) -> torch.Tensor:
    """Attention of one query block over a per-head list of key positions, in fp32.

    ``q_block [B, H, bq, D]``; ``key_positions, key_valid [B, H, K]``; ``q_positions [bq]`` (key
    positions of the rows). Only the listed keys of each query head's KV head are gathered, so GQA
    never materialises a repeated K/V. Returns ``[B, H, bq, D]`` fp32.
    """
    b = q_block.shape[0]
    k_len = k.shape[2]
    pos = key_positions.clamp(0, k_len - 1)
    b_idx = torch.arange(b, device=k.device)[:, None, None]
    h_idx = kv_head_index[None, :, None]
    keys = k[b_idx, h_idx, pos].float()
    values = v[b_idx, h_idx, pos].float()
    scores = torch.einsum("bhqd,bhkd->bhqk", q_block.float(), keys) * scale
    ok = key_valid[:, :, None, :] & visible(q_positions[None, None, :, None], key_positions[:, :, None, :], window)
    return masked_softmax_attend(scores, ok, values, softcap)


def qk_scores(q_rows: torch.Tensor, k: torch.Tensor, kv_head_index: torch.Tensor, scale: float) -> torch.Tensor:
    """fp32 ``q_rows @ k^T * scale`` per query head against its KV head: ``[B, Hq, n, D]`` x
    ``[B, Hkv, Lk, D]`` -> ``[B, Hq, n, Lk]``. Loops over KV heads, so GQA never repeats K."""
    b, hq, n, _ = q_rows.shape
    scores = torch.empty(b, hq, n, k.shape[2], dtype=torch.float32, device=q_rows.device)
    for kv_head in torch.unique(kv_head_index).tolist():
        heads = torch.nonzero(kv_head_index == kv_head).flatten()
        scores[:, heads] = (q_rows[:, heads].float() @ k[:, kv_head, None].float().transpose(-1, -2)) * scale
    return scores


def compact(keep: torch.Tensor, min_width: int = 1, *, trim: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """``keep [..., N]`` bool -> ``(count [...] int32, index [..., W] int32)``: the kept positions in
    ascending order, padded (with -1) to the largest count ``W`` (``trim=False``: to ``N``, so the host
    never waits for the device to learn the count)."""
    count = keep.sum(-1)
    order = torch.argsort((~keep).to(torch.int8), dim=-1, stable=True)
    width = max(int(count.max()) if count.numel() else 0, min_width) if trim else keep.shape[-1]
    width = min(width, keep.shape[-1]) if keep.shape[-1] else 0
    index = order[..., :width]
    slots = torch.arange(width, device=keep.device)
    index = torch.where(slots < count[..., None], index, -1)
    return count.to(torch.int32), index.to(torch.int32)


# The Triton attention kernels tile a query block with power-of-two row counts of at least 16
# (``tl.dot``'s minimum).
MIN_TRITON_QUERY_BLOCK = 16


def check_triton_query_block(block_size_q: int) -> None:
    if block_size_q < MIN_TRITON_QUERY_BLOCK or block_size_q & (block_size_q - 1):
        raise ValueError(
            f"the GPU kernel needs a power-of-two query block size >= {MIN_TRITON_QUERY_BLOCK}, got {block_size_q}"
        )


def prepare_sparse_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, index: Any, index_batch_heads: tuple[int, int],
    kv_head_index: torch.Tensor | None, out: torch.Tensor | None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The checks every sparse attention op makes before its kernel: q/k/v layout, an index built for
    these inputs (``index_batch_heads`` = its counts' ``[B, H]``; ``index.q_len``/``k_len``), the GQA
    head map, the output buffer, and on CUDA the Triton query-block limit. Returns
    ``(kv_head_index [Hq], out [B, Hq, Lq, D])``."""
    b, hq, lq, hkv, lk, _ = check_qkv(q, k, v)
    if tuple(index_batch_heads) != (b, hq) or index.q_len != lq or index.k_len != lk:
        raise ValueError(
            f"index is for [B={index_batch_heads[0]}, H={index_batch_heads[1]}, Lq={index.q_len}, "
            f"Lk={index.k_len}], inputs are [B={b}, Hq={hq}, Lq={lq}, Lk={lk}]"
        )
    if q.device.type == "cuda":
        check_triton_query_block(index.block_size_q)
    return resolve_kv_head_index(kv_head_index, hq, hkv, q.device), prepare_out(out, q)
