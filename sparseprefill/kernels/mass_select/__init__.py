"""Selection by cumulative mass, shared by the vertical-slash lines and the block-sparse blocks."""

from __future__ import annotations

from .naive import KEEP_ALL_MASS, keep_by_cumulative_mass

__all__ = ["KEEP_ALL_MASS", "keep_by_cumulative_mass"]
