"""Triton vertical-slash attention straight from per-head lines (``VerticalSlashLines``): no
per-block index table and no host read of any size between the estimate and the attention.

The index builder (``triton_index.py``) writes every query block's merged ranges and its columns
outside the ranges: O(blocks x lines) memory, sized by a host read of the largest counts. Here each
program derives its block's ranges and columns itself from O(lines) per-head tables that a few
sync-free torch ops prepare (``plan_lines``):

Ranges. Diagonal ``d`` covers keys ``[p0 - d, p1 - d]`` of block ``[p0, p1]`` (width ``w``), so two
neighbouring sorted diagonals merge iff their gap is at most ``w`` (as in ``triton_index.py``). That
grouping does not depend on the block, only on ``w``, so the runs of diagonals are found once per
head (two groupings: the full block width and the last, shorter block's). A block then sees, in
ascending diagonal order: runs wholly below ``p0`` (each one range ``[p0 - last, p1 - first + 1)``),
then at most one more range: from the first run reaching ``p0`` on, every visible band is clipped at
key 0 and they merge into ``[max(p0 - d_v, 0), p1 - first + 1)``, ``d_v`` the largest visible
diagonal (``d <= p1``). The count of runs below ``p0`` per block is one ``searchsorted``.

Columns. A block reads its head's columns up to ``p1``, or, when its first run of diagonals starts
at 0 (the forced local diagonals), only those below that run's band (a per-block count, one
``searchsorted``), and masks the ones still inside a band with a per-head prefix count of kept
diagonals (two loads per column), so ranges and columns stay disjoint without compacting a per-block
list. A masked column still occupies its tile slot: that is the price of O(lines) memory
(``experiments/fused_lines_work.py`` counts it on real q/k).

The program also counts the causal pairs its block computed (``block_pairs``), as the builder does.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ..geometry import query_block_bounds
from ..indices import VerticalSlashLines
from ..triton_common import (
    attend_key_range,
    empty_softmax_state,
    load_rows,
    log2_scores,
    mask_scores,
    online_softmax_step,
    query_tile,
    store_rows,
)
from .triton_attention import vertical_slash_launch
from .triton_head_ranges import keys_below_pairs

_UNUSED_SLOT = torch.iinfo(torch.int32).max  # sorts padding after every real line; never a position
FULL_WIDTH_GROUPING, LAST_BLOCK_GROUPING = 0, 1


def _runs(slashes: torch.Tensor, counts: torch.Tensor, width: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Runs of sorted diagonals whose bands (``width`` rows) overlap or touch: ``(first [B, H, N],
    last [B, H, N], count [B, H])``, runs ascending, padding ``_UNUSED_SLOT``."""
    n = slashes.shape[-1]
    valid = torch.arange(n, device=slashes.device) < counts[..., None]
    breaks = (slashes[..., 1:].long() - slashes[..., :-1].long()) > width
    starts = valid.clone()
    starts[..., 1:] &= breaks
    ends = valid.clone()
    ends[..., :-1] &= breaks | ~valid[..., 1:]
    run_id = torch.cumsum(starts, -1, dtype=torch.int32) - 1
    # Slot n collects the padding lanes' writes and is cut off.
    first = torch.full((*slashes.shape[:-1], n + 1), _UNUSED_SLOT, dtype=torch.int32, device=slashes.device)
    last = first.clone()
    first.scatter_(-1, torch.where(starts, run_id, n).long(), slashes)
    last.scatter_(-1, torch.where(ends, run_id, n).long(), slashes)
    return first[..., :n].contiguous(), last[..., :n].contiguous(), starts.sum(-1, dtype=torch.int32)


def _padded_sorted(lines: torch.Tensor, counts: torch.Tensor, is_sorted: bool) -> torch.Tensor:
    slot_is_real = torch.arange(lines.shape[-1], device=lines.device) < counts[..., None]
    padded = torch.where(slot_is_real, lines.to(torch.int32), _UNUSED_SLOT)
    return (padded if is_sorted else padded.sort(dim=-1).values).contiguous()


