"""Positions and exact pair counting shared by every kernel op.

Causal alignment is bottom-right (transformers' convention): with ``Lq`` queries and ``Lk`` keys,
local query row ``i`` sits at key position ``Lk - Lq + i``. This covers fresh prefill
(``Lq == Lk``), chunked prefill / follow-up turns (``Lq < Lk``) and decode (``Lq == 1``).

A sliding window ``W`` (transformers' semantics) lets query position ``p`` see key ``j`` iff
``p - W < j <= p``. ``window=None`` means unlimited.
"""

from __future__ import annotations

import torch

__all__ = [
    "causal_block_layout",
    "query_offset",
    "query_block_bounds",
    "spread_window_ends",
    "causal_pairs_in_rects",
    "causal_pairs_in_columns",
    "causal_pairs_total",
    "visible",
]


def query_offset(q_len: int, k_len: int) -> int:
    """Key position of query row 0 under bottom-right alignment."""
    if q_len > k_len:
        raise ValueError(f"more queries ({q_len}) than keys ({k_len}): bottom-right causal alignment needs Lq <= Lk")
    return k_len - q_len


def spread_window_ends(q_len: int, window_rows: int, windows: int) -> list[int]:
    """End rows (exclusive) of ``windows`` query windows of ``window_rows`` rows spread evenly over
    ``q_len`` rows, the last ending at ``q_len``; fewer where the rows cannot hold them apart (the
    windows never overlap, so no row is counted twice). The vertical-slash scoring kernel computes
    the same ends on the device (``triton_estimate._window_rows``)."""
    count = max(1, min(windows, q_len // max(window_rows, 1)))
    return [q_len * (i + 1) // count for i in range(count)]


def query_block_bounds(q_len: int, k_len: int, block_size: int, device: torch.device | str = "cpu") -> tuple[torch.Tensor, torch.Tensor]:
    """First and last key position (inclusive) of the queries of each query block.

    Returns two int64 tensors ``[Rq]`` with ``Rq = ceil(q_len / block_size)``; the last block may be
    shorter than ``block_size``.
    """
    offset = query_offset(q_len, k_len)
    n_blocks = -(-q_len // block_size)
    starts = torch.arange(n_blocks, device=device, dtype=torch.int64) * block_size
    ends = torch.clamp(starts + block_size, max=q_len) - 1
    return starts + offset, ends + offset


def _prefix_pairs(x: torch.Tensor, c0: torch.Tensor, c1: torch.Tensor) -> torch.Tensor:
    """``G(x) = sum_{p <= x} |[c0, min(c1, p + 1))|``: keys of ``[c0, c1)`` visible causally, summed
    over all query positions up to ``x``. Closed form (int64) so counting never loops over rows."""
    width = torch.clamp(c1 - c0, min=0)
    t = torch.clamp(x - c0 + 1, min=0)
    inside = torch.minimum(t, width)
    full_rows = torch.clamp(t - width, min=0)
    return inside * (inside + 1) // 2 + full_rows * width


def causal_pairs_in_rects(
    p0: torch.Tensor, p1: torch.Tensor, c0: torch.Tensor, c1: torch.Tensor, window: int | None = None
) -> torch.Tensor:
    """Number of (query, key) pairs with query position in ``[p0, p1]``, key in ``[c0, c1)`` that are
    causally visible (and inside the sliding window). All arguments broadcast; int64 out.

    With a window, keys visible to ``p`` are those ``<= p`` minus those ``<= p - W``, so the count is
    a difference of four prefix sums.
    """
    p0, p1, c0, c1 = (t.to(torch.int64) for t in (p0, p1, c0, c1))
    total = _prefix_pairs(p1, c0, c1) - _prefix_pairs(p0 - 1, c0, c1)
    if window is not None:
        total = total - (_prefix_pairs(p1 - window, c0, c1) - _prefix_pairs(p0 - 1 - window, c0, c1))
    return total


def block_pair_table(q_len: int, k_len: int, block_size_q: int, block_size_k: int, window: int | None = None,
                     device: torch.device | str = "cpu") -> torch.Tensor:
    """``[Rq, Rk]`` int32: causal (query, key) pairs of each (query block, key block) pair (a block holds
    at most ``block_size_q x block_size_k`` of them). Counting a block index looks its slots up here
    instead of evaluating ``causal_pairs_in_rects`` on every slot: ~20 elementwise passes over
    ``Rq x Rk`` instead of over ``B x H x Rq x width``."""
    p0, p1 = query_block_bounds(q_len, k_len, block_size_q, device)
    c0 = torch.arange(-(-k_len // block_size_k), device=device, dtype=torch.int64) * block_size_k
    c1 = torch.clamp(c0 + block_size_k, max=k_len)
    return causal_pairs_in_rects(p0[:, None], p1[:, None], c0[None, :], c1[None, :], window).to(torch.int32)


def causal_pairs_in_columns(p0: torch.Tensor, p1: torch.Tensor, columns: torch.Tensor, window: int | None = None) -> torch.Tensor:
    """Pairs contributed by single key columns ``j`` to query positions ``[p0, p1]``: rows
    ``max(p0, j) .. min(p1, j + W - 1)``. Broadcasts; int64 out."""
    p0, p1, columns = (t.to(torch.int64) for t in (p0, p1, columns))
    last = p1 if window is None else torch.minimum(p1, columns + window - 1)
    return torch.clamp(last - torch.maximum(p0, columns) + 1, min=0)


def causal_pairs_total(q_len: int, k_len: int, window: int | None = None) -> int:
    """All causally visible pairs of a ``[Lq, Lk]`` attention (the denominator of density).

    Plain integer arithmetic (no tensor, no ``.item()``), so that routing on it neither syncs a
    device nor breaks a ``torch.compile`` graph: query row at key position ``p`` sees
    ``min(p + 1, window)`` keys.
    """
    first, last = query_offset(q_len, k_len), k_len - 1
    if last < first:
        return 0

    def keys_up_to(n: int) -> int:  # 1 + 2 + ... + n
        return n * (n + 1) // 2

    if window is None or window > last:
        return keys_up_to(last + 1) - keys_up_to(first)
    growing_end = min(last, window - 1)  # rows whose whole prefix fits in the window
    total = keys_up_to(growing_end + 1) - keys_up_to(first) if first <= growing_end else 0
    full_start = max(first, window)
    if full_start <= last:
        total += window * (last - full_start + 1)
    return total


def visible(q_pos: torch.Tensor, k_pos: torch.Tensor, window: int | None) -> torch.Tensor:
    """Boolean visibility of key positions to query positions (broadcasting)."""
    ok = k_pos <= q_pos
    if window is not None:
        ok = ok & (k_pos > q_pos - window)
    return ok


def causal_block_layout(
    q_len: int, k_len: int, block_size_q: int, block_size_k: int, sink_blocks: int, device: torch.device | str,
    local_blocks: int = 0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(valid, forced)`` ``[Rq, Rk]`` bool: blocks holding at least one causal pair, and the blocks
    every row keeps: the first ``sink_blocks``, the diagonal blocks spanned by the row's queries, and
    the blocks holding a key within ``local_blocks x block_size_k`` positions before the row's first
    query (a local band)."""
    p0, p1 = query_block_bounds(q_len, k_len, block_size_q, device)
    n_kv = -(-k_len // block_size_k)
    kv_start = torch.arange(n_kv, device=device) * block_size_k
    kv_last = torch.clamp(kv_start + block_size_k, max=k_len) - 1
    valid = kv_start[None, :] <= p1[:, None]
    diagonal = (kv_last[None, :] >= p0[:, None] - local_blocks * block_size_k) & valid
    sink = (torch.arange(n_kv, device=device) < sink_blocks)[None, :] & valid
    return valid, diagonal | sink
