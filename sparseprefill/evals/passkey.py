"""Pass-key retrieval: a deterministic prompt builder and answer scorers.

A five-digit key is hidden on its own line at a chosen depth of repetitive filler text and the
prompt ends so that the key is the natural next thing to say (the "v2" prompt of the shared notes,
on which dense SmolLM2-135M-Instruct and Gemma-3-270m answer 5/5 from 2K to 8K tokens)::

    <intro> <filler ...>
    The pass key is 12345. Remember it. 12345 is the pass key.
    <filler ...>

    What is the pass key mentioned in the text above? Answer: The pass key is

Two scores: *free* (the key appears in a few greedy tokens) and *digit-forced* (feed the space the
tokenizer puts before a number, then take the arg-max over the ten digit tokens only, once per key
digit; exact match). Forced decoding separates "the model lost the needle" from "the model
phrased its answer differently".

The prompt builder and the string scorers are pure functions of their arguments; only
``answer_passkey`` runs a model.
"""

from __future__ import annotations

import copy
import random
import time
from dataclasses import dataclass, field, fields
from typing import Any

import torch

from ..patchers.support import cache_keyword, output_cache

__all__ = [
    "PASSKEY_INTRO",
    "PASSKEY_FILLER_SENTENCES",
    "PASSKEY_QUESTION",
    "PasskeyPrompt",
    "PasskeyAnswer",
    "make_passkey",
    "build_passkey_prompt",
    "free_answer_is_correct",
    "forced_answer_is_correct",
    "digit_token_ids",
    "number_prefix_token_ids",
    "answer_passkey",
]

PASSKEY_INTRO = (
    "There is an important info hidden inside a lot of irrelevant text. "
    "Find it and memorize it. I will quiz you about the important information there."
)
# The filler is added sentence by sentence, so a prompt lands within one short sentence
# (about 5 tokens) of its target length.
PASSKEY_FILLER_SENTENCES = (
    "The grass is green.",
    "The sky is blue.",
    "The sun is yellow.",
    "Here we go.",
    "There and back again.",
)
NEEDLE_TEMPLATE = "The pass key is {key}. Remember it. {key} is the pass key."
PASSKEY_QUESTION = "\n\nWhat is the pass key mentioned in the text above? Answer: The pass key is"

PASSKEY_DIGITS = 5
# Five-digit keys without a leading zero, so that every key has exactly PASSKEY_DIGITS digits.
PASSKEY_MIN = 10 ** (PASSKEY_DIGITS - 1)
PASSKEY_MAX = 10**PASSKEY_DIGITS - 1
# Greedy tokens of the free answer: " 12345." takes about 7 tokens with per-digit tokenizers.
DEFAULT_FREE_ANSWER_TOKENS = 8


@dataclass(frozen=True)
class PasskeyPrompt:
    """One pass-key prompt. ``num_tokens`` counts the tokenizer's default encoding of ``text``."""

    text: str
    key: str
    depth: float
    num_tokens: int
    target_tokens: int
    seed: int


@dataclass(frozen=True)
class PasskeyAnswer:
    """What a model answered to a ``PasskeyPrompt``."""

    key: str
    depth: float
    num_tokens: int
    free_text: str
    forced_digits: str
    free_correct: bool
    forced_correct: bool
    prefill_seconds: float
    # Logits of the prompt's last ``scored_positions`` positions from the prefill, [1, P, V];
    # kept out of ``to_dict`` (not JSON material).
    prompt_logits: torch.Tensor | None = field(default=None, repr=False, compare=False)

    def to_dict(self) -> dict[str, Any]:
        return {f.name: getattr(self, f.name) for f in fields(self) if f.name != "prompt_logits"}


def make_passkey(seed: int) -> str:
    """The key for ``seed``: a five-digit decimal string, identical on every platform."""
    return str(random.Random(seed).randint(PASSKEY_MIN, PASSKEY_MAX))


def _filler(num_sentences: int, start: int = 0) -> str:
    count = len(PASSKEY_FILLER_SENTENCES)
    return " ".join(PASSKEY_FILLER_SENTENCES[(start + i) % count] for i in range(num_sentences))


def _compose(num_sentences: int, depth: float, key: str) -> str:
    before = round(depth * num_sentences)
    needle = NEEDLE_TEMPLATE.format(key=key)
    head = " ".join(part for part in (PASSKEY_INTRO, _filler(before)) if part)
    tail = _filler(num_sentences - before, start=before)
    return f"{head}\n{needle}\n{tail}{PASSKEY_QUESTION}"


def _count_tokens(tokenizer: Any, text: str) -> int:
    return len(tokenizer(text)["input_ids"])


def build_passkey_prompt(tokenizer: Any, target_tokens: int, depth: float = 0.5, seed: int = 0) -> PasskeyPrompt:
    """The longest pass-key prompt of at most ``target_tokens`` tokens.

    Args:
        tokenizer: any transformers tokenizer (its default ``add_special_tokens`` is what counts).
        target_tokens: length to reach; the result has at most this many tokens and at least
            ``target_tokens - 2 * (longest filler sentence)`` tokens.
        depth: fraction of the filler placed before the needle, in [0, 1].
        seed: chooses the key (``make_passkey(seed)``).

    Raises:
        ValueError: ``depth`` outside [0, 1], or ``target_tokens`` too short for intro, needle and question.
    """
    if not 0.0 <= depth <= 1.0:
        raise ValueError(f"depth must be in [0, 1], got {depth!r}")
    key = make_passkey(seed)
    minimum = _count_tokens(tokenizer, _compose(0, depth, key))
    if target_tokens < minimum:
        raise ValueError(f"target_tokens={target_tokens} is shorter than the bare prompt ({minimum} tokens)")
    # Token count grows (almost exactly) linearly with the number of filler sentences: estimate the
    # slope from one probe, then walk to the largest count that fits.
    probe = max(1, 4 * len(PASSKEY_FILLER_SENTENCES))
    per_sentence = max((_count_tokens(tokenizer, _compose(probe, depth, key)) - minimum) / probe, 1e-9)
    sentences = max(0, int((target_tokens - minimum) / per_sentence))
    length = _count_tokens(tokenizer, _compose(sentences, depth, key))
    while length > target_tokens and sentences > 0:
        sentences -= 1
        length = _count_tokens(tokenizer, _compose(sentences, depth, key))
    while True:
        longer = _count_tokens(tokenizer, _compose(sentences + 1, depth, key))
        if longer > target_tokens:
            break
        sentences, length = sentences + 1, longer
    return PasskeyPrompt(
        text=_compose(sentences, depth, key), key=key, depth=depth, num_tokens=length,
        target_tokens=target_tokens, seed=seed,
    )