def plan_lines(lines: VerticalSlashLines, lines_sorted: bool) -> dict[str, torch.Tensor]:
    """The per-head tables the kernel reads, by torch ops that never wait for the device: sorted,
    padded lines, a prefix count of diagonals, the two run groupings and per-block counts."""
    b, h = lines.vertical_count.shape
    device = lines.vertical_index.device
    q_len, k_len, block = lines.q_len, lines.k_len, lines.block_size_q
    verticals = _padded_sorted(lines.vertical_index, lines.vertical_count, lines_sorted)
    if not lines_sorted:
        # Unsorted input may repeat a column; the kernel reads each listed slot once, so repeats go
        # here (sorted lists, as select_lines makes them, are unique by the lines contract). Checking
        # each slot against its neighbour inside the column loop cost 10-20% of the kernel at 128K.
        repeats = torch.zeros_like(verticals, dtype=torch.bool)
        repeats[..., 1:] = verticals[..., 1:] == verticals[..., :-1]
        verticals = torch.where(repeats, _UNUSED_SLOT, verticals).sort(dim=-1).values.contiguous()
    slashes = _padded_sorted(lines.slash_offset, lines.slash_count, lines_sorted)
    thresholds = torch.arange(k_len + 2, dtype=torch.int32, device=device).expand(b, h, k_len + 2).contiguous()
    prefix = torch.searchsorted(slashes, thresholds, out_int32=True)  # prefix[t] = kept diagonals < t
    p0, p1 = (x.to(torch.int32).expand(b, h, -1).contiguous() for x in query_block_bounds(q_len, k_len, block, device))
    last_width = q_len - (p0.shape[-1] - 1) * block
    full = _runs(slashes, lines.slash_count, block)
    last = full if last_width == block else _runs(slashes, lines.slash_count, last_width)
    run_first, run_last, run_count = (torch.stack(pair).contiguous() for pair in zip(full, last))
    # Runs wholly below p0 (their last diagonal < p0); the last block counts in its own grouping.
    plain_runs = torch.searchsorted(full[1], p0, out_int32=True)
    plain_runs[..., -1:] = torch.searchsorted(last[1], p0[..., -1:].contiguous(), out_int32=True)
    # Columns a block reads: those below its last position and below the band of its run starting at
    # diagonal 0 (the forced local diagonals), which covers every key from p0 - last to p1. Columns
    # there would only be masked: on Qwen at 8K they were most of the masked ones.
    limit = p1.long() + 1
    limits = []
    for (first, last_d, _), rows in ((full, slice(None)), (last, slice(-1, None))):
        local_band_start = p0[..., rows].long() - last_d[..., :1].long()
        limits.append(torch.where(first[..., :1] == 0, torch.minimum(local_band_start, limit[..., rows]),
                                  limit[..., rows]))
    limits[0][..., -1:] = limits[1]
    visible_columns = torch.searchsorted(verticals, limits[0].clamp_min(0).to(torch.int32).contiguous(),
                                         out_int32=True)
    return dict(verticals=verticals, slashes=slashes, prefix=prefix, run_first=run_first, run_last=run_last,
                run_count=run_count, plain_runs=plain_runs.contiguous(), visible_columns=visible_columns)


