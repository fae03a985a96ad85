"""The default: vertical-slash with per-head mass budgets (MInference's estimate, FlexPrefill's rule).

Each head's last queries score every key; the head keeps its sink columns and local diagonals, then
columns and diagonals in decreasing estimated mass until 95% of that mass is covered, so each head
(and each length) gets the budget its own distribution needs: a diffuse head keeps many lines, a
streaming head little more than sink and window. No profile is needed.

Why this and not XAttention's antidiagonal threshold (the first default): on real SmolLM2-135M
q/k at 8K (experiments/estimator_study.py, 9 of 30 layers, every head) the antidiagonal rule at
threshold 0.95 kept 0.914 of the true attention mass on average (one head's 5th-percentile row
0.09), because averaging S logits dilutes sharp key spikes, while this rule at 0.95 kept 0.973
(worst head p5 0.64) at density 0.47. End to end at 8K the antidiagonal default gave next-token KL
0.152 against dense, this rule 0.018. Its estimate also costs only O(64 L D) per head, which keeps
estimation cheap at 128K.
"""

from __future__ import annotations

from ..config import PatternName
from .vertical_slash import VerticalSlashPattern


class AutoPattern(VerticalSlashPattern):
    name = PatternName.AUTO
