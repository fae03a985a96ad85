"""Triton line scores for vertical-slash estimation, without an ``[n, Lk]`` probability buffer.

Two launches, both parallel over (key tile, batch x query head):
1. per key tile, each of the last ``n`` query rows' max and sum of exp2 scores (log2 domain), which
   PyTorch folds into one log-sum-exp per row (``n`` x tiles numbers per head: tiny);
2. per key tile, the normalised probabilities summed down columns (each tile owns its columns, plain
   stores) and along diagonals ``d = query_pos - key_pos`` (summed inside the tile first, then one
   atomic add per diagonal: diagonals cross tiles).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ..triton_common import load_rows, log2_scores

ROW_STATS_PASS = 1  # per key tile: each row's max and sum of exp2 (for the log-sum-exp)
LINE_SUMS_PASS = 2  # per key tile: normalised probabilities summed down columns and diagonals


@triton.jit
def _line_scores_kernel(
    Q, K, KvHeadIndex, RowMax, RowSum, RowLse, Vertical, Slash,
    stride_qb, stride_qh, stride_qm, stride_qd, stride_kb, stride_kh, stride_kn, stride_kd,
    num_heads, n_tiles, n_rows, q_len, k_len, q_offset, score_scale, softcap, inv_rows,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, ROWS: tl.constexpr, BLOCK_N: tl.constexpr,
    DIAGS: tl.constexpr,
    HAS_SOFTCAP: tl.constexpr, UPCAST: tl.constexpr, PASS: tl.constexpr,
):
    tile = tl.program_id(0)
    pid_bh = tl.program_id(1).to(tl.int64)  # int64 head offsets, as in triton_common.query_tile
    b = pid_bh // num_heads
    h = pid_bh % num_heads
    kv_h = tl.load(KvHeadIndex + h).to(tl.int64)
    rows = tl.arange(0, ROWS)
    row_ok = rows < n_rows
    q_rows = q_len - n_rows + rows  # local query row of each of the last n queries
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < HEAD_DIM
    offs_n = tile * BLOCK_N + tl.arange(0, BLOCK_N)
    n_ok = offs_n < k_len
    q = load_rows(Q + b * stride_qb + h * stride_qh, q_rows, row_ok, stride_qm, offs_d, d_ok, stride_qd, UPCAST)
    k = load_rows(K + b * stride_kb + kv_h * stride_kh, offs_n, n_ok, stride_kn, offs_d, d_ok, stride_kd, UPCAST)
    q_pos = q_rows + q_offset
    ok = row_ok[:, None] & (offs_n[None, :] <= q_pos[:, None]) & n_ok[None, :]
    s = tl.where(ok, log2_scores(q, k, score_scale, softcap, HAS_SOFTCAP), float("-inf"))
    if PASS == 1:  # ROW_STATS_PASS (a jit function reads only constexpr globals)
        m = tl.max(s, 1)
        m_shift = tl.where(m == float("-inf"), 0.0, m)
        out = (pid_bh * n_tiles + tile) * ROWS + rows
        tl.store(RowMax + out, m)
        tl.store(RowSum + out, tl.sum(tl.exp2(s - m_shift[:, None]), 1))
    else:
        lse = tl.load(RowLse + pid_bh * ROWS + rows)
        p = tl.where(ok, tl.exp2(s - lse[:, None]), 0.0) * inv_rows
        line_base = pid_bh * k_len
        # Each tile owns its columns (plain stores); diagonals d = query_pos - key_pos cross tiles.
        tl.store(Vertical + line_base + offs_n, tl.sum(p, 0), mask=n_ok)
        # Rows are consecutive query positions and columns consecutive keys, so entry (i, j) lies on
        # diagonal d_0 + i - j (d_0 = q_pos[0] - offs_n[0]): a tile crosses only ROWS + BLOCK_N - 1
        # diagonals. One atomic per element (ROWS x BLOCK_N of them) costs far more than the tile's
        # dot, so skew the tile first: column c of `skewed` takes row i's key j = i + BLOCK_N - 1 - c,
        # i.e. column c is local diagonal i - j = c - (BLOCK_N - 1). Summing its rows gives that
        # diagonal's in-tile mass (fp32, like the per-element adds it replaces), and one atomic per
        # diagonal remains. Gathers from outside the tile read a clamped index and are zeroed; masked
        # entries of p are already exact zeros. (tl.gather is newer than Triton 3.2; we require 3.6.)
        diags = tl.arange(0, DIAGS)
        src = rows[:, None] + (BLOCK_N - 1) - diags[None, :]
        in_tile = (src >= 0) & (src < BLOCK_N)
        skewed = tl.gather(p, tl.minimum(tl.maximum(src, 0), BLOCK_N - 1), 1)
        diag_sums = tl.sum(tl.where(in_tile, skewed, 0.0), 0)
        d = (q_len - n_rows + q_offset) - tile * BLOCK_N - (BLOCK_N - 1) + diags
        # Skip the power-of-two padding columns and diagonals outside the output row: d < 0 holds only
        # future (non-causal) keys, d >= k_len only padding rows, all zeros. Relaxed order: nothing
        # reads Slash before the launch ends (fire-and-forget reductions, no value-returning atomics).
        d_ok = (diags < ROWS + BLOCK_N - 1) & (d >= 0) & (d < k_len)
        tl.atomic_add(Slash + line_base + d, diag_sums, mask=d_ok, sem="relaxed")


def vertical_slash_scores_triton(
    q: torch.Tensor,
    k: torch.Tensor,
    *,
    scale: float,
    last_queries: int,
    softcap: float | None,
    kv_head_index: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:
    """GPU ``vertical_slash_scores``: ``q [B, Hq, Lq, D]``, ``k [B, Hkv, Lk, D]`` ->
    ``(vertical [B, Hq, Lk], slash [B, Hq, Lk])`` fp32, in two passes (row statistics, then line sums)."""
    b, hq, q_len, head_dim = q.shape
    k_len = k.shape[2]
    n_rows = min(last_queries, q_len)
    rows = max(16, triton.next_power_of_2(n_rows))  # tl.dot needs >= 16 rows
    block_d = triton.next_power_of_2(head_dim)
    block_n = 64 if block_d <= 128 else 32
    n_tiles = triton.cdiv(k_len, block_n)
    interpret = q.device.type == "cpu"
    # ROWS + BLOCK_N - 1 diagonals cross a tile; gathered tiles need a power-of-two width.
    diags = triton.next_power_of_2(rows + block_n - 1)
    common = dict(HEAD_DIM=head_dim, BLOCK_D=block_d, ROWS=rows, BLOCK_N=block_n, DIAGS=diags,
                  HAS_SOFTCAP=softcap is not None, UPCAST=interpret or q.dtype == torch.float32)
    kv = kv_head_index.to(torch.int32)
    strides = (*q.stride(), *k.stride())
    cap = float(softcap) if softcap is not None else 1.0
    grid = (n_tiles, b * hq)
    row_max = torch.empty(b * hq, n_tiles, rows, device=q.device, dtype=torch.float32)
    row_sum = torch.empty_like(row_max)
    vertical = torch.empty(b, hq, k_len, device=q.device, dtype=torch.float32)
    slash = torch.zeros(b, hq, k_len, device=q.device, dtype=torch.float32)
    args = (q, k, kv, row_max, row_sum)
    scalars = (*strides, hq, n_tiles, n_rows, q_len, k_len, k_len - q_len, float(scale), cap, 1.0 / n_rows)
    # Pass 1 reads no log-sum-exp yet: row_max stands in for that argument.
    _line_scores_kernel[grid](*args, row_max, vertical, slash, *scalars, PASS=ROW_STATS_PASS, **common)
    # Fold the per-tile (max, sum) pairs into one log2-sum-exp2 per row. Padding rows see no key:
    # their lse is -inf and they are masked out in the second pass anyway.
    global_max = row_max.amax(dim=1, keepdim=True)
    shift = torch.where(torch.isfinite(global_max), global_max, torch.zeros_like(global_max))
    total = (row_sum * torch.exp2(row_max - shift)).sum(dim=1)
    lse = (torch.log2(total) + shift[:, 0]).contiguous()
    _line_scores_kernel[grid](*args, lse, vertical, slash, *scalars, PASS=LINE_SUMS_PASS, **common)
    return vertical, slash


__all__ = ["vertical_slash_scores_triton"]
