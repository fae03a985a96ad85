"""The sample builders of the four RULER task families (needle in a haystack, variable tracking,
common words, coded/frequent words), following RULER's ``scripts/data/synthetic/{niah,
variable_tracking,common_words_extraction,freq_words_extraction}.py``.

Each ``_<family>_builder`` returns ``(build, start, min_units)``: ``build(n, rng)`` makes one
sample with a haystack of ``n`` units, and :mod:`.tasks` fits ``n`` to the token budget.
"""

from __future__ import annotations

import random
import string
from collections.abc import Callable, Sequence
from typing import Any

from . import haystack as hs
from .fitting import _Built, _fit
from .words import common_word_pool, random_needle


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

