"""``VerticalSlashLines.pairs_lower_bound`` in torch: a lower bound on the causal pairs the per-block index
of some lines lists, with no per-block walk (the reference of ``vertical_slash/triton_lines_bound.py``)."""

from __future__ import annotations

import torch

from .indices import VerticalSlashLines


def lines_pairs_lower_bound(lines: VerticalSlashLines, lines_sorted: bool = False) -> torch.Tensor:
    """``VerticalSlashLines.pairs_lower_bound`` in torch ops (``[B, H]`` int64): the reference of its Triton
    kernel (``triton_lines_bound``), which the GPU runs for ascending lines (about a hundred small ops here,
    one launch there)."""
    full_blocks = lines.q_len // lines.block_size_q
    first_partial_row = lines.k_len - lines.q_len + full_blocks * lines.block_size_q
    partial_rows = lines.k_len - first_partial_row
    offsets = _distinct_lines(lines, lines.slash_offset, lines.slash_count, lines_sorted)
    diagonals = (_band_pairs(lines, offsets, full_blocks)
                 + _lines_pairs(lines, offsets, first_partial_row, partial_rows))
    columns = _lines_pairs(lines, _distinct_lines(lines, lines.vertical_index, lines.vertical_count, lines_sorted),
                           lines.k_len - lines.q_len, 0)
    return torch.maximum(diagonals, columns)

def _distinct_lines(geometry: VerticalSlashLines, lines: torch.Tensor, count: torch.Tensor,
                    lines_sorted: bool) -> torch.Tensor:
    """``[B, H, N]`` int64: the real lines below ``k_len`` ascending, then every other slot (padding, lines
    that meet no query) at one value more than a block's width above any real line (no run reaches it)."""
    real = torch.arange(lines.shape[-1], device=lines.device) < count[..., None]
    no_line = geometry.k_len + geometry.block_size_q + 1
    lines = torch.where(real & (lines < geometry.k_len), lines.long(), no_line)
    return lines if lines_sorted else lines.sort(dim=-1).values

def _lines_pairs(geometry: VerticalSlashLines, lines: torch.Tensor, first_row: int, fill_gap: int) -> torch.Tensor:
    """Pairs between the query rows at positions ``[first_row, k_len)`` and the distinct lines (``[B, H,
    N]`` ascending, ``_distinct_lines``) plus the offsets in their gaps of at most ``fill_gap``: line
    ``e`` meets the rows at positions ``>= e``."""
    rows = geometry.k_len - first_row

    def pairs_below(x: torch.Tensor) -> torch.Tensor:  # pairs of the lines 0 .. x - 1, in closed form
        x = x.clamp(0, geometry.k_len)
        past_first = (x - first_row).clamp_min(0)
        return rows * x.clamp(max=first_row) + past_first * (2 * rows - past_first + 1) // 2

    first = torch.ones_like(lines, dtype=torch.bool)
    first[..., 1:] = lines[..., 1:] != lines[..., :-1]
    own = torch.where(first, pairs_below(lines + 1) - pairs_below(lines), 0).sum(-1)
    if not fill_gap:
        return own
    gap = lines[..., 1:] - lines[..., :-1]
    filled = (gap > 1) & (gap <= fill_gap) & (lines[..., 1:] < geometry.k_len)
    return own + torch.where(filled, pairs_below(lines[..., 1:]) - pairs_below(lines[..., :-1] + 1), 0).sum(-1)

def _band_pairs(geometry: VerticalSlashLines, offsets: torch.Tensor, full_blocks: int) -> torch.Tensor:
    """Causal pairs the first ``full_blocks`` query blocks list for the distinct diagonals ``offsets
    [B, H, N]`` (ascending, ``_distinct_lines``), exactly, in closed form per run. A run (diagonals
    at most the block width ``W`` apart) ``[lo, hi]`` lists keys ``[p0 - hi, p0 + W - 1 - lo]`` for
    block rows ``p0 .. p0 + W - 1``, so row ``p0 + t`` sees offsets ``[max(lo - (W - 1 - t), 0),
    min(hi + t, p0 + t)]``; runs more than ``W`` apart never share an offset in a row. Summed over the
    ``W`` rows that is ``W * (min(hi, p0) - lo + W) - n0 (n0 + 1) / 2`` (``n0 = W - 1 - lo`` rows
    clipped at offset 0, if any) where ``min(hi, p0) > lo - W``, else 0; then over the blocks, two
    arithmetic series (blocks before ``hi``, where ``p0`` grows) and a constant (blocks after)."""
    width, q_offset = geometry.block_size_q, geometry.k_len - geometry.q_len
    if full_blocks == 0:
        return torch.zeros(offsets.shape[:-1], dtype=torch.int64, device=offsets.device)
    gap_after = torch.full_like(offsets, width + 1)
    gap_after[..., :-1] = offsets[..., 1:] - offsets[..., :-1]
    starts = torch.ones_like(offsets, dtype=torch.bool)
    starts[..., 1:] = gap_after[..., :-1] > width
    lo = torch.cummax(torch.where(starts, offsets, -1), dim=-1).values  # the run's first diagonal, per slot
    hi = offsets
    run_end = (gap_after > width) & (hi < geometry.k_len)
    clipped = (width - 1 - lo).clamp(0, width)
    clip_loss = clipped * (clipped + 1) // 2

    def floor_div(a: torch.Tensor, b: int) -> torch.Tensor:
        return torch.div(a, b, rounding_mode="floor")

    # Blocks whose first row lies below hi (p0 = q_offset + r W < hi): r < r_grow; of those, the ones that
    # see the run at all (p0 > lo - W): r >= r_seen.
    r_grow = (-floor_div(q_offset - hi, width)).clamp(0, full_blocks)
    r_seen = torch.minimum((floor_div(lo - width - q_offset, width) + 1).clamp_min(0), r_grow)
    growing = r_grow - r_seen
    growing_sum = width * (growing * (q_offset - lo + width) + width * (r_seen + r_grow - 1) * growing // 2)
    growing_sum = growing_sum - growing * clip_loss
    settled = (full_blocks - r_grow) * (width * (hi - lo + width) - clip_loss)
    return torch.where(run_end, growing_sum + settled, 0).sum(-1)


__all__ = ["lines_pairs_lower_bound"]