@triton.jit
def _lines_fwd_kernel(
    Q, K, V, Out, Verticals, VisibleColumns, Slashes, Prefix, RunFirst, RunLast, RunCount, PlainRuns, BlockPairs,
    KvHeadIndex,
    stride_qb, stride_qh, stride_qm, stride_qd,
    stride_kb, stride_kh, stride_kn, stride_kd,
    stride_vb, stride_vh, stride_vn, stride_vd,
    stride_ob, stride_oh, stride_om, stride_od,
    num_heads, n_blocks, q_len, k_len, q_offset, n_vertical_slots, n_slash_slots, n_heads_total,
    score_scale, softcap, window,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr, RANGE_N: tl.constexpr,
    COLUMN_N: tl.constexpr, BLOCK_Q: tl.constexpr, HAS_WINDOW: tl.constexpr, HAS_SOFTCAP: tl.constexpr,
    UPCAST: tl.constexpr, WIDE_N: tl.constexpr = 0, RESCALE_SLACK: tl.constexpr = 0.0,
):
    b, h, r, offs_m, m_ok, offs_d, d_ok, q, q_pos, first_q_pos, last_q_pos, k_base, v_base = query_tile(
        Q, K, V, KvHeadIndex, stride_qb, stride_qh, stride_qm, stride_qd, stride_kb, stride_kh, stride_vb, stride_vh,
        num_heads, q_len, q_offset, HEAD_DIM, BLOCK_D, BLOCK_M, BLOCK_Q, UPCAST)
    m_i, l_i, acc = empty_softmax_state(BLOCK_M, BLOCK_D)
    bh = b * num_heads + h  # int64 (query_tile widens b and h)
    block_row = bh * n_blocks + r
    # The index block's key positions (a block of BLOCK_Q rows may span several BLOCK_M programs).
    # int32 positions: ``r`` is int64 (query_tile widens it for table offsets), and int64 range bounds
    # would make every key offset, address and mask of the range and column loops 64-bit. On the H100
    # that made this kernel 1.6x (ranges only) to 2.7x (columns only) slower than the index kernel on
    # the same keys at 128K. Pair counts, which can pass 2^31, use the widened copies.
    p0 = (r * BLOCK_Q + q_offset).to(tl.int32)
    p1 = (tl.minimum(r * BLOCK_Q + BLOCK_Q, q_len) - 1 + q_offset).to(tl.int32)
    p0_wide = p0.to(tl.int64)
    p1_wide = p1.to(tl.int64)
    grouping = (r == n_blocks - 1).to(tl.int64)  # LAST_BLOCK_GROUPING for the last block
    runs = (grouping * n_heads_total + bh) * n_slash_slots
    prefix = Prefix + bh * (k_len + 2)
    pairs = tl.zeros([], dtype=tl.int64)

    # --- runs wholly below p0: one unclipped range each
    n_plain = tl.load(PlainRuns + block_row)
    for j in range(0, n_plain):
        d_first = tl.load(RunFirst + runs + j)
        d_last = tl.load(RunLast + runs + j)
        start = p0 - d_last
        end = p1 - d_first + 1
        m_i, l_i, acc = attend_key_range(q, k_base, v_base, start, end, offs_d, d_ok, stride_kn, stride_kd, stride_vn,
                                         stride_vd, q_pos, first_q_pos, last_q_pos, m_i, l_i, acc, score_scale,
                                         softcap, window, RANGE_N, WIDE_N, HAS_WINDOW, HAS_SOFTCAP, UPCAST,
                                         RESCALE_SLACK)
        pairs += keys_below_pairs(end, p0_wide, p1_wide) - keys_below_pairs(start, p0_wide, p1_wide)

    # --- then the visible bands clipped at key 0 (or cut by visibility), merged into one range
    has_more = n_plain < tl.load(RunCount + grouping * n_heads_total + bh)
    d_first = tl.load(RunFirst + runs + n_plain, mask=has_more, other=0)
    n_visible = tl.load(prefix + p1 + 1)  # diagonals <= p1
    d_top = tl.load(Slashes + bh * n_slash_slots + n_visible - 1, mask=n_visible > 0, other=0)
    start = tl.maximum(p0 - d_top, 0)
    end = tl.where(has_more & (d_first <= p1), p1 - d_first + 1, start)
    m_i, l_i, acc = attend_key_range(q, k_base, v_base, start, end, offs_d, d_ok, stride_kn, stride_kd, stride_vn,
                                     stride_vd, q_pos, first_q_pos, last_q_pos, m_i, l_i, acc, score_scale,
                                     softcap, window, RANGE_N, WIDE_N, HAS_WINDOW, HAS_SOFTCAP, UPCAST,
                                     RESCALE_SLACK)
    pairs += keys_below_pairs(end, p0_wide, p1_wide) - keys_below_pairs(start, p0_wide, p1_wide)

    # --- the head's columns up to p1 that no band covers
    n_candidates = tl.load(VisibleColumns + block_row)
    column_base = Verticals + bh * n_vertical_slots
    # Rows each kept column adds, per tile lane, reduced once after the loop: a reduction per tile
    # sat on the loop's critical path (5-10% of the kernel at 128K).
    column_rows = tl.zeros([COLUMN_N], dtype=tl.int32)
    for c0 in range(0, n_candidates, COLUMN_N):
        slots = c0 + tl.arange(0, COLUMN_N)
        slot_ok = slots < n_candidates
        cols = tl.load(column_base + slots, mask=slot_ok, other=0)
        # Diagonals covering column c for this block lie in [max(p0 - c, 0), p1 - c] (c <= p1 here).
        low = tl.maximum(p0 - cols, 0)
        high = p1 - cols
        in_band = tl.load(prefix + high + 1, mask=slot_ok, other=0) - tl.load(prefix + low, mask=slot_ok, other=0)
        keep = slot_ok & (in_band == 0) & (cols < k_len)
        # K/V rows load under the slot mask, not ``keep``: a masked column's row is read for nothing,
        # but the loads no longer wait on the two prefix gathers.
        k = load_rows(k_base, cols, slot_ok, stride_kn, offs_d, d_ok, stride_kd, UPCAST)
        v = load_rows(v_base, cols, slot_ok, stride_vn, offs_d, d_ok, stride_vd, UPCAST)
        s = mask_scores(log2_scores(q, k, score_scale, softcap, HAS_SOFTCAP), cols, keep, q_pos, window, HAS_WINDOW)
        m_i, l_i, acc = online_softmax_step(s, v, m_i, l_i, acc, UPCAST, RESCALE_SLACK)
        column_rows += tl.where(keep, p1 - tl.maximum(p0, cols) + 1, 0)
    pairs += tl.sum(column_rows.to(tl.int64), 0)

    store_rows(Out + b * stride_ob + h * stride_oh, offs_m, m_ok, stride_om, offs_d, d_ok, stride_od, acc, l_i)
    first_program_of_block = (tl.program_id(0) % (BLOCK_Q // BLOCK_M)) == 0
    tl.store(BlockPairs + block_row, pairs, mask=first_program_of_block)


def vertical_slash_lines_attention_triton(
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
    lines_sorted: bool = False,
    wide_key_tile: int | None = None,
    rescale_slack: float | None = None,
) -> torch.Tensor:
    """GPU ``vertical_slash_lines_attention``: ``q [B, Hq, Lq, D]``, ``k, v [B, Hkv, Lk, D]``, per-head
    ``lines`` -> ``out [B, Hq, Lq, D]`` (written in place) and ``lines.block_pairs``. ``lines_sorted``:
    the caller guarantees each line list ascends (``select_lines`` output), which spares two sorts.
    ``wide_key_tile``, ``rescale_slack``: as for ``vertical_slash_attention_triton``."""
    b, hq, q_len, _ = q.shape
    k_len = k.shape[2]
    plan = plan_lines(lines, lines_sorted)
    block_m, scalars, options = vertical_slash_launch(q, lines.block_size_q, scale, window, softcap,
                                                      wide_key_tile, rescale_slack)
    n_blocks = lines.block_pairs.shape[-1]
    grid = (n_blocks * (lines.block_size_q // block_m), b * hq)
    _lines_fwd_kernel[grid](
        q, k, v, out, plan["verticals"], plan["visible_columns"], plan["slashes"], plan["prefix"],
        plan["run_first"], plan["run_last"], plan["run_count"], plan["plain_runs"], lines.block_pairs,
        kv_head_index.to(torch.int32),
        *q.stride(), *k.stride(), *v.stride(), *out.stride(),
        hq, n_blocks, q_len, k_len, k_len - q_len, plan["verticals"].shape[-1], plan["slashes"].shape[-1], b * hq,
        *scalars, **options,
    )
    return out


__all__ = ["plan_lines", "vertical_slash_lines_attention_triton"]
