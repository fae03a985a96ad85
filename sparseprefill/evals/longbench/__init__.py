"""LongBench (v1): task table, data loading, prompt building and scoring, as in THUDM's release.

The point of this module is that a dense-vs-sparse comparison on LongBench gives numbers that can
be set beside published LongBench tables. So every choice that moves a score is taken from THUDM's
own files (``LongBench/config/dataset2prompt.json``, ``LongBench/config/dataset2maxlen.json``,
``LongBench/pred.py``, ``LongBench/eval.py``, ``LongBench/metrics.py``) rather than re-invented:
the prompt templates (including the official ``asconcisely`` typo of the narrativeqa prompt), the
generation lengths, the middle truncation of over-long prompts, which tasks skip the chat template,
the first-line trimming of predictions, the per-task metric and the rounding of the task score.

It is pure Python on purpose: no ``jieba``, ``rouge`` or ``fuzzywuzzy`` dependency. Where LongBench
calls those packages the behaviour is re-implemented here; the known differences are:

* Chinese word segmentation (``qa_f1_zh_score``, ``rouge_zh_score``): LongBench uses ``jieba``.
  When ``jieba`` is importable it is used, so scores match exactly; otherwise a deterministic
  character-level segmenter is used (each CJK character a token, runs of ASCII letters/digits one
  token). Character-level F1 / ROUGE-L are usually *higher* than jieba word-level ones (partial
  word overlap earns credit), so Chinese scores are comparable between two runs on the same
  machine, not to published tables. ``chinese_segmenter()`` says which one is in force.
* ROUGE-L (``rouge_score``): the ``rouge`` package's ``rouge-l`` ``f`` is reproduced step by step
  (sentences split on ``"."``, words split on ``" "``, set-based "exclusive" union LCS, the same
  LCS back-tracking tie-break, the same ``1e-8`` in the F denominator). The package back-tracks
  recursively, so a sentence pair whose back-tracking path passes Python's recursion limit (about
  1000 words together: in practice long Chinese summaries, which contain no ``"."``) raises
  ``RecursionError``, which LongBench's bare ``except`` turns into a score of 0.0; here the path is
  followed iteratively and the true value is returned.
* ``fuzz.ratio`` (``code_sim_score``): fuzzywuzzy uses python-Levenshtein's ratio when that
  package is installed and ``difflib.SequenceMatcher`` otherwise. LongBench's
  ``requirements.txt`` lists ``fuzzywuzzy`` without python-Levenshtein, so the default here is the
  difflib ratio (exactly what that environment computes); ``backend="levenshtein"`` gives
  python-Levenshtein's ratio ``2 * LCS / (len_a + len_b)`` (indel distance, substitution cost 2).
* ``all_classes``: LongBench's ``eval.py`` scores a whole task with the ``all_classes`` of the
  last line of the file; here each sample's own list is used. The lists are identical within every
  LongBench task, so the scores are the same.

The package is split as LongBench's own files are: ``tasks`` (the task table), ``data`` (reading the
``.jsonl`` files), ``prompts`` (templates, middle truncation, chat template) and ``metrics``
(normalization, segmentation, metrics and the task score); every name is re-exported here.

Tokenizers are passed in; nothing here imports transformers or torch.
"""

from __future__ import annotations

from .data import LongBenchDataError, LongBenchSample, load_task
from .metrics import (
    _JIEBA_STATE as _JIEBA_STATE,
    CODE_SIM_BACKENDS as CODE_SIM_BACKENDS,
    METRICS,
    SCORE_DECIMALS as SCORE_DECIMALS,
    chinese_segmenter,
    classification_score,
    code_sim_score,
    count_score,
    f1_score,
    fuzz_ratio,
    normalize_answer,
    normalize_zh_answer,
    qa_f1_score,
    qa_f1_zh_score,
    retrieval_score,
    retrieval_zh_score,
    rouge_l_f,
    rouge_score,
    rouge_zh_score,
    score_sample,
    score_task,
    trim_prediction,
)
from .prompts import (
    MIN_PROMPT_TOKENS as MIN_PROMPT_TOKENS,
    apply_chat_template,
    build_prompt,
    format_prompt,
    truncate_middle,
    uses_chat_template,
)
from .tasks import (
    FIRST_LINE_TASKS,
    LANGUAGE_CODE as LANGUAGE_CODE,
    LANGUAGE_EN as LANGUAGE_EN,
    LANGUAGE_ZH as LANGUAGE_ZH,
    METRIC_CLASSIFICATION as METRIC_CLASSIFICATION,
    METRIC_CODE_SIM as METRIC_CODE_SIM,
    METRIC_COUNT as METRIC_COUNT,
    METRIC_QA_F1 as METRIC_QA_F1,
    METRIC_QA_F1_ZH as METRIC_QA_F1_ZH,
    METRIC_RETRIEVAL as METRIC_RETRIEVAL,
    METRIC_RETRIEVAL_ZH as METRIC_RETRIEVAL_ZH,
    METRIC_ROUGE as METRIC_ROUGE,
    METRIC_ROUGE_ZH as METRIC_ROUGE_ZH,
    NO_CHAT_TEMPLATE_TASKS as NO_CHAT_TEMPLATE_TASKS,
    TASK_NAMES,
    TASKS,
    LongBenchTask,
    get_task,
)

# Names re-exported with ``X as X`` are not in ``__all__`` (they were not before the split either).
__all__ = [
    "LongBenchTask",
    "LongBenchSample",
    "LongBenchDataError",
    "TASKS",
    "TASK_NAMES",
    "FIRST_LINE_TASKS",
    "METRICS",
    "get_task",
    "load_task",
    "format_prompt",
    "truncate_middle",
    "build_prompt",
    "uses_chat_template",
    "apply_chat_template",
    "chinese_segmenter",
    "normalize_answer",
    "normalize_zh_answer",
    "f1_score",
    "qa_f1_score",
    "qa_f1_zh_score",
    "rouge_l_f",
    "rouge_score",
    "rouge_zh_score",
    "classification_score",
    "retrieval_score",
    "retrieval_zh_score",
    "count_score",
    "fuzz_ratio",
    "code_sim_score",
    "trim_prediction",
    "score_sample",
    "score_task",
]
