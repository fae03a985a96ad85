"""Top-k KV page retrieval for decode (Quest / LServe style): per-page key summaries of the cache
(``pages.py``), page scores and top-k selection (``scores.py``), attention over the listed pages
(``attention.py``, split-K on the GPU).

Each public function runs the Triton kernel on CUDA (``triton_*.py``) or its fp32 reference
(``naive.py``) elsewhere. See README.md for the page layout and measured speed.
"""

from __future__ import annotations

from .attention import (
    MAX_GROUP_ROWS,
    check_page_list,
    sparse_decode_attention,
    sparse_decode_attention_naive,
)
from .pages import (
    DEFAULT_PAGE_SIZE,
    MAX_PAGE_SIZE,
    MIN_PAGE_SIZE,
    STATS_MEAN_STD,
    STATS_MINMAX,
    PageSummary,
    check_page_size,
    num_pages_for,
    page_summary,
    page_summary_naive,
    update_page_summary,
)
from .scores import (
    DEFAULT_BUDGET_TOKENS,
    DEFAULT_GROUP_REDUCE,
    DEFAULT_METHOD,
    DEFAULT_RECENT_TOKENS,
    DEFAULT_SINK_TOKENS,
    DEFAULT_SPREAD_WEIGHT,
    METHOD_MEAN_STD,
    METHOD_QUEST,
    REDUCE_MAX,
    REDUCE_SUM,
    STATS_FOR_METHOD,
    PageRecall,
    attention_mass_recall,
    exact_page_mass,
    page_scores,
    page_scores_naive,
    select_pages,
    top_k_pages,
)

__all__ = [
    "DEFAULT_BUDGET_TOKENS",
    "MAX_GROUP_ROWS",
    "DEFAULT_GROUP_REDUCE",
    "DEFAULT_METHOD",
    "DEFAULT_PAGE_SIZE",
    "DEFAULT_RECENT_TOKENS",
    "DEFAULT_SINK_TOKENS",
    "DEFAULT_SPREAD_WEIGHT",
    "MAX_PAGE_SIZE",
    "METHOD_MEAN_STD",
    "METHOD_QUEST",
    "MIN_PAGE_SIZE",
    "PageRecall",
    "PageSummary",
    "REDUCE_MAX",
    "REDUCE_SUM",
    "STATS_FOR_METHOD",
    "STATS_MEAN_STD",
    "STATS_MINMAX",
    "attention_mass_recall",
    "check_page_list",
    "check_page_size",
    "exact_page_mass",
    "num_pages_for",
    "page_scores",
    "page_scores_naive",
    "page_summary",
    "page_summary_naive",
    "select_pages",
    "sparse_decode_attention",
    "sparse_decode_attention_naive",
    "top_k_pages",
    "update_page_summary",
]
