"""Sparse patterns: each estimates an index from q/k and runs a kernel on it. No transformers import."""

from __future__ import annotations

from ..config import PatternName, SparseConfig
from .a_shape import AShapePattern, window_index
from .antidiagonal import AntidiagonalPattern
from .auto import AutoPattern
from .base import LinePattern, PatternOutput, SparseIndex, SparsePattern, inspectable_index
from .block_sparse import BlockSparsePattern
from .dense import DensePattern
from .vertical_slash import VerticalSlashPattern
from .window import WINDOW_BLOCK_SIZE, window_attention

__all__ = [
    "AShapePattern",
    "AntidiagonalPattern",
    "AutoPattern",
    "BlockSparsePattern",
    "DensePattern",
    "LinePattern",
    "PatternOutput",
    "SparseIndex",
    "SparsePattern",
    "VerticalSlashPattern",
    "build_pattern",
    "inspectable_index",
    "WINDOW_BLOCK_SIZE",
    "window_attention",
    "window_index",
]


def build_pattern(name: PatternName | str, config: SparseConfig) -> SparsePattern:
    """The pattern object for ``name`` with its budgets taken from ``config``."""
    name = PatternName(name)
    if name is PatternName.AUTO:
        return AutoPattern(config.vertical_slash)
    if name is PatternName.ANTIDIAGONAL:
        return AntidiagonalPattern(config.antidiagonal)
    if name is PatternName.VERTICAL_SLASH:
        return VerticalSlashPattern(config.vertical_slash)
    if name is PatternName.BLOCK_SPARSE:
        return BlockSparsePattern(config.block_sparse)
    if name is PatternName.A_SHAPE:
        return AShapePattern(config.a_shape)
    return DensePattern()
