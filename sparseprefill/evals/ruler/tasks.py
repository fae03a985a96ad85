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
"""

from __future__ import annotations

import random
import string
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from typing import Any

from . import haystack as hs
from .scoring import METRICS, TASK_METRIC, postprocess_pred
from .words import common_word_pool, random_needle

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


# A built sample: (input, answer_prefix, outputs).
_Built = tuple[str, str, list[str]]


# ------------------------------------------------------------------------------------------ NIAH

_NEEDLE = "One of the special magic {kind} for {key} is: {value}."


def _niah_prompt(kind: str, context: str, query: str, singular: bool) -> tuple[str, str]:
    """RULER's NIAH question; with a single expected answer RULER rewrites it in the singular."""
    if singular:
        one = kind[:-1]  # "numbers" -> "number", "uuids" -> "uuid"
        text = (
            f"A special magic {one} is hidden within the following text. Make sure to memorize it. "
            f"I will quiz you about the {one} afterwards.\n{context}\n"
            f"What is the special magic {one} for {query} mentioned in the provided text?"
        )
        prefix = f" The special magic {one} for {query} mentioned in the provided text is"
    else:
        text = (
            f"Some special magic {kind} are hidden within the following text. Make sure to memorize it. "
            f"I will quiz you about the {kind} afterwards.\n{context}\n"
            f"What are all the special magic {kind} for {query} mentioned in the provided text?"
        )
        prefix = f" The special magic {kind} for {query} mentioned in the provided text are"
    return text, prefix


def _niah_builder(cfg: dict[str, Any], essay: list[str] | None) -> tuple[Callable[[int, random.Random], _Built], int, int]:
    kind_k, kind_v = cfg["type_needle_k"], cfg["type_needle_v"]
    num_v, num_q = cfg["num_needle_v"], cfg["num_needle_q"]
    num_k = max(cfg["num_needle_k"], num_q)
    haystack = cfg["type_haystack"]

    def build(n: int, rng: random.Random) -> _Built:
        keys: list[str] = []
        values: list[list[str]] = []
        needles: list[str] = []
        for _ in range(num_k):
            key = random_needle(kind_k, rng)
            while key in keys:
                key = random_needle(kind_k, rng)
            keys.append(key)
            vals = [random_needle(kind_v, rng) for _ in range(num_v)]
            values.append(vals)
            needles.extend(_NEEDLE.format(kind=kind_v, key=key, value=val) for val in vals)
        rng.shuffle(needles)

        if haystack == "essay":
            assert essay is not None
            sentences = hs.split_sentences(hs.essay_prefix(essay, n))
            context = hs.insert_at_depths(sentences, needles, rng)
        elif haystack == "noise":
            context = hs.scatter_lines([hs.NOISE] * n, needles, rng)
        elif haystack == "needle":
            lines = []
            for _ in range(n):
                key = random_needle(kind_k, rng)
                while key in keys:  # a distractor must not answer the question
                    key = random_needle(kind_k, rng)
                lines.append(_NEEDLE.format(kind=kind_v, key=key, value=random_needle(kind_v, rng)))
            context = hs.scatter_lines(lines, needles, rng)
        else:  # pragma: no cover - configs are fixed
            raise ValueError(f"unknown haystack type {haystack!r}")

        picked = rng.sample(range(num_k), num_q)
        queries = [keys[i] for i in picked]
        answers = [a for i in picked for a in values[i]]
        query = queries[0] if len(queries) == 1 else ", ".join(queries[:-1]) + ", and " + queries[-1]
        text, prefix = _niah_prompt(kind_v, context, query, singular=num_q * num_v == 1)
        return text, prefix, answers

    start = 500 if haystack == "essay" else 25
    min_units = 1 if haystack == "essay" else num_k * num_v
    return build, start, min_units


# ------------------------------------------------------------------------------ variable tracking

_VT_TEXT = (
    "Memorize and track the chain(s) of variable assignment hidden in the following text.\n\n"
    "{context}\nQuestion: Find all variables that are assigned the value {query} in the text above."
)
_VT_PREFIX = (
    " Answer: According to the chain(s) of variable assignment in the text above, "
    "{num_v} variables are assigned the value {query}, they are: "
)
_VT_ICL_BUDGET = 500  # RULER builds its one-shot example within 500 tokens


