"""Triton line scores for vertical-slash estimation, without an ``[n, Lk]`` probability buffer.

The scoring rows are ``N_WINDOWS`` windows of up to ``last_queries`` query rows spread over the
prompt (``geometry.spread_window_ends``; one window = the last rows). Three launches in all, whatever the
number of windows, because the estimate is bound by host time per launch at 32K, not by the device:
1. per (key tile, batch x query head), each window row's max and sum of exp2 scores (log2 domain);
2. per (batch x query head, window), those per-tile pairs folded into one log2-sum-exp2 per row;
3. per (key tile, batch x query head), the normalised probabilities of every window summed down
   columns (each tile owns its columns: plain stores of the sum over windows) and along diagonals
   ``d = query_pos - key_pos`` (summed inside the tile first, then one atomic add per diagonal:
   diagonals cross tiles). Each window's rows weigh ``1 / (rows x windows)``, so the result is the
   mean of the windows' own line scores.
A K tile is loaded once per program and scored against every window.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ..geometry import spread_window_ends
from ..triton_common import load_rows, log2_scores

ROW_STATS_PASS = 1  # per key tile: each row's max and sum of exp2 (for the log-sum-exp)
LINE_SUMS_PASS = 2  # per key tile: normalised probabilities summed down columns and diagonals
FOLD_TILES = 32  # per-tile (max, sum) pairs folded per step of the log-sum-exp kernel


@triton.jit
def _window_first_row(w, q_len, n_rows, N_WINDOWS: tl.constexpr):
    """Window ``w``'s first local query row: its ``n_rows`` rows end where
    ``geometry.spread_window_ends`` puts them (``N_WINDOWS`` is its count). Every window holds the same
    ``n_rows = min(last_queries, Lq)`` rows: with two windows or more, the first ends at or past
    ``last_queries``."""
    return (q_len * (w + 1)) // N_WINDOWS - n_rows


@triton.jit
def _line_scores_kernel(
    Q, K, KvHeadIndex, RowMax, RowSum, RowLse, Vertical, Slash,
    stride_qb, stride_qh, stride_qm, stride_qd, stride_kb, stride_kh, stride_kn, stride_kd,
    num_heads, n_tiles, n_rows, q_len, k_len, q_offset, score_scale, softcap, weight,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, ROWS: tl.constexpr, BLOCK_N: tl.constexpr,
    DIAGS: tl.constexpr, N_WINDOWS: tl.constexpr,
    HAS_SOFTCAP: tl.constexpr, UPCAST: tl.constexpr, PASS: tl.constexpr,
):
    tile = tl.program_id(0)
    pid_bh = tl.program_id(1).to(tl.int64)  # int64 head offsets, as in triton_common.query_tile
    b = pid_bh // num_heads
    h = pid_bh % num_heads
    kv_h = tl.load(KvHeadIndex + h).to(tl.int64)
    rows = tl.arange(0, ROWS)
    row_ok = rows < n_rows
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < HEAD_DIM
    offs_n = tile * BLOCK_N + tl.arange(0, BLOCK_N)
    n_ok = offs_n < k_len
    k = load_rows(K + b * stride_kb + kv_h * stride_kh, offs_n, n_ok, stride_kn, offs_d, d_ok, stride_kd, UPCAST)
    q_base = Q + b * stride_qb + h * stride_qh
    column_sums = tl.zeros([BLOCK_N], dtype=tl.float32)
    line_base = pid_bh * k_len
    for w in tl.static_range(N_WINDOWS):
        first_row = _window_first_row(w, q_len, n_rows, N_WINDOWS)
        q_rows = first_row + rows
        stats_row = pid_bh * N_WINDOWS + w
        q = load_rows(q_base, q_rows, row_ok, stride_qm, offs_d, d_ok, stride_qd, UPCAST)
        q_pos = q_rows + q_offset
        ok = row_ok[:, None] & (offs_n[None, :] <= q_pos[:, None]) & n_ok[None, :]
        s = tl.where(ok, log2_scores(q, k, score_scale, softcap, HAS_SOFTCAP), float("-inf"))
        if PASS == 1:  # ROW_STATS_PASS (a jit function reads only constexpr globals)
            m = tl.max(s, 1)
            m_shift = tl.where(m == float("-inf"), 0.0, m)
            out = (stats_row * n_tiles + tile) * ROWS + rows
            tl.store(RowMax + out, m)
            tl.store(RowSum + out, tl.sum(tl.exp2(s - m_shift[:, None]), 1))
        else:
            lse = tl.load(RowLse + stats_row * ROWS + rows)
            # weight = 1 / (rows x windows): the mean over each window's rows, then over the windows.
            p = tl.where(ok, tl.exp2(s - lse[:, None]), 0.0) * weight
            column_sums += tl.sum(p, 0)
            # Rows are consecutive query positions and columns consecutive keys, so entry (i, j) lies
            # on diagonal d_0 + i - j (d_0 = q_pos[0] - offs_n[0]): a tile crosses only
            # ROWS + BLOCK_N - 1 diagonals. One atomic per element (ROWS x BLOCK_N of them) costs far
            # more than the tile's dot, so skew the tile first: column c of `skewed` takes row i's
            # key j = i + BLOCK_N - 1 - c, i.e. column c is local diagonal i - j = c - (BLOCK_N - 1).
            # Summing its rows gives that diagonal's in-tile mass (fp32, like the per-element adds it
            # replaces), and one atomic per diagonal remains. Gathers from outside the tile read a
            # clamped index and are zeroed; masked entries of p are already exact zeros.
            diags = tl.arange(0, DIAGS)
            src = rows[:, None] + (BLOCK_N - 1) - diags[None, :]
            in_tile = (src >= 0) & (src < BLOCK_N)
            skewed = tl.gather(p, tl.minimum(tl.maximum(src, 0), BLOCK_N - 1), 1)
            diag_sums = tl.sum(tl.where(in_tile, skewed, 0.0), 0)
            first_pos = first_row + q_offset
            d = first_pos - tile * BLOCK_N - (BLOCK_N - 1) + diags
            # Skip the power-of-two padding columns, diagonals outside the output row (d < 0 holds
            # only future keys, d >= k_len only padding rows: all zeros) and tiles wholly after the
            # window's last row (an early window sees a prefix of the keys). Relaxed order: nothing
            # reads Slash before the launch ends (fire-and-forget reductions). The tile test is made
            # per lane: Triton's interpreter rejects an atomic mask that folds in a scalar.
            tile_seen = (tile * BLOCK_N + diags * 0) <= first_pos + n_rows - 1
            diag_ok = (diags < ROWS + BLOCK_N - 1) & (d >= 0) & (d < k_len) & tile_seen
            tl.atomic_add(Slash + line_base + d, diag_sums, mask=diag_ok, sem="relaxed")
    if PASS == 2:  # LINE_SUMS_PASS: each tile owns its columns (plain stores of the windows' sum)
        tl.store(Vertical + line_base + offs_n, column_sums, mask=n_ok)


@triton.jit
def _fold_row_stats_kernel(RowMax, RowSum, RowLse, n_tiles, ROWS: tl.constexpr, FOLD: tl.constexpr):
    """Per (batch x head, window): the per-tile (max, sum of exp2) pairs of each row folded into its
    log2-sum-exp2 (-inf for padding rows, which saw no key), ``FOLD`` tiles at a time."""
    stats_row = tl.program_id(0).to(tl.int64)
    lanes = tl.arange(0, ROWS)
    tiles = tl.arange(0, FOLD)
    m = tl.full([ROWS], float("-inf"), dtype=tl.float32)
    total = tl.zeros([ROWS], dtype=tl.float32)
    base = stats_row * n_tiles * ROWS
    for t0 in range(0, n_tiles, FOLD):
        tile_ok = (t0 + tiles) < n_tiles
        offs = base + (t0 + tiles)[:, None] * ROWS + lanes[None, :]
        tile_max = tl.load(RowMax + offs, mask=tile_ok[:, None], other=float("-inf"))
        tile_sum = tl.load(RowSum + offs, mask=tile_ok[:, None], other=0.0)
        m_new = tl.maximum(m, tl.max(tile_max, 0))
        # A row with no key yet keeps max -inf; shift by 0 so exp2 gives zeros, not NaN.
        shift = tl.where(m_new == float("-inf"), 0.0, m_new)
        total = total * tl.exp2(m - shift) + tl.sum(tile_sum * tl.exp2(tile_max - shift[None, :]), 0)
        m = m_new
    shift = tl.where(m == float("-inf"), 0.0, m)
    tl.store(RowLse + stats_row * ROWS + lanes, tl.log2(total) + shift)


def vertical_slash_scores_triton(
    q: torch.Tensor,
    k: torch.Tensor,
    *,
    scale: float,
    last_queries: int,
    softcap: float | None,
    kv_head_index: torch.Tensor,
    query_windows: int = 1,
) -> tuple[torch.Tensor, torch.Tensor]:
    """GPU ``vertical_slash_scores``: ``q [B, Hq, Lq, D]``, ``k [B, Hkv, Lk, D]`` ->
    ``(vertical [B, Hq, Lk], slash [B, Hq, Lk])`` fp32: the mean line scores of ``query_windows``
    windows of ``last_queries`` rows (``geometry.spread_window_ends``), in three launches."""
    b, hq, q_len, head_dim = q.shape
    k_len = k.shape[2]
    n_windows = len(spread_window_ends(q_len, last_queries, query_windows))
    n_rows = min(last_queries, q_len)  # the rows of every window (_window_first_row)
    rows = max(16, triton.next_power_of_2(n_rows))  # tl.dot needs >= 16 rows
    block_d = triton.next_power_of_2(head_dim)
    block_n = 64 if block_d <= 128 else 32
    n_tiles = triton.cdiv(k_len, block_n)
    interpret = q.device.type == "cpu"
    # ROWS + BLOCK_N - 1 diagonals cross a tile; gathered tiles need a power-of-two width.
    diags = triton.next_power_of_2(rows + block_n - 1)
    common = dict(HEAD_DIM=head_dim, BLOCK_D=block_d, ROWS=rows, BLOCK_N=block_n, DIAGS=diags, N_WINDOWS=n_windows,
                  HAS_SOFTCAP=softcap is not None, UPCAST=interpret or q.dtype == torch.float32)
    kv = kv_head_index.to(torch.int32)
    strides = (*q.stride(), *k.stride())
    cap = float(softcap) if softcap is not None else 1.0
    grid = (n_tiles, b * hq)
    row_max = torch.empty(b * hq, n_windows, n_tiles, rows, device=q.device, dtype=torch.float32)
    row_sum = torch.empty_like(row_max)
    lse = torch.empty(b * hq, n_windows, rows, device=q.device, dtype=torch.float32)
    vertical = torch.empty(b, hq, k_len, device=q.device, dtype=torch.float32)
    slash = torch.zeros(b, hq, k_len, device=q.device, dtype=torch.float32)
    args = (q, k, kv, row_max, row_sum, lse, vertical, slash)
    scalars = (*strides, hq, n_tiles, n_rows, q_len, k_len, k_len - q_len, float(scale), cap, 1.0 / (n_rows * n_windows))
    _line_scores_kernel[grid](*args, *scalars, PASS=ROW_STATS_PASS, **common)
    _fold_row_stats_kernel[(b * hq * n_windows,)](row_max, row_sum, lse, n_tiles, ROWS=rows, FOLD=FOLD_TILES)
    _line_scores_kernel[grid](*args, *scalars, PASS=LINE_SUMS_PASS, **common)
    return vertical, slash


__all__ = ["vertical_slash_scores_triton"]
