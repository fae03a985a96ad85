"""RULER's scoring: ``string_match_all`` / ``string_match_part`` and the per-task metric.

Both metrics are case-insensitive substring matches averaged over samples and scaled to 0..100,
rounded to two decimals (RULER ``scripts/eval/synthetic/constants.py``):

* ``string_match_all``: per sample, the fraction of its references found in the prediction.
* ``string_match_part``: per sample, 1 if any of its references is found in the prediction.

Every RULER-11 task (NIAH, variable tracking, CWE, FWE) uses ``string_match_all``;
``string_match_part`` is RULER's metric for the QA tasks.
"""

from __future__ import annotations

import re
from collections.abc import Sequence

__all__ = [
    "string_match_all",
    "string_match_part",
    "postprocess_pred",
    "METRICS",
    "TASK_METRIC",
]


def _check(preds: Sequence[str], refs: Sequence[Sequence[str]]) -> None:
    if len(preds) != len(refs):
        raise ValueError(f"{len(preds)} predictions for {len(refs)} reference lists")
    if not preds:
        raise ValueError("no predictions to score")


def string_match_all(preds: Sequence[str], refs: Sequence[Sequence[str]]) -> float:
    """Mean over samples of the fraction of references contained in the prediction, x100."""
    _check(preds, refs)
    total = 0.0
    for pred, ref in zip(preds, refs):
        low = pred.lower()
        total += sum(1.0 for r in ref if r.lower() in low) / len(ref)
    return round(total / len(preds) * 100, 2)


def string_match_part(preds: Sequence[str], refs: Sequence[Sequence[str]]) -> float:
    """Mean over samples of "at least one reference is contained in the prediction", x100."""
    _check(preds, refs)
    total = 0.0
    for pred, ref in zip(preds, refs):
        low = pred.lower()
        total += max(1.0 if r.lower() in low else 0.0 for r in ref)
    return round(total / len(preds) * 100, 2)


_CONTROL = re.compile(r"[\x00-\x1f]")


def postprocess_pred(text: str) -> str:
    """RULER's prediction clean-up before scoring: strip, control characters to newlines, strip."""
    return _CONTROL.sub("\n", text.strip()).strip()


METRICS = {"string_match_all": string_match_all, "string_match_part": string_match_part}

# RULER's TASKS table maps the generator family to its metric.
_FAMILY_METRIC = {
    "niah": "string_match_all",
    "variable_tracking": "string_match_all",
    "common_words_extraction": "string_match_all",
    "freq_words_extraction": "string_match_all",
    "qa": "string_match_part",
}

_TASK_FAMILY = {
    **{
        name: "niah"
        for name in (
            "niah_single_1", "niah_single_2", "niah_single_3",
            "niah_multikey_1", "niah_multikey_2", "niah_multikey_3",
            "niah_multivalue", "niah_multiquery",
        )
    },
    "vt": "variable_tracking",
    "cwe": "common_words_extraction",
    "fwe": "freq_words_extraction",
    "qa_1": "qa",
    "qa_2": "qa",
}

TASK_METRIC = {task: _FAMILY_METRIC[family] for task, family in _TASK_FAMILY.items()}
"""Metric name per RULER task name (qa_1/qa_2 listed for completeness; not generated here)."""
