"""Vertical-slash (MInference): the last queries vote for key columns and diagonals.

Sink columns and local diagonals are always kept; the rest are taken in order of estimated mass
until ``vertical_mass`` / ``slash_mass`` of it is covered (FlexPrefill's gamma rule, which keeps the
budget meaningful across lengths, unlike MInference's fixed counts).
"""

from __future__ import annotations

import torch

from ..config import PatternName, RangeLayout, VerticalSlashConfig
from ..kernels import vertical_slash_scores
from ..kernels.geometry import spread_window_ends
from ..kernels.indices import VerticalSlashLines
from ..kernels.vertical_slash import (
    range_piece_keys,
    range_pieces_pay,
    select_line_kinds,
    vertical_slash_block_recall,
    vertical_slash_lines,
)
from .base import LinePattern


def heldout_window_ends(q_len: int, window_rows: int, windows: int) -> list[int]:
    """End rows (exclusive) of query windows the estimate's ``windows`` windows do not score: those of
    twice as many evenly spread windows that are not among the scored ones (the midpoints between
    the scored ends, and the point before the first)."""
    scored = set(spread_window_ends(q_len, window_rows, windows))
    return [end for end in spread_window_ends(q_len, window_rows, 2 * windows) if end not in scored]


class VerticalSlashPattern(LinePattern):
    name = PatternName.VERTICAL_SLASH

    def __init__(self, config: VerticalSlashConfig):
        super().__init__(config)

    def uses_fused_kernel(self) -> bool:
        return self.config.fused

    @property
    def query_windows(self) -> int:
        return self.config.query_windows

    def column_layout(self) -> str:
        return self.config.column_layout.value

    def range_piece_keys(self, q) -> int | None:
        layout = self.config.range_layout
        if q.device.type != "cuda" or layout == RangeLayout.WHOLE:
            return None  # the CPU reference attends key lists: cutting ranges would only cost there
        if layout == RangeLayout.AUTO and not range_pieces_pay(q.shape[-1]):
            return None
        return range_piece_keys(q.shape[-1], self.config.block_size, q.element_size())

    def unpredictable_heads(self, q, k, index, *, scale, softcap, kv_head_index) -> torch.Tensor | None:
        """``[B, H]`` bool: heads whose ``index`` keeps less than ``heldout_recall`` of the exact mass on
        the held-out query blocks (mean over a block's rows, worst block); None when the check is off or
        the prompt has no room for a held-out window."""
        cfg = self.config
        if cfg.heldout_recall is None:
            return None
        ends = heldout_window_ends(q.shape[2], cfg.last_queries, cfg.query_windows)
        blocks = sorted({(end - 1) // index.block_size_q for end in ends})
        if not blocks:
            return None
        recall = vertical_slash_block_recall(q, k, index, blocks, scale=scale, softcap=softcap,
                                             kv_head_index=kv_head_index)
        return recall.amin(dim=-1) < cfg.heldout_recall

    def line_scores(self, q, k, *, scale, softcap, kv_head_index) -> tuple[torch.Tensor, torch.Tensor]:
        """``(vertical [B, H, Lk], slash [B, H, Lk])``: the mean line scores of the query windows, each
        summing to 1 (a window's lines past the keys it sees score 0)."""
        cfg = self.config
        return vertical_slash_scores(q, k, scale=scale, last_queries=cfg.last_queries, softcap=softcap,
                                     kv_head_index=kv_head_index, query_windows=cfg.query_windows)

    def selection_inputs(self, q, k, *, scale, softcap, kv_head_index) -> tuple[torch.Tensor, torch.Tensor, list, list]:
        """What the estimate's one batched line selection takes (``select_line_kinds``): ``scores [2, B,
        H, Lk]`` (columns, then diagonals), ``forced [2, 1, 1, Lk]`` (sink columns, local diagonals), and
        the two kinds' masses and caps."""
        cfg = self.config
        vertical, slash = self.line_scores(q, k, scale=scale, softcap=softcap, kv_head_index=kv_head_index)
        lines = torch.arange(k.shape[2], device=q.device)
        forced = torch.stack([lines < cfg.sink_tokens, lines < cfg.local_tokens])[:, None, None]
        return (torch.stack([vertical, slash]), forced, [cfg.vertical_mass, cfg.slash_mass],
                [cfg.max_vertical, cfg.max_slash])

    def estimate_lines(self, q, k, *, scale, softcap, kv_head_index) -> VerticalSlashLines:
        cfg = self.config
        q_len, k_len = q.shape[2], k.shape[2]
        # Columns and diagonals in one batched selection (the estimate is bound by host time per torch
        # op, not by the device). On the GPU the line lists stay full width and the fused kernel reads
        # them as they are, so the estimate never waits for the device (a wait idles the GPU while the
        # host catches up). The CPU reference expands lines to an O(blocks x lines) index: there they
        # are cut to size.
        scores, forced, masses, caps = self.selection_inputs(q, k, scale=scale, softcap=softcap,
                                                             kv_head_index=kv_head_index)
        count, index = select_line_kinds(scores, forced, masses, caps, trim=False)
        vertical_index, slash_offset = index[0], index[1]
        if q.device.type != "cuda":  # each kind to its own width (a host read costs nothing on the CPU)
            vertical_index = vertical_index[..., :max(int(count[0].max()), 1)]
            slash_offset = slash_offset[..., :max(int(count[1].max()), 1)]
        return vertical_slash_lines(
            vertical_index, count[0], slash_offset, count[1], q_len=q_len, k_len=k_len, block_size_q=cfg.block_size,
        )
