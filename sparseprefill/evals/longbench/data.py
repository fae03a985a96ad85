"""Reading THUDM's LongBench ``{task}.jsonl`` files into checked :class:`LongBenchSample` records."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from .tasks import LongBenchTask, get_task

__all__ = ["LongBenchDataError", "LongBenchSample", "load_task"]


class LongBenchDataError(ValueError):
    """A LongBench ``.jsonl`` file is missing, malformed or lacks a field."""


@dataclass(frozen=True)
class LongBenchSample:
    """One line of a THUDM LongBench ``{task}.jsonl`` file.

    ``answers`` and ``all_classes`` are tuples so that a sample stays hashable and immutable;
    ``id`` is the file's ``_id``.
    """

    input: str
    context: str
    answers: tuple[str, ...]
    length: int
    dataset: str
    language: str
    all_classes: tuple[str, ...] | None
    id: str


def _is_str_list(value: Any) -> bool:
    return isinstance(value, list) and all(isinstance(item, str) for item in value)


# field -> (check, description used in the error message)
_FIELD_CHECKS: dict[str, tuple[Callable[[Any], bool], str]] = {
    "input": (lambda v: isinstance(v, str), "a string"),
    "context": (lambda v: isinstance(v, str), "a string"),
    "answers": (lambda v: _is_str_list(v) and len(v) > 0, "a non-empty list of strings"),
    "length": (lambda v: isinstance(v, int) and not isinstance(v, bool), "an integer"),
    "dataset": (lambda v: isinstance(v, str), "a string"),
    "language": (lambda v: isinstance(v, str), "a string"),
    "all_classes": (lambda v: v is None or _is_str_list(v), "null or a list of strings"),
    "_id": (lambda v: isinstance(v, str), "a string"),
}


def _parse_line(record: Any, where: str) -> LongBenchSample:
    if not isinstance(record, dict):
        raise LongBenchDataError(f"{where}: expected a JSON object, got {type(record).__name__}")
    missing = [name for name in _FIELD_CHECKS if name not in record]
    if missing:
        raise LongBenchDataError(f"{where}: missing field(s) {', '.join(missing)}")
    for name, (check, description) in _FIELD_CHECKS.items():
        if not check(record[name]):
            raise LongBenchDataError(
                f"{where}: field {name!r} must be {description}, got {record[name]!r:.80}"
            )
    all_classes = record["all_classes"]
    return LongBenchSample(
        input=record["input"],
        context=record["context"],
        answers=tuple(record["answers"]),
        length=record["length"],
        dataset=record["dataset"],
        language=record["language"],
        all_classes=None if all_classes is None else tuple(all_classes),
        id=record["_id"],
    )


def load_task(data_dir: str | Path, task: str | LongBenchTask) -> list[LongBenchSample]:
    """Read ``{data_dir}/{task}.jsonl`` in THUDM's layout (the ``data.zip`` of LongBench v1).

    Blank lines are skipped; anything else that is not a complete sample raises
    :class:`LongBenchDataError` naming the file and the 1-based line, because a silently dropped
    or half-read sample would shift every score computed from the file.
    """
    spec = get_task(task)
    path = Path(data_dir) / f"{spec.name}.jsonl"
    if not path.is_file():
        raise LongBenchDataError(f"LongBench file not found: {path}")
    samples = []
    with path.open(encoding="utf-8") as handle:
        for number, line in enumerate(handle, start=1):
            if not line.strip():
                continue
            where = f"{path}:{number}"
            try:
                record = json.loads(line)
            except json.JSONDecodeError as error:
                raise LongBenchDataError(f"{where}: invalid JSON ({error.msg})") from None
            samples.append(_parse_line(record, where))
    if not samples:
        raise LongBenchDataError(f"{path}: no samples")
    return samples
