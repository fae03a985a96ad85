"""Triton ``VerticalSlashLines.pairs_lower_bound``: one program per (batch row, head), one launch.

The torch version (``indices.VerticalSlashLines.pairs_lower_bound``, the reference) is about a hundred
small ops over the full-width line lists; on the GPU each op costs host time whatever its size, and the
routed estimate runs it on every sparse layer. Here each program walks its head's real diagonals and
columns once, in ``TILE``-slot steps: a diagonal reads its neighbours' offsets (the run structure at the
block width and the gaps to fill on the last block), the first diagonal of its run comes from a running
maximum over run starts (carried across tiles), and each run's closed-form band sum, each line's own
pairs and each filled gap's pairs are added in int64. The real lines must ascend (``select_lines``
output, ``lines_sorted``); repeats count once.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

BOUND_TILE = 1024  # line slots per vectorised step of a head's program


@triton.jit
def _pairs_below(x, first_row, k_len):
    """Causal pairs between the lines (offsets or columns) ``0 .. x - 1`` and the query rows at positions
    ``[first_row, k_len)``: line ``e`` meets the rows at positions ``>= e``."""
    x = tl.minimum(tl.maximum(x, 0), k_len)
    rows = k_len - first_row
    past_first = tl.maximum(x - first_row, 0)
    return rows * tl.minimum(x, first_row) + past_first * (2 * rows - past_first + 1) // 2


@triton.jit
def _max_combine(a, b):
    return tl.maximum(a, b)


@triton.jit
def _line_slots(Lines, count, i, k_len, absent):
    """Offsets (int64) of the line slots ``i`` of one head: real lines below ``k_len`` as they are, every
    other slot (before the first, past the count, at or past ``k_len``) at ``absent``."""
    real = (i >= 0) & (i < count)
    lines = tl.load(Lines + i, mask=real, other=0).to(tl.int64)
    return tl.where(real & (lines < k_len), lines, absent)


# Integer arguments equal to 1 would otherwise become constants (Triton specialises them), which have no .to().
@triton.jit(do_not_specialize=["k_len", "q_len", "block", "full_blocks", "narrowest"])
def _lines_bound_kernel(
    Slashes, SlashCount, Verticals, VerticalCount, Out, stride_slash_row, stride_vertical_row,
    k_len, q_len, block, full_blocks, narrowest, TILE: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    k_len = k_len.to(tl.int64)
    q_offset = k_len - q_len
    first_partial_row = q_offset + full_blocks.to(tl.int64) * block
    absent_above = k_len + block + 1  # more than a block's width past any real line: no run reaches it
    absent_below = -block - 2  # the same before the first line: every first line starts a run
    lanes = tl.arange(0, TILE).to(tl.int64)

    slashes = Slashes + row * stride_slash_row
    n_slashes = tl.load(SlashCount + row).to(tl.int64)
    band = tl.zeros([], dtype=tl.int64)
    partial = tl.zeros([], dtype=tl.int64)
    run_first = tl.full([], -1, dtype=tl.int64)  # the first diagonal of the run the last tile ended in
    for i0 in range(0, n_slashes, TILE):
        i = i0 + lanes
        d = _line_slots(slashes, n_slashes, i, k_len, absent_above)
        before = _line_slots(slashes, n_slashes, i - 1, k_len, absent_below)
        after = _line_slots(slashes, n_slashes, i + 1, k_len, absent_above)
        here = d < k_len
        # The last block (narrower than a block, or none): own pairs of each distinct diagonal, and the
        # offsets in gaps up to its width.
        first = here & (d != before)
        own = _pairs_below(d + 1, first_partial_row, k_len) - _pairs_below(d, first_partial_row, k_len)
        partial += tl.sum(tl.where(first, own, 0), 0)
        gap = after - d
        filled = here & (gap > 1) & (gap <= narrowest) & (after < k_len)
        gap_pairs = _pairs_below(after, first_partial_row, k_len) - _pairs_below(d + 1, first_partial_row, k_len)
        partial += tl.sum(tl.where(filled, gap_pairs, 0), 0)
        # Full blocks: runs of diagonals at most a block apart, each run's band in closed form at its last.
        starts = here & (d - before > block)
        lo = tl.maximum(tl.associative_scan(tl.where(starts, d, -1), 0, _max_combine), run_first)
        run_first = tl.maximum(run_first, tl.max(tl.where(starts, d, -1), 0))
        run_end = here & (after - d > block)
        clipped = tl.minimum(tl.maximum(block - 1 - lo, 0), block)
        clip_loss = clipped * (clipped + 1) // 2
        # Blocks whose first row lies below the run's last diagonal: r < r_grow; those that see it: r >= r_seen.
        r_grow = tl.minimum(tl.maximum(-_floor_div(q_offset - d, block), 0), full_blocks)
        r_seen = tl.minimum(tl.maximum(_floor_div(lo - block - q_offset, block) + 1, 0), r_grow)
        growing = r_grow - r_seen
        growing_sum = block * (growing * (q_offset - lo + block) + block * (r_seen + r_grow - 1) * growing // 2)
        growing_sum -= growing * clip_loss
        settled = (full_blocks - r_grow) * (block * (d - lo + block) - clip_loss)
        band += tl.sum(tl.where(run_end, growing_sum + settled, 0), 0)

    verticals = Verticals + row * stride_vertical_row
    n_verticals = tl.load(VerticalCount + row).to(tl.int64)
    columns = tl.zeros([], dtype=tl.int64)
    for i0 in range(0, n_verticals, TILE):
        i = i0 + lanes
        c = _line_slots(verticals, n_verticals, i, k_len, absent_above)
        before = _line_slots(verticals, n_verticals, i - 1, k_len, absent_below)
        own = _pairs_below(c + 1, q_offset, k_len) - _pairs_below(c, q_offset, k_len)
        columns += tl.sum(tl.where((c < k_len) & (c != before), own, 0), 0)
    tl.store(Out + row, tl.maximum(band + partial, columns))


@triton.jit
def _floor_div(a, b):
    """``floor(a / b)`` for int64 ``a`` of either sign and ``b > 0`` (Triton's ``//`` truncates)."""
    q = a // b
    return tl.where((a % b != 0) & (a < 0), q - 1, q)


def lines_pairs_lower_bound_triton(slash_offset: torch.Tensor, slash_count: torch.Tensor,
                                   vertical_index: torch.Tensor, vertical_count: torch.Tensor, *,
                                   q_len: int, k_len: int, block_size_q: int) -> torch.Tensor:
    """``pairs_lower_bound`` of ascending lines: ``slash_offset [B, H, Ns]``, ``vertical_index [B, H, Nv]`` and
    their ``[B, H]`` counts -> ``[B, H]`` int64."""
    b, h = slash_count.shape
    out = torch.empty(b, h, dtype=torch.int64, device=slash_offset.device)
    if b * h == 0:
        return out
    slashes = slash_offset.reshape(b * h, -1)
    verticals = vertical_index.reshape(b * h, -1)
    if slashes.stride(-1) != 1:
        slashes = slashes.contiguous()
    if verticals.stride(-1) != 1:
        verticals = verticals.contiguous()
    full_blocks = q_len // block_size_q
    narrowest = q_len - full_blocks * block_size_q  # the last block's rows (0: every block is full)
    _lines_bound_kernel[(b * h,)](
        slashes, slash_count.reshape(-1).contiguous(), verticals, vertical_count.reshape(-1).contiguous(), out,
        slashes.stride(0), verticals.stride(0), k_len, q_len, block_size_q, full_blocks, narrowest,
        TILE=BOUND_TILE,
    )
    return out


__all__ = ["BOUND_TILE", "lines_pairs_lower_bound_triton"]
