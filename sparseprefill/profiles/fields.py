"""``ProfileError`` and the small field validators every part of the profile format is checked with.

Each ``_req_*`` validator raises ``ProfileError(path, ...)`` naming the exact place of the problem
and returns the normalised value; ``schema``, ``params``, ``identity`` and ``minference`` share them.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

__all__ = ["ProfileError"]

# Error messages quote offending values; a fuzzed or corrupted file can hold huge ones.
_MAX_SHOWN_CHARS = 60


class ProfileError(ValueError):
    """A malformed profile (or MInference file). ``path`` names the exact place of the problem."""

    def __init__(self, path: str, problem: str, source: str | None = None):
        self.path = path
        self.problem = problem
        self.source = source
        suffix = f" (in {source})" if source else ""
        super().__init__(f"{path}: {problem}{suffix}")

    def __reduce__(self):  # keep picklable across processes despite the 3-argument constructor
        return (type(self), (self.path, self.problem, self.source))


# ----------------------------------------------------------------------------------------------
# Small validators. Each raises ProfileError(path, ...) and returns the normalised value.
# ----------------------------------------------------------------------------------------------


def _show(value: Any) -> str:
    text = repr(value)
    if len(text) > _MAX_SHOWN_CHARS:
        text = text[: _MAX_SHOWN_CHARS - 3] + "..."
    return f"{type(value).__name__} {text}" if isinstance(value, bool) else text


def _type_name(value: Any) -> str:
    # JSON vocabulary for JSON values, Python's for anything else that slipped into a dict source.
    names = {dict: "object", list: "array", str: "string", bool: "boolean", type(None): "null",
             int: "integer", float: "number", tuple: "array"}
    return names.get(type(value), type(value).__name__)


def _req_int(value: Any, path: str, minimum: int) -> int:
    # bool is a subclass of int in Python; ``true`` where a count belongs is a bug, not 1.
    if isinstance(value, bool) or not isinstance(value, int):
        raise ProfileError(path, f"must be an integer >= {minimum}, got {_type_name(value)} {_show(value)}")
    if value < minimum:
        raise ProfileError(path, f"must be an integer >= {minimum}, got {value}")
    return int(value)


def _req_number(value: Any, path: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ProfileError(path, f"must be a number, got {_type_name(value)} {_show(value)}")
    value = float(value)
    if not math.isfinite(value):
        raise ProfileError(path, f"must be a finite number, got {value!r}")
    return value


def _req_fraction(value: Any, path: str, *, allow_zero: bool) -> float:
    number = _req_number(value, path)
    lower_ok = number >= 0.0 if allow_zero else number > 0.0
    if not (lower_ok and number <= 1.0):
        raise ProfileError(path, f"must be in {'[0, 1]' if allow_zero else '(0, 1]'}, got {number!r}")
    return number


def _req_str(value: Any, path: str, *, allow_empty: bool = False) -> str:
    if not isinstance(value, str):
        raise ProfileError(path, f"must be a string, got {_type_name(value)} {_show(value)}")
    if not allow_empty and not value.strip():
        raise ProfileError(path, "must be a non-empty string")
    return value


def _req_object(value: Any, path: str) -> Mapping[str, Any]:
    if not isinstance(value, Mapping):
        raise ProfileError(path, f"must be an object, got {_type_name(value)} {_show(value)}")
    for key in value:
        if not isinstance(key, str):
            raise ProfileError(path, f"object keys must be strings, got {_type_name(key)} {_show(key)}")
    return value


def _req_array(value: Any, path: str) -> Sequence[Any]:
    if isinstance(value, (str, bytes)) or not isinstance(value, (list, tuple)):
        raise ProfileError(path, f"must be an array, got {_type_name(value)} {_show(value)}")
    return value


def _check_keys(obj: Mapping[str, Any], path: str, required: Sequence[str], optional: Sequence[str] = ()) -> None:
    for key in required:
        if key not in obj:
            raise ProfileError(_join(path, key), "missing (required)")
    allowed = (*required, *optional)
    for key in obj:
        if key not in allowed:
            listed = ", ".join(repr(k) for k in allowed) or "none"
            raise ProfileError(path or "<profile>", f"unknown key {key!r} (allowed: {listed})")


def _join(path: str, key: str) -> str:
    return f"{path}.{key}" if path else key
