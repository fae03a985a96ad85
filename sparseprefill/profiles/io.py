"""Profile files as JSON text: the strict parser (``parse_profile_json``) and the readable layout
``save_profile`` writes (``_dumps``). Turning the parsed JSON into a ``Profile`` is ``schema``'s job.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Mapping
from typing import Any

from .fields import ProfileError

__all__ = ["parse_profile_json"]


def _reject_constant(name: str) -> Any:
    raise ValueError(f"non-finite number {name} (JSON has no NaN/Infinity; profiles must hold finite numbers)")


def _parse_float(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):  # 1e999 parses to inf
        raise ValueError(f"number {text} overflows a double")
    return value


def _no_duplicate_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in pairs:
        if key in out:  # json would silently keep the last one
            raise ValueError(f"duplicate key {key!r} in one JSON object")
        out[key] = value
    return out


def parse_profile_json(text: str, source: str) -> Any:
    """Strict JSON parse: NaN/Infinity literals, overflowing numbers and duplicate keys are errors.

    Errors raise ProfileError naming ``source`` and, where the decoder knows it, the position.
    """
    try:
        return json.loads(text, parse_constant=_reject_constant, parse_float=_parse_float, object_pairs_hook=_no_duplicate_keys)
    except json.JSONDecodeError as exc:
        raise ProfileError(source, f"invalid JSON at line {exc.lineno} column {exc.colno} (char {exc.pos}): {exc.msg}") from None
    except (ValueError, RecursionError) as exc:
        raise ProfileError(source, f"invalid JSON: {exc}") from None


def _read_json_file(path: str | os.PathLike[str]) -> Any:
    name = os.fspath(path)
    expected = "expected a profile JSON file (sparseprefill profile ... --out FILE, or shipped_profile(name))"
    if os.path.isdir(name):
        raise ProfileError(name, f"is a directory; {expected}")
    try:
        with open(name, "rb") as f:
            raw = f.read()
        text = raw.decode("utf-8")
    except FileNotFoundError:
        raise ProfileError(name, f"no such file; {expected}") from None
    except PermissionError:
        raise ProfileError(name, f"not readable (permission denied); {expected}") from None
    except UnicodeDecodeError as exc:
        raise ProfileError(name, f"not UTF-8 text (byte {exc.start}): {exc.reason}") from None
    return parse_profile_json(text, name)



def _dumps(data: Mapping[str, Any]) -> str:
    """Indented JSON, one field or head per line: readable, and diffs show which heads changed."""

    def compact(value: Any) -> str:
        return json.dumps(value, allow_nan=False, separators=(", ", ": "))

    def block(lines: list[str], indent: str) -> str:
        return "[\n" + ",\n".join(lines) + f"\n{indent}]" if lines else "[]"

    entries = []
    for key, value in data.items():
        if key == "decode":
            body = block(["    " + compact(entry) for entry in value], "  ")
        elif key == "layers":
            rendered = [
                "    " + block(["      " + compact(head) for head in layer], "    ") for layer in value
            ]
            body = block(rendered, "  ")
        elif isinstance(value, Mapping) and value:
            body = "{\n" + ",\n".join(f"    {json.dumps(k)}: {compact(v)}" for k, v in value.items()) + "\n  }"
        else:
            body = compact(value)
        entries.append(f"  {json.dumps(key)}: {body}")
    return "{\n" + ",\n".join(entries) + "\n}\n"
