"""Evaluation harnesses: dense vs sparse on identical samples, offline.

- ``evals.ruler``: the RULER-11 synthetic tasks, generated offline for a given tokenizer, and RULER's
  scoring; ``evals.ruler_eval.run_ruler`` answers them dense and sparse.
- ``evals.longbench``: LongBench (v1) task table, THUDM-format loading, prompt building with
  LongBench's middle truncation, and LongBench's own metrics; ``evals.longbench_eval`` runs them.
- ``evals.perplexity``: long-text perplexity with the LM head applied in chunks.
- ``evals.fidelity_eval``: per layer/head attention recall and output error, logit KL and top-1.
- ``evals.data``: ``prepare-data``, public long texts (essay haystacks) fetched into a local cache.
- ``evals.lm_eval_model``: the ``sparseprefill`` model for lm-evaluation-harness.
- ``evals.paired`` / ``evals.report``: paired bootstrap deltas, and the JSON / markdown / PNG reports.

Command line: ``sparseprefill eval ruler|longbench|ppl|fidelity`` and ``sparseprefill prepare-data``.
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
from .paired import PairedDelta, paired_bootstrap
from .report import DENSE, EvalReport, SampleScore, Variant

__all__ = [
    "DENSE",
    "EvalReport",
    "LONGBENCH_TASKS",
    "LongBenchDataError",
    "LongBenchSample",
    "LongBenchTask",
    "PairedDelta",
    "SampleScore",
    "Variant",
    "build_longbench_prompt",
    "load_longbench_task",
    "paired_bootstrap",
    "score_longbench_task",
]
