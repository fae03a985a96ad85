"""Haystacks for the RULER tasks and the ways needles are placed in them.

Three haystack kinds, as in RULER's ``synthetic.yaml``:

* ``"noise"``: one fixed sentence group repeated, one copy per line (:data:`NOISE`).
* ``"needle"``: every haystack line is itself a needle sentence with a random key and value
  (built by the NIAH generator; only the placement helper lives here).
* ``"essay"``: an externally supplied text (RULER uses Paul Graham's essays). It is split into
  whitespace-separated words, the first ``n`` words are taken (the text is repeated when it is
  shorter), split into sentences, and needles are inserted between sentences at depths drawn
  from 40 evenly spaced percentages. This module ships no essay text; callers pass it in.
"""

from __future__ import annotations

import random
import re
from collections.abc import Sequence

__all__ = [
    "NOISE",
    "DEPTHS",
    "essay_words",
    "essay_prefix",
    "split_sentences",
    "insert_at_depths",
    "scatter_lines",
]

NOISE = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again."
"""RULER's noise haystack unit (one line of the haystack)."""

DEPTHS: tuple[int, ...] = tuple(round(100 * i / 39) for i in range(40))
"""Needle depths in percent: 40 evenly spaced values from 0 to 100, rounded (RULER's ``DEPTHS``)."""

_WS = re.compile(r"\s+")
_SENTENCE_END = re.compile(r"(?<=[.!?])\s+|(?<=[.!?][\"')\]])\s+")


def essay_words(text: str) -> list[str]:
    """The essay as a list of words (whitespace runs collapsed)."""
    words = _WS.sub(" ", text).strip().split(" ")
    words = [w for w in words if w]
    if not words:
        raise ValueError("essay haystack text is empty")
    return words


def essay_prefix(words: Sequence[str], n: int) -> str:
    """The first ``n`` words joined by spaces, cycling through the essay when it is shorter."""
    if n <= len(words):
        return " ".join(words[:n])
    reps = -(-n // len(words))
    return " ".join((list(words) * reps)[:n])


def split_sentences(text: str) -> list[str]:
    """Split text into sentences at ``.``/``!``/``?`` (optionally closing quote/bracket) + whitespace.

    A light stand-in for NLTK's Punkt ``sent_tokenize`` that RULER uses (no abbreviation handling).
    """
    text = text.strip()
    if not text:
        return []
    return [s for s in _SENTENCE_END.split(text) if s]


def insert_at_depths(sentences: Sequence[str], items: Sequence[str], rng: random.Random) -> str:
    """Insert ``items`` (in order) between sentences at distinct random depths from :data:`DEPTHS`.

    Item ``i`` goes after ``floor(len(sentences) * depth_i / 100)`` sentences, the depths sorted
    ascending; all pieces are joined with single spaces.
    """
    if len(items) > len(DEPTHS):
        raise ValueError(f"at most {len(DEPTHS)} items can be placed at distinct depths")
    n = len(sentences)
    cuts = sorted(int(n * (d / 100)) for d in rng.sample(DEPTHS, len(items)))
    bounds = [0, *cuts, n]
    pieces: list[str] = []
    for i in range(1, len(bounds)):
        pieces.append(" ".join(sentences[bounds[i - 1]:bounds[i]]))
        if i - 1 < len(items):
            pieces.append(items[i - 1])
    return " ".join(pieces)


def scatter_lines(lines: Sequence[str], items: Sequence[str], rng: random.Random) -> str:
    """Insert ``items`` among haystack ``lines`` at random distinct line positions; join with newlines.

    RULER's NIAH placement for line haystacks: positions are sampled from ``range(len(lines))``
    and the items are inserted from the last position to the first (so item order follows the
    position order reversed, which is irrelevant as the items are already shuffled).
    """
    out = list(lines)
    if len(items) > len(out):
        raise ValueError("more needles than haystack lines")
    positions = sorted(rng.sample(range(len(out)), len(items)), reverse=True)
    for pos, item in zip(positions, items):
        out.insert(pos, item)
    return "\n".join(out)
