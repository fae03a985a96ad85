"""Evaluation harnesses (long-context benchmarks) for sparse prefill.

``evals.ruler``: the RULER-11 synthetic tasks, generated offline for a given tokenizer, and RULER's
scoring. ``evals.longbench``: LongBench (v1) task table, THUDM-format loading, prompt building with
LongBench's middle truncation, and LongBench's own metrics.
"""

from .longbench import (
    TASKS as LONGBENCH_TASKS,
    LongBenchDataError,
    LongBenchSample,
    LongBenchTask,
    build_prompt as build_longbench_prompt,
    load_task as load_longbench_task,
    score_task as score_longbench_task,
)

__all__ = [
    "LONGBENCH_TASKS",
    "LongBenchDataError",
    "LongBenchSample",
    "LongBenchTask",
    "build_longbench_prompt",
    "load_longbench_task",
    "score_longbench_task",
]
