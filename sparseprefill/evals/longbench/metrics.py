"""LongBench's scoring (``metrics.py`` and ``eval.py``) in pure Python: answer normalization,
Chinese segmentation, the per-task metrics, prediction trimming and the task score. How the
re-implementations of ``jieba``, ``rouge`` and ``fuzzywuzzy`` differ from those packages is in
the docstring of :mod:`sparseprefill.evals.longbench`.
"""

from __future__ import annotations

import difflib
import re
import string
from collections import Counter
from typing import Any, Callable, Iterable, Sequence

from .data import LongBenchSample
from .tasks import (
    METRIC_CLASSIFICATION,
    METRIC_CODE_SIM,
    METRIC_COUNT,
    METRIC_QA_F1,
    METRIC_QA_F1_ZH,
    METRIC_RETRIEVAL,
    METRIC_RETRIEVAL_ZH,
    METRIC_ROUGE,
    METRIC_ROUGE_ZH,
    LongBenchTask,
    get_task,
)

__all__ = [
    "METRICS",
    "chinese_segmenter",
    "classification_score",
    "code_sim_score",
    "count_score",
    "f1_score",
    "fuzz_ratio",
    "normalize_answer",
    "normalize_zh_answer",
    "qa_f1_score",
    "qa_f1_zh_score",
    "retrieval_score",
    "retrieval_zh_score",
    "rouge_l_f",
    "rouge_score",
    "rouge_zh_score",
    "score_sample",
    "score_task",
    "trim_prediction",
]


# --------------------------------------------------------------------------------------------
# Text normalization and Chinese segmentation
# --------------------------------------------------------------------------------------------

_ENGLISH_PUNCTUATION = frozenset(string.punctuation)
# metrics.py's normalize_zh_answer list of Chinese punctuation (plus ASCII punctuation).
_CHINESE_PUNCTUATION = (
    "！？｡。＂＃＄％＆＇（）＊＋，－／：；＜＝＞＠［＼］＾＿｀｛｜｝～｟｠｢｣､、〃》「」『』【】〔〕〖〗〘〙〚〛〜〝〞〟"
    "〰〾〿–—‘’‛“”„‟…‧﹏."
)
_ALL_PUNCTUATION = frozenset(string.punctuation + _CHINESE_PUNCTUATION)
_ARTICLES = re.compile(r"\b(a|an|the)\b")


def normalize_answer(text: str) -> str:
    """English answer normalization (SQuAD style, as metrics.py): lower-case, drop ASCII
    punctuation, replace the articles a/an/the by a space, collapse whitespace."""
    text = text.lower()
    text = "".join(ch for ch in text if ch not in _ENGLISH_PUNCTUATION)
    text = _ARTICLES.sub(" ", text)
    return " ".join(text.split())


def normalize_zh_answer(text: str) -> str:
    """Chinese answer normalization (as metrics.py): lower-case, drop ASCII and Chinese
    punctuation, and remove all whitespace (Chinese has no spaces between words)."""
    text = text.lower()
    text = "".join(ch for ch in text if ch not in _ALL_PUNCTUATION)
    return "".join(text.split())


# One token per CJK character / other symbol, one per run of ASCII letters and digits, one per
# whitespace character: close to what jieba yields for non-Chinese runs.
_CHAR_TOKEN = re.compile(r"[A-Za-z0-9]+|\s|.", re.DOTALL)


def _segment_characters(text: str) -> list[str]:
    return _CHAR_TOKEN.findall(text)


_JIEBA_STATE: dict[str, Any] = {}


def _jieba() -> Any:
    if "module" not in _JIEBA_STATE:
        try:
            import jieba  # type: ignore[import-not-found]
        except ImportError:
            jieba = None
        _JIEBA_STATE["module"] = jieba
    return _JIEBA_STATE["module"]


def chinese_segmenter() -> str:
    """``"jieba"`` when jieba is importable (LongBench's exact segmentation), else
    ``"character"`` (see the package docstring); record it next to Chinese-task scores."""
    return "character" if _jieba() is None else "jieba"


