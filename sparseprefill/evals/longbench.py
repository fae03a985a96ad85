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

Tokenizers are passed in; nothing here imports transformers or torch.
"""

from __future__ import annotations

import difflib
import json
import re
import string
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

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

# --------------------------------------------------------------------------------------------
# Task table
# --------------------------------------------------------------------------------------------

# Tasks on which LongBench's pred.py does *not* wrap the prompt in the chat format: they are
# few-shot or code-completion prompts whose answer should continue the text directly.
NO_CHAT_TEMPLATE_TASKS = frozenset({"trec", "triviaqa", "samsum", "lsht", "lcc", "repobench-p"})
# Tasks whose predictions eval.py cuts to their first non-empty line before scoring (few-shot
# prompts: a model tends to go on writing the next example).
FIRST_LINE_TASKS = frozenset({"trec", "triviaqa", "samsum", "lsht"})

LANGUAGE_EN = "en"
LANGUAGE_ZH = "zh"
LANGUAGE_CODE = "code"

METRIC_QA_F1 = "qa_f1_score"
METRIC_QA_F1_ZH = "qa_f1_zh_score"
METRIC_ROUGE = "rouge_score"
METRIC_ROUGE_ZH = "rouge_zh_score"
METRIC_CLASSIFICATION = "classification_score"
METRIC_RETRIEVAL = "retrieval_score"
METRIC_RETRIEVAL_ZH = "retrieval_zh_score"
METRIC_COUNT = "count_score"
METRIC_CODE_SIM = "code_sim_score"

_MULTI_DOC_QA_TEMPLATE = (
    "Answer the question based on the given passages. Only give me the answer and do not output "
    "any other words.\n\nThe following are given passages.\n{context}\n\nAnswer the question based "
    "on the given passages. Only give me the answer and do not output any other words.\n\n"
    "Question: {input}\nAnswer:"
)

# name -> (prompt template, max new tokens, metric, language). Templates are str.format strings
# with {context} and (for most tasks) {input}, verbatim from LongBench/config/dataset2prompt.json;
# the numbers are LongBench/config/dataset2maxlen.json; metrics are eval.py's dataset2metric.
_TABLE: dict[str, tuple[str, int, str, str]] = {
    "narrativeqa": (
        # "asconcisely" (sic) is in THUDM's official config; kept so prompts match exactly.
        "You are given a story, which can be either a novel or a movie script, and a question. "
        "Answer the question asconcisely as you can, using a single phrase if possible. Do not "
        "provide any explanation.\n\nStory: {context}\n\nNow, answer the question based on the "
        "story asconcisely as you can, using a single phrase if possible. Do not provide any "
        "explanation.\n\nQuestion: {input}\n\nAnswer:",
        128, METRIC_QA_F1, LANGUAGE_EN,
    ),
    "qasper": (
        "You are given a scientific article and a question. Answer the question as concisely as "
        "you can, using a single phrase or sentence if possible. If the question cannot be "
        "answered based on the information in the article, write \"unanswerable\". If the "
        "question is a yes/no question, answer \"yes\", \"no\", or \"unanswerable\". Do not "
        "provide any explanation.\n\nArticle: {context}\n\n Answer the question based on the above "
        "article as concisely as you can, using a single phrase or sentence if possible. If the "
        "question cannot be answered based on the information in the article, write "
        "\"unanswerable\". If the question is a yes/no question, answer \"yes\", \"no\", or "
        "\"unanswerable\". Do not provide any explanation.\n\nQuestion: {input}\n\nAnswer:",
        128, METRIC_QA_F1, LANGUAGE_EN,
    ),
    "multifieldqa_en": (
        "Read the following text and answer briefly.\n\n{context}\n\nNow, answer the following "
        "question based on the above text, only give me the answer and do not output any other "
        "words.\n\nQuestion: {input}\nAnswer:",
        64, METRIC_QA_F1, LANGUAGE_EN,
    ),
    "multifieldqa_zh": (
        "阅读以下文字并用中文简短回答：\n\n{context}\n\n现在请基于上面的文章回答下面的问题，"
        "只告诉我答案，不要输出任何其他字词。\n\n问题：{input}\n回答：",
        64, METRIC_QA_F1_ZH, LANGUAGE_ZH,
    ),
    "hotpotqa": (_MULTI_DOC_QA_TEMPLATE, 32, METRIC_QA_F1, LANGUAGE_EN),
    "2wikimqa": (_MULTI_DOC_QA_TEMPLATE, 32, METRIC_QA_F1, LANGUAGE_EN),
    "musique": (_MULTI_DOC_QA_TEMPLATE, 32, METRIC_QA_F1, LANGUAGE_EN),
    "dureader": (
        "请基于给定的文章回答下述问题。\n\n文章：{context}\n\n请基于上述文章回答下面的问题。\n\n"
        "问题：{input}\n回答：",
        128, METRIC_ROUGE_ZH, LANGUAGE_ZH,
    ),
    "gov_report": (
        "You are given a report by a government agency. Write a one-page summary of the report."
        "\n\nReport:\n{context}\n\nNow, write a one-page summary of the report.\n\nSummary:",
        512, METRIC_ROUGE, LANGUAGE_EN,
    ),
    "qmsum": (
        "You are given a meeting transcript and a query containing a question or instruction. "
        "Answer the query in one or more sentences.\n\nTranscript:\n{context}\n\nNow, answer the "
        "query based on the above meeting transcript in one or more sentences.\n\nQuery: {input}"
        "\nAnswer:",
        512, METRIC_ROUGE, LANGUAGE_EN,
    ),
    "multi_news": (
        "You are given several news passages. Write a one-page summary of all news. \n\nNews:\n"
        "{context}\n\nNow, write a one-page summary of all the news.\n\nSummary:",
        512, METRIC_ROUGE, LANGUAGE_EN,
    ),
    "vcsum": (
        "下面有一段会议记录，请你阅读后，写一段总结，总结会议的内容。\n会议记录：\n{context}\n\n"
        "会议总结：",
        512, METRIC_ROUGE_ZH, LANGUAGE_ZH,
    ),
    "trec": (
        "Please determine the type of the question below. Here are some examples of questions."
        "\n\n{context}\n{input}",
        64, METRIC_CLASSIFICATION, LANGUAGE_EN,
    ),
    "triviaqa": (
        "Answer the question based on the given passage. Only give me the answer and do not "
        "output any other words. The following are some examples.\n\n{context}\n\n{input}",
        32, METRIC_QA_F1, LANGUAGE_EN,
    ),
    "samsum": (
        "Summarize the dialogue into a few short sentences. The following are some examples."
        "\n\n{context}\n\n{input}",
        128, METRIC_ROUGE, LANGUAGE_EN,
    ),
    "lsht": (
        "请判断给定新闻的类别，下面是一些例子。\n\n{context}\n{input}",
        64, METRIC_CLASSIFICATION, LANGUAGE_ZH,
    ),
    "passage_count": (
        "There are some paragraphs below sourced from Wikipedia. Some of them may be duplicates. "
        "Please carefully read these paragraphs and determine how many unique paragraphs there "
        "are after removing duplicates. In other words, how many non-repeating paragraphs are "
        "there in total?\n\n{context}\n\nPlease enter the final count of unique paragraphs after "
        "removing duplicates. The output format should only contain the number, such as 1, 2, "
        "3, and so on.\n\nThe final answer is: ",
        32, METRIC_COUNT, LANGUAGE_EN,
    ),
    "passage_retrieval_en": (
        "Here are 30 paragraphs from Wikipedia, along with an abstract. Please determine which "
        "paragraph the abstract is from.\n\n{context}\n\nThe following is an abstract.\n\n{input}"
        "\n\nPlease enter the number of the paragraph that the abstract is from. The answer "
        "format must be like \"Paragraph 1\", \"Paragraph 2\", etc.\n\nThe answer is: ",
        32, METRIC_RETRIEVAL, LANGUAGE_EN,
    ),
    "passage_retrieval_zh": (
        "以下是若干段落文字，以及其中一个段落的摘要。请确定给定的摘要出自哪一段。\n\n{context}\n\n"
        "下面是一个摘要\n\n{input}\n\n请输入摘要所属段落的编号。答案格式必须是\"段落1\"，\"段落2\"等格式"
        "\n\n答案是：",
        32, METRIC_RETRIEVAL_ZH, LANGUAGE_ZH,
    ),
    "lcc": (
        "Please complete the code given below. \n{context}Next line of code:\n",
        64, METRIC_CODE_SIM, LANGUAGE_CODE,
    ),
    "repobench-p": (
        "Please complete the code given below. \n{context}{input}Next line of code:\n",
        64, METRIC_CODE_SIM, LANGUAGE_CODE,
    ),
}


@dataclass(frozen=True)
class LongBenchTask:
    """One LongBench task: how to prompt for it and how to score it.

    Attributes:
        name: LongBench's dataset name (also the ``{name}.jsonl`` file name).
        prompt_template: ``str.format`` template with ``{context}`` and, for most tasks,
            ``{input}``.
        max_new_tokens: greedy generation length LongBench uses for the task.
        metric: name of the metric function in :data:`METRICS`.
        chat_template: whether LongBench wraps the prompt in the model's chat format.
        language: ``"en"``, ``"zh"`` or ``"code"``.
    """

    name: str
    prompt_template: str
    max_new_tokens: int
    metric: str
    chat_template: bool
    language: str

    @property
    def first_line_only(self) -> bool:
        """Whether eval.py scores only the first line of a prediction for this task."""
        return self.name in FIRST_LINE_TASKS


TASKS: dict[str, LongBenchTask] = {
    name: LongBenchTask(
        name=name,
        prompt_template=template,
        max_new_tokens=max_new,
        metric=metric,
        chat_template=name not in NO_CHAT_TEMPLATE_TASKS,
        language=language,
    )
    for name, (template, max_new, metric, language) in _TABLE.items()
}
TASK_NAMES: tuple[str, ...] = tuple(TASKS)


def get_task(task: str | LongBenchTask) -> LongBenchTask:
    """The :class:`LongBenchTask` for a name (or the task itself), with a clear error if unknown."""
    if isinstance(task, LongBenchTask):
        return task
    try:
        return TASKS[task]
    except KeyError:
        raise ValueError(
            f"unknown LongBench task {task!r}; known tasks: {', '.join(TASK_NAMES)}"
        ) from None


# --------------------------------------------------------------------------------------------
# Data
# --------------------------------------------------------------------------------------------


class LongBenchDataError(ValueError):
    """A LongBench ``.jsonl`` file is missing, malformed or lacks a field."""


@dataclass(frozen=True)
class LongBenchSample:
    """One line of a THUDM LongBench ``{task}.jsonl`` file.

    ``answers`` and ``all_classes`` are tuples so that a sample stays hashable and immutable;
    ``id`` is the file's ``_id``.
    """

    input: str
    context: str
    answers: tuple[str, ...]
    length: int
    dataset: str
    language: str
    all_classes: tuple[str, ...] | None
    id: str


def _is_str_list(value: Any) -> bool:
    return isinstance(value, list) and all(isinstance(item, str) for item in value)


# field -> (check, description used in the error message)
_FIELD_CHECKS: dict[str, tuple[Callable[[Any], bool], str]] = {
    "input": (lambda v: isinstance(v, str), "a string"),
    "context": (lambda v: isinstance(v, str), "a string"),
    "answers": (lambda v: _is_str_list(v) and len(v) > 0, "a non-empty list of strings"),
    "length": (lambda v: isinstance(v, int) and not isinstance(v, bool), "an integer"),
    "dataset": (lambda v: isinstance(v, str), "a string"),
    "language": (lambda v: isinstance(v, str), "a string"),
    "all_classes": (lambda v: v is None or _is_str_list(v), "null or a list of strings"),
    "_id": (lambda v: isinstance(v, str), "a string"),
}


def _parse_line(record: Any, where: str) -> LongBenchSample:
    if not isinstance(record, dict):
        raise LongBenchDataError(f"{where}: expected a JSON object, got {type(record).__name__}")
    missing = [name for name in _FIELD_CHECKS if name not in record]
    if missing:
        raise LongBenchDataError(f"{where}: missing field(s) {', '.join(missing)}")
    for name, (check, description) in _FIELD_CHECKS.items():
        if not check(record[name]):
            raise LongBenchDataError(
                f"{where}: field {name!r} must be {description}, got {record[name]!r:.80}"
            )
    all_classes = record["all_classes"]
    return LongBenchSample(
        input=record["input"],
        context=record["context"],
        answers=tuple(record["answers"]),
        length=record["length"],
        dataset=record["dataset"],
        language=record["language"],
        all_classes=None if all_classes is None else tuple(all_classes),
        id=record["_id"],
    )


def load_task(data_dir: str | Path, task: str | LongBenchTask) -> list[LongBenchSample]:
    """Read ``{data_dir}/{task}.jsonl`` in THUDM's layout (the ``data.zip`` of LongBench v1).

    Blank lines are skipped; anything else that is not a complete sample raises
    :class:`LongBenchDataError` naming the file and the 1-based line, because a silently dropped
    or half-read sample would shift every score computed from the file.
    """
    spec = get_task(task)
    path = Path(data_dir) / f"{spec.name}.jsonl"
    if not path.is_file():
        raise LongBenchDataError(f"LongBench file not found: {path}")
    samples = []
    with path.open(encoding="utf-8") as handle:
        for number, line in enumerate(handle, start=1):
            if not line.strip():
                continue
            where = f"{path}:{number}"
            try:
                record = json.loads(line)
            except json.JSONDecodeError as error:
                raise LongBenchDataError(f"{where}: invalid JSON ({error.msg})") from None
            samples.append(_parse_line(record, where))
    if not samples:
        raise LongBenchDataError(f"{path}: no samples")
    return samples


# --------------------------------------------------------------------------------------------
# Prompts
# --------------------------------------------------------------------------------------------

# Fewer tokens than this cannot keep both a head and a tail (pred.py keeps int(max/2) of each).
MIN_PROMPT_TOKENS = 2


def format_prompt(task: str | LongBenchTask, sample: LongBenchSample) -> str:
    """The task's template filled with the sample's context and input (no truncation)."""
    return get_task(task).prompt_template.format(context=sample.context, input=sample.input)


def _token_ids(tokenizer: Any, text: str) -> list[int]:
    return list(tokenizer(text, truncation=False)["input_ids"])


def truncate_middle(prompt: str, tokenizer: Any, max_prompt_tokens: int) -> str:
    """LongBench's middle truncation: keep the first and last ``int(max/2)`` tokens.

    The start (instructions, the beginning of the context) and the end (the question) matter most,
    so pred.py cuts the middle of the context. As there, the prompt is tokenized with the
    tokenizer's default special tokens, and the two halves are decoded separately with
    ``skip_special_tokens=True`` and concatenated. Re-tokenizing the result can give a few tokens
    more or fewer than ``max_prompt_tokens`` (a merge can form at the seam); LongBench accepts
    that, and so do we.
    """
    if max_prompt_tokens < MIN_PROMPT_TOKENS:
        raise ValueError(
            f"max_prompt_tokens must be at least {MIN_PROMPT_TOKENS}, got {max_prompt_tokens}"
        )
    ids = _token_ids(tokenizer, prompt)
    if len(ids) <= max_prompt_tokens:
        return prompt
    half = int(max_prompt_tokens / 2)
    head = tokenizer.decode(ids[:half], skip_special_tokens=True)
    tail = tokenizer.decode(ids[-half:], skip_special_tokens=True)
    return head + tail


def build_prompt(
    task: str | LongBenchTask, sample: LongBenchSample, tokenizer: Any, max_prompt_tokens: int
) -> str:
    """Format the task's template for ``sample`` and middle-truncate it to ``max_prompt_tokens``.

    The result is the raw prompt before any chat formatting, as in pred.py (which truncates
    first and then builds the chat prompt); see :func:`apply_chat_template`.
    """
    return truncate_middle(format_prompt(task, sample), tokenizer, max_prompt_tokens)


def uses_chat_template(task: str | LongBenchTask, tokenizer: Any) -> bool:
    """Whether the prompt for ``task`` should go through ``tokenizer.apply_chat_template``.

    True when LongBench wraps this task in the chat format and the tokenizer has a chat template
    (a base model has none and gets the raw prompt, as LongBench's non-chat models do).
    """
    return get_task(task).chat_template and bool(getattr(tokenizer, "chat_template", None))


def apply_chat_template(task: str | LongBenchTask, prompt: str, tokenizer: Any) -> str:
    """The text to feed the model: the prompt as one user turn plus the generation prompt, or the
    prompt unchanged when :func:`uses_chat_template` is false.

    The chat text usually starts with the template's own BOS, so tokenize it with
    ``add_special_tokens=False`` to avoid a doubled BOS.
    """
    if not uses_chat_template(task, tokenizer):
        return prompt
    return tokenizer.apply_chat_template(
        [{"role": "user", "content": prompt}], tokenize=False, add_generation_prompt=True
    )


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
    ``"character"`` (see the module docstring); record it next to Chinese-task scores."""
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
    jieba; see the module docstring). Tokens that normalize to nothing are dropped."""
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
