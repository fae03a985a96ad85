"""Which parameters each pattern takes in a profile, their value domains and the ``SparseConfig``
fields they set (``PATTERN_PARAMS``), and the checks of a head's pattern, parameters and
``measured`` data.
"""

from __future__ import annotations

import enum
import json
import re
import types
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from ..config import PatternName
from .fields import (
    ProfileError,
    _join,
    _req_fraction,
    _req_int,
    _req_object,
    _show,
    _type_name,
)

__all__ = [
    "ALLOWED_PATTERNS",
    "MEASURED_KEYS",
    "PATTERN_CONFIG_SECTION",
    "PATTERN_PARAMS",
    "ParamKind",
    "ParamSpec",
]

# Keys of ``measured`` maps are token lengths written as canonical decimal strings ("4096"):
# JSON object keys must be strings, and one spelling per length keeps round trips exact.
_LENGTH_KEY_RE = re.compile(r"[1-9][0-9]*")


class ParamKind(str, enum.Enum):
    """Value domains of head parameters."""

    FRACTION = "fraction"  # [0, 1]
    POSITIVE_FRACTION = "positive_fraction"  # (0, 1]
    COUNT = "count"  # integer >= 0
    POSITIVE_COUNT = "positive_count"  # integer >= 1
    OPTIONAL_POSITIVE_COUNT = "optional_positive_count"  # integer >= 1, or null for "no cap"


@dataclass(frozen=True)
class ParamSpec:
    """One allowed head parameter: its domain, whether a profile must give it, and the field of the
    pattern's sub-config (``SparseConfig.<section>.<config_field>``) it sets."""

    kind: ParamKind
    required: bool
    config_field: str


# The SparseConfig section each pattern's parameters live in (dense has none).
PATTERN_CONFIG_SECTION: Mapping[PatternName, str] = types.MappingProxyType({
    PatternName.VERTICAL_SLASH: "vertical_slash",
    PatternName.BLOCK_SPARSE: "block_sparse",
    PatternName.ANTIDIAGONAL: "antidiagonal",
    PatternName.A_SHAPE: "a_shape",
})

# Vertical/slash masses may be 0: "keep only the always-kept sink columns / local diagonals" is a
# real setting (MInference heads with vertical_size 30 keep exactly their 30 sink columns). Block
# masses may not: a block mass of 0 keeps only the sink and diagonal blocks, which a profile writes
# as a_shape; a 0 there is far likelier a failed calibration than an intent. For the same reason
# top_k must be >= 1 although BlockSparseConfig accepts 0.
PATTERN_PARAMS: Mapping[PatternName, Mapping[str, ParamSpec]] = types.MappingProxyType({
    PatternName.VERTICAL_SLASH: types.MappingProxyType({
        "vertical_mass": ParamSpec(ParamKind.FRACTION, True, "vertical_mass"),
        "slash_mass": ParamSpec(ParamKind.FRACTION, True, "slash_mass"),
        "max_vertical": ParamSpec(ParamKind.OPTIONAL_POSITIVE_COUNT, False, "max_vertical"),
        "max_slash": ParamSpec(ParamKind.OPTIONAL_POSITIVE_COUNT, False, "max_slash"),
        "sink_tokens": ParamSpec(ParamKind.COUNT, False, "sink_tokens"),
        "local_tokens": ParamSpec(ParamKind.POSITIVE_COUNT, False, "local_tokens"),
    }),
    PatternName.BLOCK_SPARSE: types.MappingProxyType({
        "mass": ParamSpec(ParamKind.POSITIVE_FRACTION, True, "mass"),
        "top_k": ParamSpec(ParamKind.OPTIONAL_POSITIVE_COUNT, False, "top_k"),
    }),
    PatternName.ANTIDIAGONAL: types.MappingProxyType({
        "mass": ParamSpec(ParamKind.POSITIVE_FRACTION, True, "mass"),
    }),
    PatternName.A_SHAPE: types.MappingProxyType({
        "sink_tokens": ParamSpec(ParamKind.COUNT, True, "sink_tokens"),
        "local_tokens": ParamSpec(ParamKind.POSITIVE_COUNT, True, "local_tokens"),
    }),
    PatternName.DENSE: types.MappingProxyType({}),
})

# ``auto`` decides per head at run time; a profile is the explicit alternative, so it is excluded.
ALLOWED_PATTERNS: tuple[PatternName, ...] = tuple(PATTERN_PARAMS)
assert PatternName.AUTO not in ALLOWED_PATTERNS

MEASURED_KEYS = ("recall", "recall_p5", "density")


def _check_param(kind: ParamKind, value: Any, path: str) -> Any:
    if kind is ParamKind.FRACTION:
        return _req_fraction(value, path, allow_zero=True)
    if kind is ParamKind.POSITIVE_FRACTION:
        return _req_fraction(value, path, allow_zero=False)
    if kind is ParamKind.COUNT:
        return _req_int(value, path, 0)
    if kind is ParamKind.POSITIVE_COUNT:
        return _req_int(value, path, 1)
    if value is None:
        return None
    return _req_int(value, path, 1)


def _check_pattern(value: Any, path: str) -> PatternName:
    allowed = ", ".join(repr(p.value) for p in ALLOWED_PATTERNS)
    if isinstance(value, PatternName):
        name = value
    elif isinstance(value, str):
        try:
            name = PatternName(value)
        except ValueError:
            raise ProfileError(path, f"unknown pattern {value!r}; allowed: {allowed}") from None
    else:
        raise ProfileError(path, f"must be a pattern name string, got {_type_name(value)} {_show(value)}")
    if name is PatternName.AUTO:
        raise ProfileError(
            path, f"'auto' is not allowed in a profile (a profile names each head's pattern); allowed: {allowed}"
        )
    return name


def _check_params(pattern: PatternName, params: Any, path: str) -> Mapping[str, Any]:
    params = _req_object(params, path)
    specs = PATTERN_PARAMS[pattern]
    for key in params:
        if key not in specs:
            listed = ", ".join(repr(k) for k in specs) or "none"
            raise ProfileError(_join(path, key), f"unknown parameter for pattern {pattern.value!r} (allowed: {listed})")
    out: dict[str, Any] = {}
    for key, spec in specs.items():  # spec order: one canonical order for files and for key()
        if key in params:
            out[key] = _check_param(spec.kind, params[key], _join(path, key))
        elif spec.required:
            raise ProfileError(_join(path, key), f"missing (required for pattern {pattern.value!r})")
    return types.MappingProxyType(out)


def _check_measured(measured: Any, path: str) -> Mapping[str, Mapping[str, float]] | None:
    if measured is None:
        return None
    measured = _req_object(measured, path)
    for key in measured:
        if key not in MEASURED_KEYS:
            listed = ", ".join(repr(k) for k in MEASURED_KEYS)
            raise ProfileError(path, f"unknown key {key!r} (allowed: {listed})")
    out: dict[str, Mapping[str, float]] = {}
    for key in MEASURED_KEYS:
        if key not in measured:
            continue
        sub_path = f"{path}.{key}"
        per_length = _req_object(measured[key], sub_path)
        values: dict[str, float] = {}
        for length in per_length:
            item_path = f"{sub_path}[{json.dumps(length)}]"
            if not _LENGTH_KEY_RE.fullmatch(length):
                raise ProfileError(item_path, "keys must be token lengths as decimal strings, e.g. \"4096\"")
            values[length] = _req_fraction(per_length[length], item_path, allow_zero=True)
        out[key] = types.MappingProxyType(dict(sorted(values.items(), key=lambda kv: int(kv[0]))))
    return types.MappingProxyType(out)