def _segment_chinese(text: str) -> list[str]:
    jieba = _jieba()
    if jieba is None:
        return _segment_characters(text)
    return list(jieba.cut(text, cut_all=False))


# --------------------------------------------------------------------------------------------
# Metrics (each takes a prediction and one ground truth, returns a float in [0, 1])
# --------------------------------------------------------------------------------------------


def f1_score(prediction_tokens: Sequence[str], ground_truth_tokens: Sequence[str]) -> float:
    """Bag-of-tokens F1 (multiset overlap), 0.0 when nothing is shared."""
    common = Counter(prediction_tokens) & Counter(ground_truth_tokens)
    num_same = sum(common.values())
    if num_same == 0:
        return 0.0
    precision = num_same / len(prediction_tokens)
    recall = num_same / len(ground_truth_tokens)
    return (2 * precision * recall) / (precision + recall)


def qa_f1_score(prediction: str, ground_truth: str, **_: Any) -> float:
    """Token F1 between the normalized prediction and answer (English QA tasks)."""
    return f1_score(normalize_answer(prediction).split(), normalize_answer(ground_truth).split())


def qa_f1_zh_score(prediction: str, ground_truth: str, **_: Any) -> float:
    """Token F1 over segmented, normalized Chinese text (jieba words, or characters without
    jieba; see the package docstring). Tokens that normalize to nothing are dropped."""
    def tokens(text: str) -> list[str]:
        normalized = (normalize_zh_answer(token) for token in _segment_chinese(text))
        return [token for token in normalized if token]

    return f1_score(tokens(prediction), tokens(ground_truth))


# The `rouge` package adds this to the F denominator to avoid a division by zero.
_ROUGE_EPSILON = 1e-8


def _sentences(text: str) -> list[str]:
    # rouge.Rouge.get_scores: split on ".", drop empty pieces, collapse whitespace.
    return [" ".join(piece.split()) for piece in text.split(".") if len(piece) > 0]


def _lcs_words(reference: list[str], evaluated: list[str]) -> set[str]:
    """The words of one LCS of ``reference`` and ``evaluated``, chosen with the ``rouge``
    package's back-tracking tie-break (prefer dropping a reference word only when that keeps a
    strictly longer LCS), walked iteratively instead of recursively."""
    rows, cols = len(reference), len(evaluated)
    table = [[0] * (cols + 1) for _ in range(rows + 1)]
    for i in range(1, rows + 1):
        row, previous, word = table[i], table[i - 1], reference[i - 1]
        for j in range(1, cols + 1):
            if word == evaluated[j - 1]:
                row[j] = previous[j - 1] + 1
            else:
                row[j] = previous[j] if previous[j] > row[j - 1] else row[j - 1]
    words = set()
    i, j = rows, cols
    while i > 0 and j > 0:
        if reference[i - 1] == evaluated[j - 1]:
            words.add(reference[i - 1])
            i, j = i - 1, j - 1
        elif table[i - 1][j] > table[i][j - 1]:
            i -= 1
        else:
            j -= 1
    return words


def rouge_l_f(prediction: str, ground_truth: str) -> float:
    """ROUGE-L F of the ``rouge`` package (``Rouge().get_scores(...)["rouge-l"]["f"]``).

    Summary-level ROUGE-L in that package's default "exclusive" mode: texts are split into
    sentences on ``"."`` and into words on ``" "``; for each reference sentence the LCS word sets
    against every predicted sentence are united into one running set, and the matched count is the
    size of that set; ``m`` and ``n`` are the numbers of *distinct* words of the reference and the
    prediction; ``F = 2PR / (P + R + 1e-8)`` with ``P = count/n``, ``R = count/m``.

    Raises:
        ValueError: when either text has no sentence (empty, or only dots), as the package does.
    """
    hyp_sentences, ref_sentences = _sentences(prediction), _sentences(ground_truth)
    if not hyp_sentences or not ref_sentences:
        raise ValueError("ROUGE needs at least one sentence in both texts")
    split = [sentence.split(" ") for sentence in hyp_sentences]
    reference_words = [sentence.split(" ") for sentence in ref_sentences]
    m = len({word for words in reference_words for word in words})
    n = len({word for words in split for word in words})
    union: set[str] = set()
    for ref_words in reference_words:
        for hyp_words in split:
            union |= _lcs_words(ref_words, hyp_words)
    matched = len(union)
    recall, precision = matched / m, matched / n
    return 2.0 * ((precision * recall) / (precision + recall + _ROUGE_EPSILON))


