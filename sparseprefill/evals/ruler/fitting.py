"""Fitting a sample to a token budget: counting tokens, and the largest haystack size whose prompt
fits (the task-level search and the per-sample re-fit described in :mod:`.tasks`).
"""

from __future__ import annotations

import random
from collections.abc import Callable
from typing import Any

__all__ = ["count_tokens_fn"]

# A built sample: (input, answer_prefix, outputs).
_Built = tuple[str, str, list[str]]


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