def free_answer_is_correct(answer_text: str, key: str) -> bool:
    """Free score: the key appears in the decoded answer."""
    return key in answer_text


def forced_answer_is_correct(forced_digits: str, key: str) -> bool:
    """Digit-forced score: exact match of the forced digits."""
    return forced_digits == key


def digit_token_ids(tokenizer: Any) -> list[int]:
    """Ids of the tokens "0" ... "9" (the tokenizer must encode each digit as one token)."""
    ids = []
    for digit in "0123456789":
        encoded = tokenizer(digit, add_special_tokens=False)["input_ids"]
        if len(encoded) != 1:
            raise ValueError(f"digit {digit!r} is {len(encoded)} tokens in this tokenizer; forced scoring needs 1")
        ids.append(encoded[0])
    return ids


def number_prefix_token_ids(tokenizer: Any) -> list[int]:
    """Tokens the tokenizer emits before the first digit of " 12345" (e.g. the lone space "Ġ")."""
    digits = set(digit_token_ids(tokenizer))
    encoded = tokenizer(" " + "1" * PASSKEY_DIGITS, add_special_tokens=False)["input_ids"]
    prefix = []
    for token in encoded:
        if token in digits:
            return prefix
        prefix.append(token)
    raise ValueError("this tokenizer merges digits with the preceding space; digit-forced scoring needs split digits")


def _forward(model: Any, token_ids: list[int], cache: Any, keep: int = 1) -> tuple[torch.Tensor, Any]:
    """Feed ``token_ids`` after ``cache``; return the last ``keep`` positions' logits [1, keep, V]
    and the updated cache."""
    ids = torch.tensor([token_ids], device=model.device)
    out = model(input_ids=ids, use_cache=True, logits_to_keep=keep, **{cache_keyword(model): cache})
    return out.logits, output_cache(out)


def _step(model: Any, token_ids: list[int], cache: Any) -> tuple[torch.Tensor, Any]:
    """Feed ``token_ids`` after ``cache``; return the last position's logits [V] and the cache."""
    logits, cache = _forward(model, token_ids, cache)
    return logits[0, -1], cache


@torch.inference_mode()
def answer_passkey(
    model: Any,
    tokenizer: Any,
    prompt: PasskeyPrompt,
    free_tokens: int = DEFAULT_FREE_ANSWER_TOKENS,
    scored_positions: int = 0,
) -> PasskeyAnswer:
    """Prefill ``prompt`` once (KV cache), then decode the free answer and the digit-forced answer.

    Both answers continue the same prefill: the forced answer starts from a copy of the prompt's
    cache (copied rather than cropped: ``Cache.crop`` changed meaning between transformers releases).
    Decode steps are single-token calls, so on a patched model they run dense (only the prefill is
    sparse), exactly as in serving. With ``scored_positions > 0`` the prefill also returns the
    logits of that many last prompt positions (``PasskeyAnswer.prompt_logits``), for comparing
    next-token distributions without a second forward.
    """
    prompt_ids = tokenizer(prompt.text)["input_ids"]
    start = time.perf_counter()
    kept_logits, cache = _forward(model, prompt_ids, None, keep=max(1, scored_positions))
    prefill_seconds = time.perf_counter() - start
    prompt_logits = kept_logits[0, -1]
    prompt_cache = copy.deepcopy(cache)

    free_ids: list[int] = []
    logits = prompt_logits
    for _ in range(free_tokens):
        next_id = int(logits.argmax())
        free_ids.append(next_id)
        if next_id == tokenizer.eos_token_id or len(free_ids) == free_tokens:
            break
        logits, cache = _step(model, [next_id], cache)
    free_text = tokenizer.decode(free_ids, skip_special_tokens=True)

    cache = prompt_cache
    digit_ids = digit_token_ids(tokenizer)
    prefix = number_prefix_token_ids(tokenizer)
    if prefix:
        logits, cache = _step(model, prefix, cache)
    else:
        logits = prompt_logits
    digits = []
    for position in range(len(prompt.key)):
        choice = int(logits[digit_ids].argmax())
        digits.append(str(choice))
        if position + 1 < len(prompt.key):
            logits, cache = _step(model, [digit_ids[choice]], cache)
    forced_digits = "".join(digits)

    return PasskeyAnswer(
        key=prompt.key, depth=prompt.depth, num_tokens=len(prompt_ids), free_text=free_text,
        forced_digits=forced_digits, free_correct=free_answer_is_correct(free_text, prompt.key),
        forced_correct=forced_answer_is_correct(forced_digits, prompt.key), prefill_seconds=prefill_seconds,
        prompt_logits=kept_logits.float() if scored_positions > 0 else None,
    )
