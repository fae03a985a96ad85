"""Pure tensor ops (no transformers import), one folder per method:

    vertical_slash/  line estimate, line selection, index conversion, attention over ranges + columns
    block_sparse/    antidiagonal and pooled block scores, block selection, attention over KV blocks
    decode/          page summaries, page scores / top-k, attention over listed pages
    dense/           exact attention (the fallback and the accuracy reference)
    mass_select/     the cumulative-mass rule both prefill methods select with

In each folder ``naive.py`` holds the fp32 references (and the CPU path), ``triton_*.py`` the GPU
kernels, and ``__init__.py`` the public functions, which pick the implementation by device. Shared
pieces: ``indices.py`` (the index layouts), ``geometry.py`` (positions, pair counts), ``common.py``
(checks, GQA head maps), ``triton_common.py`` (Triton building blocks and tile policy),
``recall.py`` (exact attention-mass recall of a selection), ``library.py`` (``torch.library`` ops).
"""

from . import library
from .block_sparse import (
    antidiagonal_block_mass,
    block_sparse_attention,
    pooled_block_probs,
    select_blocks,
)
from .dense import dense_attention, fast_dense_attention
from .indices import BlockSparseIndex, VerticalSlashIndex
from .mass_select import KEEP_ALL_MASS, keep_by_cumulative_mass
from .vertical_slash import (
    build_vertical_slash_index,
    select_lines,
    vertical_slash_attention,
    vertical_slash_scores,
)

__all__ = [
    "KEEP_ALL_MASS",
    "BlockSparseIndex",
    "VerticalSlashIndex",
    "antidiagonal_block_mass",
    "block_sparse_attention",
    "build_vertical_slash_index",
    "dense_attention",
    "fast_dense_attention",
    "keep_by_cumulative_mass",
    "library",
    "pooled_block_probs",
    "select_blocks",
    "select_lines",
    "vertical_slash_attention",
    "vertical_slash_scores",
]
