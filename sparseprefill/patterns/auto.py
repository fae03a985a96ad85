"""The default: antidiagonal scoring with a per-row cumulative mass threshold.

Why this and not a pattern-type test: it needs no profile; every query block is scored (not only
the last 64 queries), so it stays valid for chunked prefill, follow-up turns and prompts whose
questions sit mid-context; the mass threshold gives each head and each row the budget its own
distribution needs (a dense head stays dense, a streaming head shrinks to sink + diagonal); and it
produces one block-sparse index, the layout GPU kernels run fastest. Its estimate costs 1/stride of
Q K^T. XAttention reports RULER accuracy on par with dense for this rule at threshold 0.9-0.95.
"""

from __future__ import annotations

from ..config import PatternName
from .antidiagonal import AntidiagonalPattern


class AutoPattern(AntidiagonalPattern):
    name = PatternName.AUTO
