"""Random needle keys/values and word pools for the RULER tasks.

RULER draws English words from the word lists bundled with the ``wonderwords`` package
(``nounlist.txt``, ``adjectivelist.txt``, ``verblist.txt``). They are read lazily from the
installed package at first use, never copied into this repository. ``wonderwords`` is needed
only by the tasks that use words (NIAH with word keys, CWE); the others run without it.

All randomness comes from a caller-supplied :class:`random.Random`, so generation is
deterministic per seed.
"""

from __future__ import annotations

import functools
import random
import uuid

__all__ = [
    "word_lists",
    "random_number",
    "random_word",
    "random_uuid",
    "random_needle",
    "common_word_pool",
]


@functools.lru_cache(maxsize=1)
def word_lists() -> tuple[tuple[str, ...], tuple[str, ...], tuple[str, ...]]:
    """``(nouns, adjectives, verbs)`` from ``wonderwords``' bundled lists, each sorted and deduplicated."""
    try:
        from wonderwords import random_word as _ww
    except ImportError as exc:  # pragma: no cover - depends on the environment
        raise ImportError(
            "RULER word-based tasks need the 'wonderwords' package (pip install wonderwords)"
        ) from exc
    read = _ww._get_words_from_text_file
    return tuple(
        tuple(sorted(set(read(name))))
        for name in ("nounlist.txt", "adjectivelist.txt", "verblist.txt")
    )


def random_number(rng: random.Random, num_digits: int = 7) -> str:
    """A ``num_digits``-digit decimal number (RULER's needle values: 7 digits)."""
    return str(rng.randint(10 ** (num_digits - 1), 10**num_digits - 1))


def random_word(rng: random.Random) -> str:
    """An ``adjective-noun`` compound, uniform over all pairs (RULER's word needle keys)."""
    nouns, adjs, _ = word_lists()
    # Uniform over the product of the (deduplicated) lists, without materialising the ~6M pairs.
    adj = adjs[rng.randrange(len(adjs))]
    noun = nouns[rng.randrange(len(nouns))]
    return f"{adj}-{noun}"


def random_uuid(rng: random.Random) -> str:
    """A version-4 UUID string from 128 random bits."""
    return str(uuid.UUID(int=rng.getrandbits(128), version=4))


def random_needle(kind: str, rng: random.Random) -> str:
    """A random key or value of ``kind`` (``"numbers"``, ``"words"`` or ``"uuids"``)."""
    if kind == "numbers":
        return random_number(rng)
    if kind == "words":
        return random_word(rng)
    if kind == "uuids":
        return random_uuid(rng)
    raise ValueError(f"unknown needle type {kind!r}")


@functools.lru_cache(maxsize=1)
def _single_words() -> tuple[str, ...]:
    nouns, adjs, verbs = word_lists()
    return tuple(sorted(set(nouns) | set(adjs) | set(verbs)))


def common_word_pool(num_words: int, rng: random.Random) -> list[str]:
    """``num_words`` distinct words in random order (CWE's word list).

    Sampled from the union of wonderwords' nouns, adjectives and verbs (~8.2K words), as RULER
    does. RULER switches to a separate English word list beyond that size; this implementation
    instead tops the pool up with distinct ``adjective-noun`` compounds (only reached at very long
    contexts, around 128K tokens).
    """
    pool = _single_words()
    if num_words <= len(pool):
        return rng.sample(pool, num_words)
    chosen = list(pool)
    rng.shuffle(chosen)
    seen = set(chosen)
    while len(chosen) < num_words:
        word = random_word(rng)
        if word not in seen:
            seen.add(word)
            chosen.append(word)
    rng.shuffle(chosen)
    return chosen
