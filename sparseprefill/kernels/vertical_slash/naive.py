"""fp32 references of the vertical-slash kernels (also their CPU implementation): the last-queries
line estimate, line selection, the index conversion, the attention over ranges and columns, and the
recall of an index on whole query blocks.
"""

from __future__ import annotations

from dataclasses import replace

import torch

from ..common import attend_gathered, compact, qk_scores
from ..geometry import query_block_bounds, query_offset, spread_window_ends
from ..indices import BlockSparseIndex, VerticalSlashIndex, VerticalSlashLines
from ..mass_select import keep_by_cumulative_mass
from ..recall import window_recall

# MInference's last-queries estimate: softmax of the last ``n`` queries against every key, summed
# down columns (verticals) and along diagonals (slashes).

def vertical_slash_scores_naive(
    q: torch.Tensor,
    k: torch.Tensor,
    *,
    scale: float,
    last_queries: int,
    softcap: float | None,
    kv_head_index: torch.Tensor,
    query_windows: int = 1,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Reference of ``vertical_slash_scores``: ``q [B, Hq, Lq, D]``, ``k [B, Hkv, Lk, D]`` ->
    ``(vertical [B, Hq, Lk], slash [B, Hq, Lk])`` fp32 mean probabilities of the scoring rows: the
    mean over ``spread_window_ends`` windows of each window's own scores (its rows see a key prefix)."""
    q_len, k_len = q.shape[2], k.shape[2]
    ends = spread_window_ends(q_len, last_queries, query_windows)
    if len(ends) == 1:
        return _last_rows_scores(q, k, scale=scale, last_queries=last_queries, softcap=softcap,
                                 kv_head_index=kv_head_index)
    offset = k_len - q_len
    vertical = torch.zeros(q.shape[0], q.shape[1], k_len, dtype=torch.float32, device=q.device)
    slash = torch.zeros_like(vertical)
    for end in ends:
        # The window's rows see keys [0, offset + end): its scores on that prefix (causal as a chunk).
        seen = offset + end
        v, s = _last_rows_scores(q[:, :, max(0, end - last_queries):end], k[:, :, :seen], scale=scale,
                                 last_queries=last_queries, softcap=softcap, kv_head_index=kv_head_index)
        vertical[..., :seen] += v
        slash[..., :seen] += s
    return vertical / len(ends), slash / len(ends)


def _last_rows_scores(q, k, *, scale, last_queries, softcap, kv_head_index):
    """The line scores of the last ``last_queries`` rows of ``q`` (one window)."""
    q_len, k_len = q.shape[2], k.shape[2]
    n = min(last_queries, q_len)
    scores = qk_scores(q[:, :, q_len - n :], k, kv_head_index, scale)
    if softcap is not None:
        scores = softcap * torch.tanh(scores / softcap)
    q_pos = torch.arange(q_len - n, q_len, device=q.device) + query_offset(q_len, k_len)
    k_pos = torch.arange(k_len, device=q.device)
    causal = k_pos[None, :] <= q_pos[:, None]
    probs = torch.softmax(scores.masked_fill(~causal, float("-inf")), dim=-1)
    vertical = probs.sum(dim=-2) / n
    # Diagonal d holds pairs (p, p - d); masked entries are exact zeros, so clamping their d is harmless.
    diag = (q_pos[:, None] - k_pos[None, :]).clamp_(0, k_len - 1)
    slash = torch.zeros_like(probs).scatter_add_(-1, diag.expand_as(probs), probs).sum(dim=-2) / n
    return vertical, slash


# Vertical/slash lines -> per-query-block ranges and columns (``VerticalSlashIndex``).
# 
# For query block ``r`` with key positions ``[p0, p1]``, diagonal ``d`` touches keys
# ``[p0 - d, p1 - d]``: a band one block wide. Bands are sorted by start and merged where they
# overlap or touch (running max of ends, as in interval merging), so the kernel walks few long ranges
# instead of many short ones. Vertical columns already inside a range are dropped, which keeps ranges
# and columns disjoint (the kernel would count a duplicated key twice).

_FAR = torch.iinfo(torch.int64).max // 4  # sorts invalid bands last; never a real position


def build_vertical_slash_index_naive(
    vertical_index: torch.Tensor,
    vertical_count: torch.Tensor,
    slash_offset: torch.Tensor,
    slash_count: torch.Tensor,
    *,
    q_len: int,
    k_len: int,
    block_size_q: int,
) -> VerticalSlashIndex:
    """Reference of ``build_vertical_slash_index``: per-head lines (``vertical_index [B, H, Nv]``,
    ``slash_offset [B, H, Ns]`` and their ``[B, H]`` counts) -> ``VerticalSlashIndex`` with
    ``[B, H, ceil(q_len / block_size_q), ...]`` merged ranges and columns."""
    device = vertical_index.device
    p0, p1 = query_block_bounds(q_len, k_len, block_size_q, device)
    p0, p1 = p0[:, None], p1[:, None]  # [Rq, 1]

    # --- ranges from slashes: [B, H, Rq, Ns]
    offsets = slash_offset.long()[:, :, None, :]
    slot_ok = (torch.arange(slash_offset.shape[-1], device=device) < slash_count[..., None].long())[:, :, None, :]
    start = (p0 - offsets).clamp_min(0)
    end = p1 - offsets + 1
    band_ok = slot_ok & (end > 0)
    start = torch.where(band_ok, start, _FAR)
    end = torch.where(band_ok, end, _FAR)
    start, order = torch.sort(start, dim=-1)
    end = torch.gather(end, -1, order)
    band_ok = torch.gather(band_ok.expand_as(start), -1, order)
    reach = torch.cummax(end, dim=-1).values
    reach_before = torch.cat([torch.full_like(reach[..., :1], -1), reach[..., :-1]], dim=-1)
    opens = band_ok & (start > reach_before)
    group = torch.cumsum(opens.to(torch.int64), -1) - 1
    group = torch.where(band_ok, group, start.shape[-1] - 1).clamp_min(0)
    merged_start = torch.full_like(start, _FAR).scatter_reduce(-1, group, start, reduce="amin")
    merged_end = torch.full_like(end, -1).scatter_reduce(-1, group, torch.where(band_ok, end, -1), reduce="amax")
    range_count = opens.sum(-1)
    width = max(int(range_count.max()) if range_count.numel() else 0, 1)
    slots = torch.arange(width, device=device)
    real = slots < range_count[..., None]
    range_start = torch.where(real, merged_start[..., :width], 0)
    range_end = torch.where(real, merged_end[..., :width], 0)

    # --- columns not covered by a range and visible to the block's last row
    cols = vertical_index.long()[:, :, None, :].expand(*range_count.shape, vertical_index.shape[-1])
    col_ok = (torch.arange(vertical_index.shape[-1], device=device) < vertical_count[..., None].long())[:, :, None, :]
    # Drop repeats of the previous (sorted) column: a key listed twice would be counted twice.
    repeat = torch.zeros_like(vertical_index, dtype=torch.bool)
    repeat[..., 1:] = vertical_index[..., 1:] == vertical_index[..., :-1]
    col_ok = col_ok & ~repeat[:, :, None, :] & (cols >= 0) & (cols <= p1)
    searchable = torch.where(real, range_start, _FAR).contiguous()
    which = (torch.searchsorted(searchable, cols.contiguous(), right=True) - 1).clamp_min(0)
    covered = (torch.gather(range_start, -1, which) <= cols) & (cols < torch.gather(range_end, -1, which))
    covered = covered & torch.gather(real, -1, which)
    keep = col_ok & ~covered
    # Columns are sorted ascending per head by the caller; compact preserves order.
    column_count, picked = compact(keep)
    column_index = torch.gather(cols, -1, picked.clamp_min(0).long())
    column_index = torch.where(picked >= 0, column_index, 0)

    return VerticalSlashIndex(
        range_count=range_count.to(torch.int32),
        range_start=range_start.to(torch.int32),
        range_end=range_end.to(torch.int32),
        column_count=column_count,
        column_index=column_index.to(torch.int32),
        block_size_q=block_size_q,
        q_len=q_len,
        k_len=k_len,
    )


def split_ranges_naive(index: VerticalSlashIndex, max_keys: int) -> VerticalSlashIndex:
    """Reference of the builder's range split: each range ``[s, e)`` of ``index`` becomes the pieces
    ``[s + i * max_keys, min(s + (i + 1) * max_keys, e))`` in order, so every range spans at most
    ``max_keys`` keys (the same keys, still sorted and disjoint); columns are unchanged."""
    if max_keys < 1:
        raise ValueError(f"max_keys must be >= 1, got {max_keys}")
    lengths = torch.where(index.range_valid(), (index.range_end - index.range_start).clamp_min(0), 0).long()
    pieces = (lengths + max_keys - 1) // max_keys  # [B, H, Rq, M]
    piece_count = pieces.sum(-1)
    width = max(int(piece_count.max()) if piece_count.numel() else 0, 1)
    slot = torch.arange(width, device=lengths.device)
    # Piece slot t of a row belongs to the range whose cumulative piece count first passes t.
    ends = pieces.cumsum(-1)
    owner = torch.searchsorted(ends.contiguous(), slot.expand(*ends.shape[:-1], width).contiguous(), right=True)
    owner = owner.clamp_max(pieces.shape[-1] - 1)
    first_piece = torch.gather(ends - pieces, -1, owner)
    start = torch.gather(index.range_start.long(), -1, owner) + (slot - first_piece) * max_keys
    end = torch.minimum(start + max_keys, torch.gather(index.range_end.long(), -1, owner))
    real = slot < piece_count[..., None]
    return replace(index, range_count=piece_count.to(torch.int32),
                   range_start=torch.where(real, start, 0).to(torch.int32),
                   range_end=torch.where(real, end, 0).to(torch.int32), max_range_keys=max_keys)


# fp32 reference for vertical-slash attention; also the CPU implementation.
# 
# Per query block, expands the index's key ranges and columns into one list of key positions per
# head and attends over exactly those keys (the GPU kernel walks the ranges in tiles and gathers the
# columns; the set of keys is the same).

def _expand_ranges(start: torch.Tensor, end: torch.Tensor, valid: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``[B, H, M]`` ranges -> ``[B, H, K]`` key positions (padded) and their validity."""
    lengths = torch.where(valid, (end - start).clamp_min(0), 0).long()
    cum = lengths.cumsum(-1)
    total = cum[..., -1] if cum.shape[-1] else torch.zeros(lengths.shape[:-1], dtype=torch.long, device=start.device)
    width = int(total.max()) if total.numel() else 0
    slot = torch.arange(width, device=start.device).expand(*lengths.shape[:-1], width).contiguous()
    which = torch.searchsorted(cum.contiguous(), slot, right=True).clamp_max(max(lengths.shape[-1] - 1, 0))
    before = torch.gather(cum - lengths, -1, which)
    positions = torch.gather(start.long(), -1, which) + (slot - before)
    return positions, slot < total[..., None]


def vertical_slash_attention_naive(
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
) -> torch.Tensor:
    """Reference of ``vertical_slash_attention``: ``q [B, Hq, Lq, D]``, ``k, v [B, Hkv, Lk, D]``, ``index``
    ``[B, Hq, ceil(Lq / block_size_q), ...]`` -> ``out [B, Hq, Lq, D]`` (exact softmax over the listed keys)."""
    q_len, k_len = q.shape[2], k.shape[2]
    offset = query_offset(q_len, k_len)
    index = index.with_block_lists()
    bq = index.block_size_q
    range_valid = index.range_valid()
    column_valid = index.column_valid()
    for r in range(index.range_count.shape[2]):
        row0, row1 = r * bq, min((r + 1) * bq, q_len)
        m = max(int(index.range_count[:, :, r].max()), 1)
        range_pos, range_ok = _expand_ranges(
            index.range_start[:, :, r, :m], index.range_end[:, :, r, :m], range_valid[:, :, r, :m]
        )
        c = max(int(index.column_count[:, :, r].max()), 1)
        col_pos = index.column_index[:, :, r, :c].long()
        col_ok = column_valid[:, :, r, :c]
        positions = torch.cat([range_pos, col_pos], dim=-1)
        valid = torch.cat([range_ok, col_ok], dim=-1) & (positions < k_len) & (positions >= 0)
        q_positions = torch.arange(row0, row1, device=q.device) + offset
        block_out = attend_gathered(
            q[:, :, row0:row1], k, v, positions, valid, q_positions, kv_head_index, scale, window, softcap
        )
        out[:, :, row0:row1] = block_out.to(out.dtype)
    return out


def vertical_slash_lines_attention_naive(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    lines: VerticalSlashLines,
    *,
    scale: float,
    window: int | None,
    softcap: float | None,
    kv_head_index: torch.Tensor,
    out: torch.Tensor,
) -> torch.Tensor:
    """Reference of ``vertical_slash_lines_attention``: the per-block index of the same lines
    (``build_vertical_slash_index_naive``), attended exactly; fills ``lines.block_pairs``."""
    index = build_vertical_slash_index_naive(
        lines.vertical_index, lines.vertical_count, lines.slash_offset, lines.slash_count,
        q_len=lines.q_len, k_len=lines.k_len, block_size_q=lines.block_size_q,
    )
    vertical_slash_attention_naive(q, k, v, index, scale=scale, window=window, softcap=softcap,
                                   kv_head_index=kv_head_index, out=out)
    lines.block_pairs.copy_(index.block_pair_counts())
    return out


def select_lines_naive(
    scores: torch.Tensor, forced: torch.Tensor, mass: float, max_count: int | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Reference of ``select_lines``: the keep mask of ``keep_by_cumulative_mass`` (every line valid),
    compacted."""
    valid = torch.ones_like(scores, dtype=torch.bool)
    return compact(keep_by_cumulative_mass(scores, valid, forced.expand_as(valid), mass, max_count=max_count))


def block_recall_naive(
    q: torch.Tensor,
    k: torch.Tensor,
    index: VerticalSlashIndex | BlockSparseIndex,
    blocks: torch.Tensor,
    *,
    scale: float,
    softcap: float | None,
    kv_head_index: torch.Tensor,
    per_row: bool = False,
) -> torch.Tensor:
    """Reference of ``triton_recall.block_recall_triton`` (and of the block-sparse index's check,
    ``block_sparse/triton_recall.py``): ``[B, H, nb]`` mean over each query block's rows of the exact
    attention mass its listed keys hold (``window_recall`` on the block's rows); with ``per_row`` each
    row's recall, ``[B, H, nb, block_size_q]``, NaN on rows past the prompt."""
    q_len, rows = q.shape[2], index.block_size_q
    if isinstance(index, VerticalSlashIndex):
        index = index.with_block_lists()
    per_block = []
    for block in blocks.tolist():
        r0 = block * rows
        r1 = min(r0 + rows, q_len)
        (recall,) = window_recall([index], q, k, r0, r1, scale=scale, softcap=softcap, kv_head_index=kv_head_index)
        per_block.append(torch.nn.functional.pad(recall, (0, rows - (r1 - r0)), value=float("nan")) if per_row
                         else recall.mean(-1))
    if not per_block:
        return torch.empty(q.shape[0], q.shape[1], 0, *((rows,) if per_row else ()), dtype=torch.float32,
                           device=q.device)
    return torch.stack(per_block, dim=2)
