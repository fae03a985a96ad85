"""Pure tensor ops (no transformers import). One folder per op: ``naive.py`` is the fp32 reference
(and the CPU path); ``__init__.py`` is the public function and picks the implementation by device."""

from . import library
from .antidiagonal_score import antidiagonal_block_mass
from .block_sparse_attention import block_sparse_attention
from .dense_attention import dense_attention
from .indices import BlockSparseIndex, VerticalSlashIndex
from .mass_select import keep_by_cumulative_mass, select_blocks
from .pooled_block_score import pooled_block_probs
from .vertical_slash_attention import vertical_slash_attention
from .vertical_slash_estimate import vertical_slash_scores
from .vertical_slash_index import build_vertical_slash_index

__all__ = [
    "BlockSparseIndex",
    "VerticalSlashIndex",
    "antidiagonal_block_mass",
    "block_sparse_attention",
    "build_vertical_slash_index",
    "dense_attention",
    "keep_by_cumulative_mass",
    "library",
    "pooled_block_probs",
    "select_blocks",
    "vertical_slash_attention",
    "vertical_slash_scores",
]