def rouge_score(prediction: str, ground_truth: str, **_: Any) -> float:
    """ROUGE-L F (English summaries); 0.0 where the ``rouge`` package would raise, as
    LongBench's ``try/except`` does."""
    try:
        return rouge_l_f(prediction, ground_truth)
    except ValueError:
        return 0.0


def rouge_zh_score(prediction: str, ground_truth: str, **_: Any) -> float:
    """ROUGE-L F over segmented Chinese (tokens joined by spaces, then :func:`rouge_score`)."""
    return rouge_score(
        " ".join(_segment_chinese(prediction)), " ".join(_segment_chinese(ground_truth))
    )


def classification_score(
    prediction: str, ground_truth: str, *, all_classes: Iterable[str] | None = None, **_: Any
) -> float:
    """metrics.py's classification score (trec, lsht).

    Every class name occurring in the prediction is a match; matches that are substrings of the
    ground truth (but not equal to it) are then dropped, so "Human" does not compete with the
    right answer "Human being". The score is ``1/len(matches)`` if the ground truth is among the
    matches, else 0. The dropping loop removes items from the list it iterates over, which in
    Python skips the item after each removed one; that is reproduced deliberately, since it is
    what LongBench computes.
    """
    if all_classes is None:
        raise ValueError("classification_score needs all_classes (the task's class names)")
    matches = [name for name in all_classes if name in prediction]
    for term in matches:  # mutates while iterating, exactly as LongBench's metrics.py
        if term in ground_truth and term != ground_truth:
            matches.remove(term)
    if ground_truth in matches:
        return 1.0 / len(matches)
    return 0.0


def _numbers_score(prediction: str, expected: str) -> float:
    # Fraction of the numbers in the prediction equal to the expected one: answering with
    # several numbers earns partial credit at most.
    numbers = re.findall(r"\d+", prediction)
    if not numbers:
        return 0.0
    return sum(number == expected for number in numbers) / len(numbers)


def _paragraph_id(ground_truth: str, pattern: str) -> str:
    found = re.findall(pattern, ground_truth)
    if not found:
        raise ValueError(f"ground truth {ground_truth!r} has no paragraph id matching {pattern!r}")
    return found[0]


def retrieval_score(prediction: str, ground_truth: str, **_: Any) -> float:
    """passage_retrieval_en: the id in ground truth ``"Paragraph N"`` against every number in
    the prediction (see :func:`count_score`)."""
    return _numbers_score(prediction, _paragraph_id(ground_truth, r"Paragraph (\d+)"))


def retrieval_zh_score(prediction: str, ground_truth: str, **_: Any) -> float:
    """passage_retrieval_zh: as :func:`retrieval_score` with ground truth ``"段落N"``."""
    return _numbers_score(prediction, _paragraph_id(ground_truth, r"段落(\d+)"))


def count_score(prediction: str, ground_truth: str, **_: Any) -> float:
    """passage_count: the share of the numbers in the prediction that equal the answer."""
    return _numbers_score(prediction, str(ground_truth))


CODE_SIM_BACKENDS = ("difflib", "levenshtein")