def _vt_example(n: int, rng: random.Random, num_chains: int, num_hops: int, name_len: int) -> _Built:
    """One variable-tracking prompt over ``n`` noise lines; outputs are chain 0's variables."""
    names: list[str] = []
    while len(names) < num_chains * (num_hops + 1):
        name = "".join(rng.choices(string.ascii_uppercase, k=name_len))
        if name not in names:
            names.append(name)
    lines = [hs.NOISE] * n
    chains_vars: list[list[str]] = []
    used_values: set[str] = set()
    first_value = ""
    for c in range(num_chains):
        chain_vars = names[c * (num_hops + 1):(c + 1) * (num_hops + 1)]
        chains_vars.append(chain_vars)
        value = str(rng.randint(10000, 99998))
        while value in used_values:
            value = str(rng.randint(10000, 99998))
        used_values.add(value)
        if c == 0:
            first_value = value
        chain = [f"VAR {chain_vars[0]} = {value}"]
        chain += [f"VAR {chain_vars[j + 1]} = VAR {chain_vars[j]} " for j in range(num_hops)]
        # Keep each chain in order: sorted positions, shifted by the statements already inserted.
        positions = sorted(rng.sample(range(len(lines)), len(chain)))
        for j, (pos, stmt) in enumerate(zip(positions, chain)):
            lines.insert(pos + j, stmt)
    context = "\n".join(lines).replace(". \n", ".\n")
    text = _VT_TEXT.format(context=context, query=first_value)
    prefix = _VT_PREFIX.format(num_v=num_hops + 1, query=first_value)
    return text, prefix, list(chains_vars[0])


