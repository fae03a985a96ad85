"""Offline re-implementation of the RULER synthetic long-context tasks (NVIDIA/RULER).

Generates the 11 synthetic tasks (:data:`RULER_11`: eight needle-in-a-haystack variants,
variable tracking, common-words and frequent-words extraction) fitted to a tokenizer's token
budget, and scores predictions with RULER's ``string_match_all`` / ``string_match_part``.

Word-based tasks read the word lists of the ``wonderwords`` package at runtime. Essay-haystack
tasks take the essay text from the caller (``haystack_text``); nothing third-party is bundled.
"""

from .haystack import NOISE
from .scoring import TASK_METRIC, postprocess_pred, string_match_all, string_match_part
from .tasks import (
    RULER_11,
    TASK_CONFIGS,
    TOKENS_TO_GENERATE,
    RulerSample,
    count_tokens_fn,
    generate,
    score,
)

__all__ = [
    "NOISE",
    "RULER_11",
    "TASK_CONFIGS",
    "TASK_METRIC",
    "TOKENS_TO_GENERATE",
    "RulerSample",
    "count_tokens_fn",
    "generate",
    "postprocess_pred",
    "score",
    "string_match_all",
    "string_match_part",
]
