"""LongBench (v1), dense vs sparse, from local THUDM-format files.

Per task, as LongBench's ``pred.py``: fill the task's template, middle-truncate to
``max_prompt_tokens``, wrap in the chat template except on the few-shot/code tasks, generate
greedily up to the task's budget; score with the task's metric (``eval.py``). Scores are per sample
in 0-100 so the paired deltas read in LongBench's units.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

from .harness import batched, greedy_generate
from .longbench import (
    TASK_NAMES,
    apply_chat_template,
    build_prompt,
    get_task,
    load_task,
    score_sample,
    uses_chat_template,
)
from .report import EvalReport, SampleScore, Variant, applied, run_metadata

__all__ = ["LongBenchEvalOptions", "available_tasks", "run_longbench"]

# LongBench's pred.py truncates to the model's window minus the generation budget; 3,500 tokens
# is its setting for 4K-context chat models, and a safe default for the small models here.
DEFAULT_MAX_PROMPT_TOKENS = 3500
DEFAULT_SAMPLES = 50
DEFAULT_BATCH_SIZE = 4


@dataclass(frozen=True)
class LongBenchEvalOptions:
    """Attributes:
        data_dir: folder holding THUDM's ``{task}.jsonl`` files (``data.zip`` unpacked).
        tasks: task names; empty = every LongBench task whose file exists in ``data_dir``.
        max_prompt_tokens: middle-truncation budget (``max_length`` in LongBench's ``config/model2maxlen``).
        samples: at most this many samples per task (file order: the same samples every run).
        batch_size: prompts per ``generate`` call.
    """

    data_dir: str
    tasks: tuple[str, ...] = ()
    max_prompt_tokens: int = DEFAULT_MAX_PROMPT_TOKENS
    samples: int = DEFAULT_SAMPLES
    batch_size: int = DEFAULT_BATCH_SIZE


def available_tasks(data_dir: str | Path) -> list[str]:
    folder = Path(data_dir).expanduser()
    if not folder.is_dir():
        raise FileNotFoundError(f"LongBench data folder {str(folder)!r} does not exist; unpack THUDM's data.zip "
                                "(data/{task}.jsonl) there")
    return [name for name in TASK_NAMES if (folder / f"{name}.jsonl").is_file()]


def _encode(tokenizer: Any, task: str, prompt: str) -> list[int]:
    text = apply_chat_template(task, prompt, tokenizer)
    # The chat text carries the template's own BOS; adding special tokens again would double it.
    return list(tokenizer(text, add_special_tokens=not uses_chat_template(task, tokenizer))["input_ids"])


def run_longbench(
    model: Any,
    tokenizer: Any,
    variants: Sequence[Variant],
    options: LongBenchEvalOptions,
    *,
    model_name: str = "model",
    progress: bool = True,
) -> EvalReport:
    """Score LongBench tasks under every variant (dense first); ``length`` in rows is the truncation budget."""
    from tqdm.auto import tqdm

    start = time.perf_counter()
    tasks = list(options.tasks) or available_tasks(options.data_dir)
    if not tasks:
        raise FileNotFoundError(f"no LongBench task files ({{task}}.jsonl) in {options.data_dir!r}")
    prepared = {}
    for task in tasks:
        samples = load_task(options.data_dir, task)[: options.samples]
        prepared[task] = [(s, _encode(tokenizer, task, build_prompt(task, s, tokenizer, options.max_prompt_tokens)))
                          for s in samples]
    total = len(variants) * sum(len(v) for v in prepared.values())
    scores: list[SampleScore] = []
    with tqdm(total=total, desc="LongBench", unit="sample", disable=not progress) as bar:
        for variant in variants:
            with applied(model, variant) as meter:
                for task, items in prepared.items():
                    bar.set_postfix_str(f"{variant.name} {task}")
                    spec = get_task(task)
                    for index0, batch in enumerate(batched(items, options.batch_size)):
                        meter.reset()
                        answers = greedy_generate(model, tokenizer, [ids for _, ids in batch], spec.max_new_tokens)
                        density, _ = meter.read()
                        for offset, ((sample, ids), answer) in enumerate(zip(batch, answers)):
                            scores.append(SampleScore(
                                task=task, length=options.max_prompt_tokens,
                                index=index0 * options.batch_size + offset, variant=variant.name,
                                score=100.0 * score_sample(task, answer, sample), density=density,
                                prediction=answer, extra={"prompt_tokens": len(ids)},
                            ))
                        bar.update(len(batch))
    meta = run_metadata(model) | {
        "seconds": round(time.perf_counter() - start, 1),
        "longbench": {"data_dir": str(options.data_dir), "tasks": tasks, "samples": options.samples,
                      "max_prompt_tokens": options.max_prompt_tokens, "batch_size": options.batch_size},
    }
    return EvalReport(kind="longbench", model=model_name, variants=list(variants), samples=scores,
                      metric="LongBench score (0-100)", meta=meta)