def _lcs_length(a: str, b: str) -> int:
    previous = [0] * (len(b) + 1)
    for char in a:
        current = [0]
        for j, other in enumerate(b, start=1):
            current.append(previous[j - 1] + 1 if char == other else max(previous[j], current[-1]))
        previous = current
    return previous[-1]


def fuzz_ratio(a: str, b: str, backend: str = "difflib") -> int:
    """fuzzywuzzy's ``fuzz.ratio``: an integer 0-100.

    Equal strings give 100 (even both empty), one empty string gives 0; otherwise
    ``int(round(100 * ratio))`` with Python's round-half-to-even. ``backend="difflib"`` is
    ``difflib.SequenceMatcher(None, a, b).ratio()`` (fuzzywuzzy without python-Levenshtein, as
    LongBench's requirements install it); ``"levenshtein"`` is python-Levenshtein's ratio,
    ``(len_a + len_b - indel_distance) / (len_a + len_b) = 2 * LCS / (len_a + len_b)``.
    """
    if backend not in CODE_SIM_BACKENDS:
        raise ValueError(f"backend must be one of {CODE_SIM_BACKENDS}, got {backend!r}")
    if a == b:
        return 100
    if not a or not b:
        return 0
    if backend == "difflib":
        ratio = difflib.SequenceMatcher(None, a, b).ratio()
    else:
        ratio = 2 * _lcs_length(a, b) / (len(a) + len(b))
    return int(round(100 * ratio))


def code_sim_score(
    prediction: str, ground_truth: str, *, backend: str = "difflib", **_: Any
) -> float:
    """lcc / repobench-p: ``fuzz.ratio / 100`` between the first prediction line that is not a
    comment or a markdown fence (no ``` ` ```, ``#`` or ``//`` in it) and the reference line.
    A prediction with no such line compares as the empty string."""
    candidate = ""
    for line in prediction.lstrip("\n").split("\n"):
        if "`" not in line and "#" not in line and "//" not in line:
            candidate = line
            break
    return fuzz_ratio(candidate, ground_truth, backend) / 100


METRICS: dict[str, Callable[..., float]] = {
    METRIC_QA_F1: qa_f1_score,
    METRIC_QA_F1_ZH: qa_f1_zh_score,
    METRIC_ROUGE: rouge_score,
    METRIC_ROUGE_ZH: rouge_zh_score,
    METRIC_CLASSIFICATION: classification_score,
    METRIC_RETRIEVAL: retrieval_score,
    METRIC_RETRIEVAL_ZH: retrieval_zh_score,
    METRIC_COUNT: count_score,
    METRIC_CODE_SIM: code_sim_score,
}

# eval.py rounds the task score (a percentage) to this many decimals.
SCORE_DECIMALS = 2


def trim_prediction(task: str | LongBenchTask, prediction: str) -> str:
    """The part of a prediction eval.py scores: the first line (after leading newlines) on the
    few-shot tasks, the whole text elsewhere."""
    if get_task(task).first_line_only:
        return prediction.lstrip("\n").split("\n")[0]
    return prediction


def score_sample(task: str | LongBenchTask, prediction: str, sample: LongBenchSample) -> float:
    """One sample's score in [0, 1]: the best metric value over the sample's answers."""
    spec = get_task(task)
    metric = METRICS[spec.metric]
    text = trim_prediction(spec, prediction)
    best = 0.0
    for answer in sample.answers:
        best = max(best, metric(text, answer, all_classes=sample.all_classes))
    return best


def score_task(
    task: str | LongBenchTask, predictions: Sequence[str], samples: Sequence[LongBenchSample]
) -> float:
    """The LongBench task score: ``round(100 * mean(sample scores), 2)``, as eval.py reports."""
    if len(predictions) != len(samples):
        raise ValueError(f"{len(predictions)} predictions for {len(samples)} samples")
    if not samples:
        raise ValueError("cannot score a task with no samples")
    total = sum(score_sample(task, pred, sample) for pred, sample in zip(predictions, samples))
    return round(100 * total / len(samples), SCORE_DECIMALS)
