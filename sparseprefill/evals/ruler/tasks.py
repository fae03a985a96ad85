"""RULER-11 synthetic sample generation, fitted to a tokenizer's token budget.

Task parameters follow RULER's ``scripts/synthetic.yaml``; prompt wording, answer prefixes and
generation budgets follow ``scripts/data/synthetic/constants.py``; sample construction follows
``scripts/data/synthetic/{niah,variable_tracking,common_words_extraction,freq_words_extraction}.py``
(NVIDIA/RULER). Prompts use RULER's ``base`` model template (the task text itself; no chat
wrapping): apply a chat template downstream if wanted, and leave room for its tokens.

Token budget: like RULER, the haystack size (noise lines, essay words, distractor needles,
list words, coded words) is the largest one for which
``len(tokens(input + answer_prefix)) + max_new_tokens <= max_seq_length``. It is found by a
binary search over the haystack size (each probe builds and tokenizes a random sample); each
sample's content is then fixed by its own sub-seed and its size re-fitted around that value
(1% steps to bracket the limit, then bisection), so every sample fills its budget closely.

The token-budget fitting is in :mod:`.fitting`, the per-family sample builders in :mod:`.builders`.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any

from . import haystack as hs
from .builders import _cwe_builder, _fwe_builder, _niah_builder, _vt_builder
from .fitting import _fit, _fit_sample, count_tokens_fn
from .scoring import METRICS, TASK_METRIC, postprocess_pred

__all__ = [
    "RULER_11",
    "TASK_CONFIGS",
    "TOKENS_TO_GENERATE",
    "RulerSample",
    "generate",
    "score",
    "count_tokens_fn",
]

RULER_11 = (
    "niah_single_1",
    "niah_single_2",
    "niah_single_3",
    "niah_multikey_1",
    "niah_multikey_2",
    "niah_multikey_3",
    "niah_multivalue",
    "niah_multiquery",
    "vt",
    "cwe",
    "fwe",
)
"""The 11 RULER synthetic tasks generated here (RULER's 13 minus ``qa_1``/``qa_2``)."""


def _niah(haystack: str, key: str, value: str, k: int = 1, v: int = 1, q: int = 1) -> dict[str, Any]:
    return {
        "family": "niah",
        "type_haystack": haystack,
        "type_needle_k": key,
        "type_needle_v": value,
        "num_needle_k": k,
        "num_needle_v": v,
        "num_needle_q": q,
    }


TASK_CONFIGS: dict[str, dict[str, Any]] = {
    "niah_single_1": _niah("noise", "words", "numbers"),
    "niah_single_2": _niah("essay", "words", "numbers"),
    "niah_single_3": _niah("essay", "words", "uuids"),
    "niah_multikey_1": _niah("essay", "words", "numbers", k=4),
    "niah_multikey_2": _niah("needle", "words", "numbers"),
    "niah_multikey_3": _niah("needle", "uuids", "uuids"),
    "niah_multivalue": _niah("essay", "words", "numbers", v=4),
    "niah_multiquery": _niah("essay", "words", "numbers", q=4),
    "vt": {"family": "variable_tracking", "type_haystack": "noise", "num_chains": 1, "num_hops": 4},
    "cwe": {"family": "common_words_extraction", "freq_cw": 30, "freq_ucw": 3, "num_cw": 10},
    "fwe": {"family": "freq_words_extraction", "alpha": 2.0},
}
"""Per-task arguments (RULER ``synthetic.yaml``)."""

TOKENS_TO_GENERATE = {
    "niah": 128,
    "variable_tracking": 30,
    "common_words_extraction": 120,
    "freq_words_extraction": 50,
}
"""Generation budget per task family (RULER ``constants.py``)."""


@dataclass(frozen=True)
class RulerSample:
    """One generated RULER sample.

    Attributes:
        task: RULER task name (one of :data:`RULER_11`).
        index: position of the sample in its generated list.
        input: the prompt, up to (not including) the answer prefix.
        outputs: the expected answers; the metric looks for each in the prediction.
        length: as in RULER's manifests, ``len(tokens(input + answer_prefix)) + max_new_tokens``
            (tokens counted without special tokens); at most the requested ``max_seq_length``.
        answer_prefix: text to append after ``input`` (RULER feeds the model
            ``input + answer_prefix`` and scores what follows).
        max_new_tokens: the task's generation budget.
        metric: ``"string_match_all"`` for every RULER-11 task.
    """

    task: str
    index: int
    input: str
    outputs: tuple[str, ...]
    length: int
    answer_prefix: str
    max_new_tokens: int
    metric: str

    @property
    def prompt(self) -> str:
        """``input + answer_prefix``: the full text to prefill."""
        return self.input + self.answer_prefix

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict (``outputs`` as a list)."""
        d = asdict(self)
        d["outputs"] = list(self.outputs)
        return d


def generate(task: str, tokenizer: Any, max_seq_length: int, num_samples: int, seed: int = 42,
             haystack_text: str | None = None) -> list[RulerSample]:
    """Generate ``num_samples`` RULER samples of ``task`` filling ``max_seq_length`` tokens.

    Args:
        task: one of :data:`RULER_11`.
        tokenizer: a Hugging Face tokenizer (``encode(text, add_special_tokens=False)`` is used to
            count tokens), or a callable ``text -> token count``.
        max_seq_length: total budget: prompt + answer prefix + the task's ``max_new_tokens``.
        num_samples: how many samples.
        seed: random seed; the same (task, tokenizer, length, count, seed, haystack) gives the same
            samples.
        haystack_text: the essay text for the essay-haystack tasks (``niah_single_2``,
            ``niah_single_3``, ``niah_multikey_1``, ``niah_multivalue``, ``niah_multiquery``);
            ignored by the others. Repeated as needed to fill long contexts.

    Returns:
        The samples, ``index`` 0..num_samples-1.
    """
    if task not in TASK_CONFIGS:
        raise ValueError(f"unknown RULER task {task!r}; expected one of {RULER_11}")
    if num_samples < 0:
        raise ValueError("num_samples must be >= 0")
    cfg = TASK_CONFIGS[task]
    family = cfg["family"]
    max_new = TOKENS_TO_GENERATE[family]
    budget = max_seq_length - max_new
    if budget <= 0:
        raise ValueError(f"max_seq_length {max_seq_length} leaves no room beyond {max_new} generated tokens")
    count = count_tokens_fn(tokenizer)
    rng = random.Random(f"ruler/{task}/{seed}")

    if family == "niah":
        essay = None
        if cfg["type_haystack"] == "essay":
            if haystack_text is None:
                raise ValueError(f"task {task!r} uses the essay haystack: pass haystack_text")
            essay = hs.essay_words(haystack_text)
        build, start, min_units = _niah_builder(cfg, essay)
    elif family == "variable_tracking":
        build, start, min_units = _vt_builder(cfg, count, max_seq_length, rng)
    elif family == "common_words_extraction":
        build, start, min_units = _cwe_builder(cfg, max_seq_length)
    else:
        build, start, min_units = _fwe_builder(cfg, max_seq_length, max_new)

    size = _fit(build, count, budget, start, min_units, rng)
    step = max(1, size // 100)
    samples = []
    for index in range(num_samples):
        text, prefix, answers, used = _fit_sample(build, count, budget, size, step, min_units,
                                                  rng.getrandbits(64))
        samples.append(RulerSample(
            task=task,
            index=index,
            input=text,
            outputs=tuple(answers),
            length=used + max_new,
            answer_prefix=prefix,
            max_new_tokens=max_new,
            metric=TASK_METRIC[task],
        ))
    return samples


def score(task: str, predictions: Sequence[str], samples: Sequence[RulerSample]) -> float:
    """Score model continuations (text generated after ``input + answer_prefix``) for ``task``.

    Predictions are cleaned as RULER's evaluator does (:func:`postprocess_pred`) and scored with
    the task's metric against each sample's ``outputs``; returns 0..100.
    """
    if task not in TASK_METRIC:
        raise ValueError(f"unknown RULER task {task!r}")
    if any(s.task != task for s in samples):
        raise ValueError(f"samples are not all of task {task!r}")
    preds = [postprocess_pred(p) for p in predictions]
    return METRICS[TASK_METRIC[task]](preds, [list(s.outputs) for s in samples])
