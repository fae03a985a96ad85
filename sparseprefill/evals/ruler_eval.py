"""RULER-11, dense vs sparse: generate samples once per (task, length), answer them under every
variant, score each answer with RULER's metric, pair the scores.

Prompts use RULER's ``base`` template (the task text, no chat wrapping), fed as
``input + answer_prefix`` after the tokenizer's own special tokens (BOS); generation is greedy up
to the task's budget, as RULER's ``call_api.py`` does.
"""

from __future__ import annotations

import gzip
import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

from .harness import batched, greedy_generate
from .report import EvalReport, SampleScore, Variant, applied, run_metadata
from .ruler import RULER_11, TASK_CONFIGS, RulerSample, generate, score

__all__ = ["DEFAULT_RULER_SAMPLES", "RulerEvalOptions", "essay_tasks", "prepare_samples", "run_ruler"]

# RULER's default is 500 samples per task; 25 per task keeps a 2-length, 2-variant run of all 11
# tasks to a few minutes on one GPU while the per-length average still pools 275 paired samples.
DEFAULT_RULER_SAMPLES = 25
DEFAULT_BATCH_SIZE = 8
DEFAULT_SEED = 42  # RULER's own default seed


@dataclass(frozen=True)
class RulerEvalOptions:
    """Attributes:
        lengths: ``max_seq_length`` values (prompt + answer prefix + generation budget, in tokens).
        tasks: RULER task names (default: all of RULER-11).
        samples: samples per task and length.
        seed: generator seed (the same seed gives the same samples for a tokenizer).
        batch_size: prompts per ``generate`` call.
        haystack: prepared essay source for the essay tasks (``sparseprefill prepare-data``).
        sample_cache: a folder of generated samples (gzipped JSON per task and length): read when a
            file for the same task, length, count, seed, haystack and tokenizer exists, written
            otherwise. Lets a machine without the haystack or with slow CPUs reuse samples.
    """

    lengths: tuple[int, ...] = (4096,)
    tasks: tuple[str, ...] = RULER_11
    samples: int = DEFAULT_RULER_SAMPLES
    seed: int = DEFAULT_SEED
    batch_size: int = DEFAULT_BATCH_SIZE
    haystack: str = "paul_graham"
    sample_cache: str | None = None

    def __post_init__(self) -> None:
        unknown = [t for t in self.tasks if t not in TASK_CONFIGS]
        if unknown:
            raise ValueError(f"unknown RULER tasks {unknown}; RULER-11 is {', '.join(RULER_11)}")
        if not self.lengths or min(self.lengths) <= 0:
            raise ValueError(f"lengths must be positive, got {self.lengths}")
        if self.samples < 1 or self.batch_size < 1:
            raise ValueError("samples and batch_size must be >= 1")


def essay_tasks(tasks: Sequence[str]) -> list[str]:
    return [t for t in tasks if TASK_CONFIGS[t].get("type_haystack") == "essay"]


def _haystack(options: RulerEvalOptions) -> str | None:
    if not essay_tasks(options.tasks):
        return None
    from .data import haystack_text

    return haystack_text(options.haystack)


def _cache_key(options: RulerEvalOptions, task: str, length: int, tokenizer: Any) -> dict[str, Any]:
    essay = TASK_CONFIGS[task].get("type_haystack") == "essay"
    return {"task": task, "length": length, "samples": options.samples, "seed": options.seed,
            "haystack": options.haystack if essay else None, "tokenizer_vocab": len(tokenizer)}


def _cache_file(options: RulerEvalOptions, key: dict[str, Any]) -> Path:
    haystack = key["haystack"] or "none"
    return Path(options.sample_cache).expanduser() / (
        f"{key['task']}-{key['length']}-n{key['samples']}-seed{key['seed']}-{haystack}.json.gz")


def prepare_samples(tokenizer: Any, options: RulerEvalOptions) -> dict[tuple[str, int], list[RulerSample]]:
    """The samples of every (task, length), generated or read from ``options.sample_cache``."""
    haystack = None
    samples = {}
    for length in options.lengths:
        for task in options.tasks:
            key = _cache_key(options, task, length, tokenizer)
            path = _cache_file(options, key) if options.sample_cache else None
            if path is not None and path.is_file():
                stored = json.loads(gzip.decompress(path.read_bytes()))
                if any(stored["key"].get(name) != value for name, value in key.items()):
                    raise ValueError(f"{path} was generated for {stored['key']}, not {key}; delete it or use "
                                     "another --sample-cache")
                samples[task, length] = [RulerSample(**(s | {"outputs": tuple(s["outputs"])}))
                                         for s in stored["samples"]]
                continue
            if haystack is None and essay_tasks(options.tasks):
                haystack = _haystack(options)
            samples[task, length] = generate(task, tokenizer, length, options.samples, seed=options.seed,
                                             haystack_text=haystack)
            if path is not None:
                path.parent.mkdir(parents=True, exist_ok=True)
                payload = {"key": key, "samples": [s.to_dict() for s in samples[task, length]]}
                temporary = path.with_suffix(".tmp")
                temporary.write_bytes(gzip.compress(json.dumps(payload).encode()))
                temporary.replace(path)
    return samples


def _prompt_ids(tokenizer: Any, text: str) -> list[int]:
    return list(tokenizer(text)["input_ids"])


def run_ruler(
    model: Any,
    tokenizer: Any,
    variants: Sequence[Variant],
    options: RulerEvalOptions = RulerEvalOptions(),
    *,
    model_name: str = "model",
    progress: bool = True,
) -> EvalReport:
    """Score ``options.tasks`` at ``options.lengths`` under every variant (dense first)."""
    from tqdm.auto import tqdm

    start = time.perf_counter()
    samples = prepare_samples(tokenizer, options)
    total = len(variants) * sum(len(v) for v in samples.values())
    scores: list[SampleScore] = []
    with tqdm(total=total, desc="RULER", unit="sample", disable=not progress) as bar:
        for variant in variants:
            with applied(model, variant) as meter:
                for (task, length), task_samples in samples.items():
                    bar.set_postfix_str(f"{variant.name} {task} {length}")
                    for batch in batched(task_samples, options.batch_size):
                        meter.reset()
                        prompts = [_prompt_ids(tokenizer, s.prompt) for s in batch]
                        answers = greedy_generate(model, tokenizer, prompts, batch[0].max_new_tokens)
                        density, _ = meter.read()
                        for sample, answer in zip(batch, answers):
                            scores.append(SampleScore(
                                task=task, length=length, index=sample.index, variant=variant.name,
                                score=score(task, [answer], [sample]), density=density, prediction=answer,
                                extra={"outputs": list(sample.outputs)},
                            ))
                        bar.update(len(batch))
    meta = run_metadata(model) | {
        "seconds": round(time.perf_counter() - start, 1),
        "ruler": {"tasks": list(options.tasks), "lengths": list(options.lengths), "samples": options.samples,
                  "seed": options.seed, "batch_size": options.batch_size,
                  "haystack": options.haystack if essay_tasks(options.tasks) else None,
                  "suite": "RULER-11" if tuple(options.tasks) == RULER_11 else "RULER subset",
                  "template": "base (no chat template)"},
    }
    return EvalReport(kind="ruler", model=model_name, variants=list(variants), samples=scores,
                      metric="RULER score (0-100)", meta=meta)