def _vt_builder(cfg: dict[str, Any], count: Callable[[str], int], max_seq_length: int, rng: random.Random
                ) -> tuple[Callable[[int, random.Random], _Built], int, int]:
    num_chains, num_hops = cfg["num_chains"], cfg["num_hops"]
    icl_hops = min(10, num_hops)
    # RULER prepends a one-shot example (3-letter names) fitted to 500 tokens; here capped at a
    # third of the context so that short contexts (< 1500 tokens) keep room for the task.
    icl_budget = min(_VT_ICL_BUDGET, max_seq_length // 3)

    def icl_build(n: int, r: random.Random) -> _Built:
        return _vt_example(n, r, num_chains, icl_hops, 3)

    icl_lines = _fit(icl_build, count, icl_budget, start=5, min_units=icl_hops + 1, rng=rng)

    def build(n: int, r: random.Random) -> _Built:
        ex_text, ex_prefix, ex_vars = icl_build(icl_lines, r)
        shot = ex_text + ex_prefix + " " + " ".join(ex_vars) + "\n"
        text, prefix, answers = _vt_example(n, r, num_chains, num_hops, 5)
        return shot + "\n" + text, prefix, answers

    start = 10 if max_seq_length >= 4096 else 5
    return build, start, num_hops + 1


# ------------------------------------------------------------------------- common words (CWE)


def _cwe_builder(cfg: dict[str, Any], max_seq_length: int) -> tuple[Callable[[int, random.Random], _Built], int, int]:
    num_cw = cfg["num_cw"]
    if max_seq_length < 4096:  # RULER lowers the repetition counts for short contexts
        shot_args, main_freq = (20, 3, 1), (6, 1)
    else:
        shot_args, main_freq = (40, 10, 3), (cfg["freq_cw"], cfg["freq_ucw"])
    text_tmpl = (
        "Below is a numbered list of words. In these words, some appear more often than others. "
        "Memorize the ones that appear most often.\n{context}\n"
        f"Question: What are the {num_cw} most common words in the above list?"
    )
    prefix = f" Answer: The top {num_cw} words that appear most often in the list are:"

    def numbered(words: Sequence[str]) -> str:
        return " ".join(f"{i + 1}. {w}" for i, w in enumerate(words))

    def example(num_words: int, rep_common: int, rep_rare: int, rng: random.Random) -> tuple[str, list[str]]:
        pool = common_word_pool(num_words, rng)
        common, rare = pool[:num_cw], pool[num_cw:]
        items = common * rep_common + rare * rep_rare
        rng.shuffle(items)
        return numbered(items), common

    def build(n: int, rng: random.Random) -> _Built:
        shot_ctx, shot_ans = example(*shot_args, rng)
        shot = text_tmpl.format(context=shot_ctx) + prefix + " " + numbered(shot_ans)
        ctx, answers = example(n, *main_freq, rng)
        return shot + "\n" + text_tmpl.format(context=ctx), prefix, answers

    return build, 10, num_cw


# --------------------------------------------------------------------------- coded words (FWE)


def _zeta(s: float, n: int = 64) -> float:
    """Riemann zeta for s > 1 (partial sum + Euler-Maclaurin tail; error far below 1e-9)."""
    head = sum(k ** -s for k in range(1, n))
    return head + n ** (1 - s) / (s - 1) + 0.5 * n ** -s + s / 12 * n ** (-s - 1)


def _fwe_builder(cfg: dict[str, Any], max_seq_length: int, max_new_tokens: int
                 ) -> tuple[Callable[[int, random.Random], _Built], int, int]:
    alpha = float(cfg["alpha"])
    word_len = 6
    vocab_size = max(8, (max_seq_length - max_new_tokens) // 50)
    norm = _zeta(alpha)
    text_tmpl = (
        "Read the following coded text and track the frequency of each coded word. "
        "Find the three most frequently appeared coded words. {context}\n"
        "Question: Do not provide any explanation. Please ignore the dots '....'. "
        "What are the three most frequently appeared words in the above coded text?"
    )
    prefix = " Answer: According to the coded text above, the three most frequently appeared words are:"

    def build(n: int, rng: random.Random) -> _Built:
        vocab: list[str] = []
        seen: set[str] = set()
        while len(vocab) < vocab_size:
            w = "".join(rng.choices(string.ascii_lowercase, k=word_len))
            if w not in seen:
                seen.add(w)
                vocab.append(w)
        vocab[0] = "..."  # the most frequent "word" is noise
        # Zipf counts: word of rank k appears int(n * k^-alpha / zeta(alpha)) times.
        counts = [int(n * (k ** -alpha) / norm) for k in range(1, vocab_size + 1)]
        if not counts[1] > counts[2] > counts[3] > counts[4]:
            raise ValueError("too few coded words for a unique top three")
        items = [w for w, c in zip(vocab, counts) for _ in range(c)]
        rng.shuffle(items)
        return text_tmpl.format(context=" ".join(items)), prefix, vocab[1:4]

    # Smallest n with strictly decreasing counts over ranks 2..5 (checked in build too).
    min_units = 100
    while True:
        c = [int(min_units * (k ** -alpha) / norm) for k in range(2, 6)]
        if c[0] > c[1] > c[2] > c[3]:
            break
        min_units += 10
    return build, max(min_units, (max_seq_length - max_new_tokens) // word_len), min_units


# ----------------------------------------------------------------------------------- fitting


def count_tokens_fn(tokenizer: Any) -> Callable[[str], int]:
    """A ``text -> number of tokens`` function for a Hugging Face tokenizer (no special tokens).

    Also accepts a plain callable returning an int (a token counter) for tests and custom uses.
    """
    if hasattr(tokenizer, "encode"):
        return lambda text: len(tokenizer.encode(text, add_special_tokens=False))
    if callable(tokenizer):
        def count(text: str) -> int:
            out = tokenizer(text)
            if isinstance(out, int):
                return out
            ids = out["input_ids"] if isinstance(out, dict) or hasattr(out, "keys") else out
            return len(ids)
        return count
    raise TypeError("tokenizer must have .encode() or be callable")


def _fit(build: Callable[[int, random.Random], _Built], count: Callable[[str], int], budget: int,
         start: int, min_units: int, rng: random.Random) -> int:
    """Largest haystack size ``n >= min_units`` whose sample fits ``budget`` tokens (prompt only)."""

    def fits(n: int) -> bool:
        text, prefix, _ = build(n, rng)
        return count(text + prefix) <= budget

    if not fits(min_units):
        raise ValueError(f"the token budget ({budget} prompt tokens) is too small for this task")
    lo = min_units  # fits
    # First probe: scale the starting size by the measured tokens per unit (3x slack, as RULER).
    start = max(start, min_units + 1)
    text, prefix, _ = build(start, rng)
    per_unit = max(count(text + prefix) / start, 1e-6)
    hi = max(int(budget / per_unit * 3), 2 * start)
    while fits(hi):  # grow until a size that does not fit is found
        lo, hi = hi, hi * 2
    hi -= 1
    while lo < hi:  # invariant: lo fits, every size > hi was seen not to fit
        mid = (lo + hi + 1) // 2
        if fits(mid):
            lo = mid
        else:
            hi = mid - 1
    return lo


def _fit_sample(build: Callable[[int, random.Random], _Built], count: Callable[[str], int], budget: int,
                size: int, step: int, min_units: int, sub_seed: int) -> tuple[str, str, list[str], int]:
    """Build one sample (content fixed by ``sub_seed``) at the largest size that fits ``budget``.

    Starts from the task-level ``size``, walks in ``step`` units to bracket the limit, then bisects.
    """
    cache: dict[int, tuple[_Built, int]] = {}

    def probe(n: int) -> bool:
        if n not in cache:
            built = build(n, random.Random(sub_seed))
            cache[n] = (built, count(built[0] + built[1]))
        return cache[n][1] <= budget

    if probe(size):
        lo, hi = size, size + step
        while probe(hi):
            lo, hi = hi, hi + step
    else:
        hi = size
        lo = size - step
        while lo > min_units and not probe(lo):
            hi, lo = lo, lo - step
        lo = max(lo, min_units)
        if not probe(lo):
            raise ValueError("could not fit a sample into the token budget")
    hi -= 1
    while lo < hi:  # lo fits, hi + 1 does not
        mid = (lo + hi + 1) // 2
        if probe(mid):
            lo = mid
        else:
            hi = mid - 1
    (text, prefix, answers), used = cache[lo]
    return text, prefix, answers, used


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
