"""The versioned per-head profile format: which pattern, with which budgets, every head runs.

A profile is a JSON file (never pickle: it is data that people share, and loading it must not run
code). ``load_profile`` is the authoritative validator: every field is checked, and every problem
raises ``ProfileError`` whose message begins with the exact path of the problem, e.g.
``layers[3][7].vertical_mass: must be in [0, 1], got 1.5``. ``profile.schema.json`` next to this
module describes the same format for editors and other tools; a test keeps the two in step.

Example (one layer of two heads)::

    {
      "format": "sparseprefill-profile",
      "version": 1,
      "model": {"architecture": "LlamaForCausalLM", "model_type": "llama", "num_layers": 1,
                "num_query_heads": 2, "num_kv_heads": 1, "head_dim": 64,
                "fingerprint": "sha256:..."},
      "calibration": {"source": "pg19", "lengths": [4096, 16384], "samples": 8,
                      "objective": "attention_mass_recall", "target": 0.95,
                      "tool_version": "0.1.0", "date": "2025-01-31"},
      "layers": [
        [
          {"pattern": "vertical_slash", "vertical_mass": 0.9, "slash_mass": 0.95,
           "measured": {"recall": {"4096": 0.97}, "density": {"4096": 0.12}}},
          {"pattern": "a_shape", "sink_tokens": 128, "local_tokens": 3968}
        ]
      ]
    }

No transformers import: model configs are duck-typed objects with attributes.
"""

from __future__ import annotations

import dataclasses
import datetime
import enum
import hashlib
import json
import math
import os
import re
import types
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..config import PatternName, SparseConfig

__all__ = [
    "LayerDecodeSetting",
    "PROFILE_FORMAT",
    "PROFILE_VERSION",
    "PROFILE_SCHEMA_PATH",
    "ALLOWED_PATTERNS",
    "PATTERN_PARAMS",
    "MEASURED_KEYS",
    "ParamKind",
    "ParamSpec",
    "ProfileError",
    "ProfileMismatchError",
    "ProfileMismatchWarning",
    "ModelIdentity",
    "Calibration",
    "HeadSetting",
    "Profile",
    "model_identity",
    "load_profile",
    "save_profile",
    "parse_profile_json",
    "check_profile_matches",
]

PROFILE_FORMAT = "sparseprefill-profile"
PROFILE_VERSION = 1

# Shipped as package data (pyproject.toml) so editors and other tools can find it next to the code.
PROFILE_SCHEMA_PATH = Path(__file__).with_name("profile.schema.json")

FINGERPRINT_PREFIX = "sha256:"
_FINGERPRINT_RE = re.compile(r"sha256:[0-9a-f]{64}")
_ISO_DATE_RE = re.compile(r"[0-9]{4}-[0-9]{2}-[0-9]{2}")
# Keys of ``measured`` maps are token lengths written as canonical decimal strings ("4096"):
# JSON object keys must be strings, and one spelling per length keeps round trips exact.
_LENGTH_KEY_RE = re.compile(r"[1-9][0-9]*")

# Error messages quote offending values; a fuzzed or corrupted file can hold huge ones.
_MAX_SHOWN_CHARS = 60

# The rope type transformers assumes when none is named; dropped from the fingerprint so that a
# config that spells it out and one that leaves it implicit fingerprint the same.
_DEFAULT_ROPE_TYPE = "default"


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


class ProfileMismatchError(ValueError):
    """A well-formed profile that does not fit the model it is applied to."""


class ProfileMismatchWarning(UserWarning):
    """A profile applied to a model that differs from its own, because ``allow_mismatch=True``."""


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


# ----------------------------------------------------------------------------------------------
# Per-pattern parameters
# ----------------------------------------------------------------------------------------------


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

MEASURED_KEYS = ("recall", "density")

# Keys a head object holds besides its parameters.
_HEAD_PATTERN_KEY = "pattern"
_HEAD_MEASURED_KEY = "measured"


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


# ----------------------------------------------------------------------------------------------
# The dataclasses
# ----------------------------------------------------------------------------------------------

_MODEL_FIELDS = ("architecture", "model_type", "num_layers", "num_query_heads", "num_kv_heads", "head_dim", "fingerprint")
# Fields that decide the shape of ``Profile.layers``: a profile can never be applied across them.
_LAYOUT_FIELDS = ("num_layers", "num_query_heads")


@dataclass(frozen=True)
class ModelIdentity:
    """What a profile was made for. ``architecture`` may be "" (configs built in code name none)."""

    architecture: str
    model_type: str
    num_layers: int
    num_query_heads: int
    num_kv_heads: int
    head_dim: int
    fingerprint: str

    def __post_init__(self) -> None:
        p = "model"
        _req_str(self.architecture, f"{p}.architecture", allow_empty=True)
        _req_str(self.model_type, f"{p}.model_type")
        for name in ("num_layers", "num_query_heads", "num_kv_heads", "head_dim"):
            _req_int(getattr(self, name), f"{p}.{name}", 1)
        if self.num_query_heads % self.num_kv_heads:
            raise ProfileError(
                f"{p}.num_kv_heads",
                f"must divide num_query_heads ({self.num_query_heads}), got {self.num_kv_heads}",
            )
        _req_str(self.fingerprint, f"{p}.fingerprint")
        if not _FINGERPRINT_RE.fullmatch(self.fingerprint):
            raise ProfileError(
                f"{p}.fingerprint", f"must be 'sha256:' and 64 lowercase hex digits, got {_show(self.fingerprint)}"
            )

    def to_dict(self) -> dict[str, Any]:
        return {name: getattr(self, name) for name in _MODEL_FIELDS}


_CALIBRATION_FIELDS = ("source", "lengths", "samples", "objective", "target", "tool_version", "date")


@dataclass(frozen=True)
class Calibration:
    """How the profile was measured.

    Attributes:
        source: the text the calibration prompts came from (a data set name, a file, "minference:...").
        lengths: the prompt lengths (tokens) the settings were chosen at; non-empty.
        samples: prompts per length (0 for imported profiles that measured nothing themselves).
        objective: what the settings optimise, e.g. "attention_mass_recall".
        target: the objective's target value, in (0, 1].
        tool_version: the sparseprefill version that wrote the profile.
        date: ISO date (yyyy-mm-dd) the profile was written.
    """

    source: str
    lengths: tuple[int, ...]
    samples: int
    objective: str
    target: float
    tool_version: str
    date: str

    def __post_init__(self) -> None:
        p = "calibration"
        _req_str(self.source, f"{p}.source")
        lengths = _req_array(self.lengths, f"{p}.lengths")
        if not lengths:
            raise ProfileError(f"{p}.lengths", "must be a non-empty array of token lengths")
        seen: dict[int, int] = {}
        for i, length in enumerate(lengths):
            value = _req_int(length, f"{p}.lengths[{i}]", 1)
            if value in seen:
                raise ProfileError(f"{p}.lengths[{i}]", f"duplicate of lengths[{seen[value]}] ({value})")
            seen[value] = i
        object.__setattr__(self, "lengths", tuple(int(x) for x in lengths))
        _req_int(self.samples, f"{p}.samples", 0)
        _req_str(self.objective, f"{p}.objective")
        object.__setattr__(self, "target", _req_fraction(self.target, f"{p}.target", allow_zero=False))
        _req_str(self.tool_version, f"{p}.tool_version")
        _req_str(self.date, f"{p}.date")
        try:
            if not _ISO_DATE_RE.fullmatch(self.date):
                raise ValueError
            datetime.date.fromisoformat(self.date)
        except ValueError:
            raise ProfileError(f"{p}.date", f"must be an ISO date yyyy-mm-dd, got {_show(self.date)}") from None

    def to_dict(self) -> dict[str, Any]:
        out = {name: getattr(self, name) for name in _CALIBRATION_FIELDS}
        out["lengths"] = list(self.lengths)
        return out


@dataclass(frozen=True)
class HeadSetting:
    """One head's pattern and budgets.

    ``params`` holds only what the profile states; parameters it leaves out keep the values of the
    ``SparseConfig`` passed to ``to_config`` (SparseConfig's defaults unless the caller changed them).
    ``measured`` is informational data from the profiler: ``{"recall": {"4096": 0.97}, "density":
    {...}}``; nothing reads it to decide how to run.
    """

    pattern: PatternName
    params: Mapping[str, Any] = dataclasses.field(default_factory=dict)
    measured: Mapping[str, Mapping[str, float]] | None = None

    def __post_init__(self) -> None:
        self._validate("head")

    def _validate(self, path: str) -> None:
        pattern = _check_pattern(self.pattern, _join(path, _HEAD_PATTERN_KEY))
        object.__setattr__(self, "pattern", pattern)
        object.__setattr__(self, "params", _check_params(pattern, self.params, path))
        object.__setattr__(self, "measured", _check_measured(self.measured, _join(path, _HEAD_MEASURED_KEY)))

    @classmethod
    def _from_json(cls, obj: Any, path: str) -> HeadSetting:
        obj = _req_object(obj, path)
        if _HEAD_PATTERN_KEY not in obj:
            raise ProfileError(_join(path, _HEAD_PATTERN_KEY), "missing (required)")
        params = {k: v for k, v in obj.items() if k not in (_HEAD_PATTERN_KEY, _HEAD_MEASURED_KEY)}
        # Built without __init__ so that validation reports the head's real path (layers[i][j]...).
        self = object.__new__(cls)
        object.__setattr__(self, "pattern", obj[_HEAD_PATTERN_KEY])
        object.__setattr__(self, "params", params)
        object.__setattr__(self, "measured", obj.get(_HEAD_MEASURED_KEY))
        self._validate(path)
        return self

    def key(self) -> tuple[str, tuple[tuple[str, Any], ...]]:
        """Hashable identity of the setting (pattern and params, not ``measured``): heads with equal
        keys can share one pattern object."""
        return (self.pattern.value, tuple(self.params.items()))

    def __hash__(self) -> int:  # params is a mapping, so the generated field hash would fail
        return hash(self.key())

    def to_config(self, base: SparseConfig) -> SparseConfig:
        """``base`` with this head's pattern forced and its parameters applied, so that
        ``build_pattern(cfg.pattern, cfg)`` builds this head's pattern."""
        if self.pattern is PatternName.DENSE:
            return dataclasses.replace(base, pattern=PatternName.DENSE)
        section = PATTERN_CONFIG_SECTION[self.pattern]
        specs = PATTERN_PARAMS[self.pattern]
        overrides = {specs[name].config_field: value for name, value in self.params.items()}
        sub = dataclasses.replace(getattr(base, section), **overrides)
        return dataclasses.replace(base, pattern=self.pattern, **{section: sub})

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {_HEAD_PATTERN_KEY: self.pattern.value, **self.params}
        if self.measured is not None:
            out[_HEAD_MEASURED_KEY] = {k: dict(v) for k, v in self.measured.items()}
        return out


_DECODE_DENSE_KEY = "dense"
_DECODE_BUDGET_KEY = "budget_tokens"


@dataclass(frozen=True)
class LayerDecodeSetting:
    """One layer's decode override, refining ``SparseConfig.decode`` (top-k KV retrieval) for that layer:
    ``dense`` (always decode it dense; JSON ``{"dense": true}``) or its own ``budget_tokens``
    (JSON ``{"budget_tokens": 1024}``). Unused while decode retrieval is off."""

    dense: bool = False
    budget_tokens: int | None = None

    def __post_init__(self) -> None:
        self._validate("decode[?]")

    def _validate(self, path: str) -> None:
        if not isinstance(self.dense, bool):
            raise ProfileError(_join(path, _DECODE_DENSE_KEY), f"must be true, got {_show(self.dense)}")
        if self.dense == (self.budget_tokens is not None):
            raise ProfileError(path, f"give exactly one of {_DECODE_DENSE_KEY!r}: true or {_DECODE_BUDGET_KEY!r}")
        if self.budget_tokens is not None:
            _req_int(self.budget_tokens, _join(path, _DECODE_BUDGET_KEY), 1)

    @classmethod
    def _from_json(cls, obj: Any, path: str) -> LayerDecodeSetting | None:
        if obj is None:
            return None
        obj = _req_object(obj, path)
        _check_keys(obj, path, (), (_DECODE_DENSE_KEY, _DECODE_BUDGET_KEY))
        dense = obj.get(_DECODE_DENSE_KEY, False)
        if _DECODE_DENSE_KEY in obj and dense is not True:
            raise ProfileError(_join(path, _DECODE_DENSE_KEY), f"must be true (omit the layer's entry or write null "
                                                               f"to follow the config), got {_show(dense)}")
        setting = cls.__new__(cls)
        object.__setattr__(setting, "dense", dense)
        object.__setattr__(setting, "budget_tokens", obj.get(_DECODE_BUDGET_KEY))
        setting._validate(path)
        return setting

    def to_dict(self) -> dict[str, Any]:
        return {_DECODE_DENSE_KEY: True} if self.dense else {_DECODE_BUDGET_KEY: self.budget_tokens}


@dataclass(frozen=True)
class Profile:
    """Per-head settings for one model: ``layers[layer][query_head]``; optionally ``decode[layer]``,
    per-layer overrides of top-k decode retrieval (``None`` entries follow ``SparseConfig.decode``)."""

    model: ModelIdentity
    calibration: Calibration
    layers: tuple[tuple[HeadSetting, ...], ...]
    decode: tuple[LayerDecodeSetting | None, ...] | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.model, ModelIdentity):
            raise ProfileError("model", f"must be a ModelIdentity, got {type(self.model).__name__}")
        if not isinstance(self.calibration, Calibration):
            raise ProfileError("calibration", f"must be a Calibration, got {type(self.calibration).__name__}")
        layers = _req_array(self.layers, "layers")
        _check_layer_count(len(layers), self.model)
        normalised = []
        for i, layer in enumerate(layers):
            layer = _req_array(layer, f"layers[{i}]")
            _check_head_count(i, len(layer), self.model)
            for j, head in enumerate(layer):
                if not isinstance(head, HeadSetting):
                    raise ProfileError(f"layers[{i}][{j}]", f"must be a HeadSetting, got {type(head).__name__}")
            normalised.append(tuple(layer))
        object.__setattr__(self, "layers", tuple(normalised))
        if self.decode is not None:
            decode = _req_array(self.decode, "decode")
            if len(decode) != self.model.num_layers:
                raise ProfileError("decode", f"has {len(decode)} entries, the model has {self.model.num_layers} layers "
                                             "(one entry per layer; null follows the config)")
            for i, setting in enumerate(decode):
                if setting is not None and not isinstance(setting, LayerDecodeSetting):
                    raise ProfileError(f"decode[{i}]", f"must be a LayerDecodeSetting or None, got "
                                                       f"{type(setting).__name__}")
            object.__setattr__(self, "decode", tuple(decode))

    def to_dict(self) -> dict[str, Any]:
        """A plain JSON-ready dict; ``load_profile(p.to_dict()) == p``."""
        return {
            "format": PROFILE_FORMAT,
            "version": PROFILE_VERSION,
            "model": self.model.to_dict(),
            "calibration": self.calibration.to_dict(),
            "layers": [[head.to_dict() for head in layer] for layer in self.layers],
            **({} if self.decode is None else
               {"decode": [None if setting is None else setting.to_dict() for setting in self.decode]}),
        }

    def pattern_mix(self) -> dict[str, int]:
        """How many heads use each pattern (patterns in use only, in PatternName order)."""
        counts = {p.value: 0 for p in ALLOWED_PATTERNS}
        for layer in self.layers:
            for head in layer:
                counts[head.pattern.value] += 1
        return {name: n for name, n in counts.items() if n}


def _check_layer_count(found: int, model: ModelIdentity) -> None:
    if found != model.num_layers:
        raise ProfileError("layers", f"has {found} layers, the model section says {model.num_layers}")


def _check_head_count(layer: int, found: int, model: ModelIdentity) -> None:
    if found != model.num_query_heads:
        raise ProfileError(f"layers[{layer}]", f"has {found} heads, the model section says {model.num_query_heads}")


# ----------------------------------------------------------------------------------------------
# Model identity
# ----------------------------------------------------------------------------------------------


def _json_safe(value: Any) -> Any:
    """A deterministic JSON-ready copy of a config value (dicts sorted by key, tuples as lists)."""
    if value is None or isinstance(value, (bool, int, str)):
        return value
    if isinstance(value, enum.Enum):
        return _json_safe(value.value)
    if isinstance(value, float):
        return value if math.isfinite(value) else repr(value)  # JSON has no NaN/Infinity
    if isinstance(value, Mapping):
        return {str(k): _json_safe(v) for k, v in sorted(value.items(), key=lambda kv: str(kv[0]))}
    if isinstance(value, (list, tuple)):
        return [_json_safe(v) for v in value]
    if isinstance(value, (set, frozenset)):
        return sorted((_json_safe(v) for v in value), key=repr)
    to_dict = getattr(value, "to_dict", None)
    if callable(to_dict):
        return _json_safe(to_dict())
    return f"{type(value).__name__}:{value}"


def _rope_fingerprint(config: Any) -> Any:
    """One canonical RoPE description from whichever of rope_parameters (transformers 5),
    rope_scaling and rope_theta (transformers 4) the config has, so the same model fingerprints the
    same under both spellings."""
    merged: dict[str, Any] = {}
    for name in ("rope_scaling", "rope_parameters"):
        value = getattr(config, name, None)
        if isinstance(value, Mapping):
            merged.update(value)
    theta = getattr(config, "rope_theta", None)
    if theta is not None and "rope_theta" not in merged:
        merged["rope_theta"] = theta
    if "type" in merged and "rope_type" not in merged:  # the key's pre-4.45 spelling
        merged["rope_type"] = merged.pop("type")
    if merged.get("rope_type") == _DEFAULT_ROPE_TYPE:
        del merged["rope_type"]
    # 500000 and 500000.0 are the same theta; configs on the Hub spell both.
    merged = {k: float(v) if isinstance(v, int) and not isinstance(v, bool) else v for k, v in merged.items()}
    return _json_safe(merged) if merged else None


def model_identity(model_config: Any) -> ModelIdentity:
    """The identity of a (duck-typed) transformers config, as a profile records it.

    The fingerprint hashes the fields that decide which attention pattern each head needs: the
    head layout (layers, query and KV heads, head_dim, hidden_size) fixes which head is which; RoPE
    (theta, scaling) and max_position_embeddings shape how attention decays with distance, i.e.
    how much mass sits on local diagonals versus distant columns; sliding_window and layer_types
    make some layers local by construction; model_type and vocab_size tell apart models that share
    a shape but not weights lineage (e.g. a base model and an unrelated one of the same size).
    Weights are not hashed: fine-tunes of one base model share it, and their heads keep their
    patterns closely enough that a base profile is the right default (``check_profile_matches``
    still refuses models whose fingerprint differs unless told otherwise).
    """
    architectures = getattr(model_config, "architectures", None)
    architecture = str(architectures[0]) if isinstance(architectures, (list, tuple)) and architectures else ""
    # Multimodal configs keep the language model's fields in a text config; text-only ones return self.
    get_text_config = getattr(model_config, "get_text_config", None)
    text = get_text_config() if callable(get_text_config) else model_config

    def required_int(name: str) -> int:
        value = getattr(text, name, None)
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"model config {type(text).__name__}: {name} must be a positive int, got {value!r}")
        return value

    model_type = getattr(text, "model_type", None)
    if not isinstance(model_type, str) or not model_type:
        raise ValueError(f"model config {type(text).__name__}: model_type must be a non-empty string, got {model_type!r}")
    num_layers = required_int("num_hidden_layers")
    num_heads = required_int("num_attention_heads")
    num_kv_heads = getattr(text, "num_key_value_heads", None)
    num_kv_heads = num_heads if num_kv_heads is None else required_int("num_key_value_heads")
    head_dim = getattr(text, "head_dim", None)
    hidden_size = getattr(text, "hidden_size", None)
    if head_dim is None:  # several configs carry head_dim=None meaning "hidden_size // heads"
        hidden_size = required_int("hidden_size")
        if hidden_size % num_heads:
            raise ValueError(
                f"model config {type(text).__name__}: head_dim is unset and hidden_size {hidden_size} is not "
                f"a multiple of num_attention_heads {num_heads}"
            )
        head_dim = hidden_size // num_heads
    else:
        head_dim = required_int("head_dim")
    layer_types = getattr(text, "layer_types", None)
    decisive = {
        "model_type": model_type,
        "num_hidden_layers": num_layers,
        "num_attention_heads": num_heads,
        "num_key_value_heads": num_kv_heads,
        "head_dim": head_dim,
        "hidden_size": hidden_size,
        "rope": _rope_fingerprint(text),
        "max_position_embeddings": getattr(text, "max_position_embeddings", None),
        "sliding_window": getattr(text, "sliding_window", None),
        "layer_types": list(layer_types) if layer_types is not None else None,
        "vocab_size": getattr(text, "vocab_size", None),
    }
    canonical = json.dumps(_json_safe(decisive), sort_keys=True, separators=(",", ":"), allow_nan=False)
    fingerprint = FINGERPRINT_PREFIX + hashlib.sha256(canonical.encode("utf-8")).hexdigest()
    return ModelIdentity(
        architecture=architecture,
        model_type=model_type,
        num_layers=num_layers,
        num_query_heads=num_heads,
        num_kv_heads=num_kv_heads,
        head_dim=head_dim,
        fingerprint=fingerprint,
    )


def check_profile_matches(profile: Profile, model_config: Any, *, allow_mismatch: bool = False) -> tuple[str, ...]:
    """Check that ``profile`` was made for the model of ``model_config``.

    Differences raise ``ProfileMismatchError`` listing every differing field (model vs profile);
    with ``allow_mismatch=True`` they are reported as a ``ProfileMismatchWarning`` instead, except
    for the layer and head counts, which always raise: the profile has one setting per (layer,
    query head) and cannot be applied to another layout. An empty architecture on either side means
    "unknown" and is not compared. Returns the names of the differing fields.
    """
    mine = profile.model
    found = model_identity(model_config)
    differing = []
    for name in _MODEL_FIELDS:
        ours, theirs = getattr(found, name), getattr(mine, name)
        if name == "architecture" and (not ours or not theirs):
            continue
        if ours != theirs:
            differing.append(name)
    if not differing:
        return ()
    lines = [f"  {name}: model has {getattr(found, name)!r}, profile says {getattr(mine, name)!r}" for name in differing]
    layout = [name for name in differing if name in _LAYOUT_FIELDS]
    head = f"the profile (from {profile.calibration.source!r}) does not match the model:\n"
    if layout:
        raise ProfileMismatchError(
            head + "\n".join(lines) + "\na profile holds one setting per layer and query head, so a different "
            f"{' and '.join(layout)} can never be applied (allow_mismatch does not cover this)"
        )
    if not allow_mismatch:
        raise ProfileMismatchError(head + "\n".join(lines) + "\npass allow_mismatch=True to apply it anyway")
    warnings.warn(head + "\n".join(lines) + "\napplying it anyway (allow_mismatch=True)", ProfileMismatchWarning, stacklevel=2)
    return tuple(differing)


# ----------------------------------------------------------------------------------------------
# Loading and saving
# ----------------------------------------------------------------------------------------------

_TOP_LEVEL_KEYS = ("format", "version", "model", "calibration", "layers")
_OPTIONAL_TOP_LEVEL_KEYS = ("decode",)


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
    try:
        with open(name, "rb") as f:
            raw = f.read()
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ProfileError(name, f"not UTF-8 text (byte {exc.start}): {exc.reason}") from None
    return parse_profile_json(text, name)


def _profile_from_dict(data: Any) -> Profile:
    data = _req_object(data, "<profile>")
    if "format" not in data:
        raise ProfileError("format", f"missing (required; must be {PROFILE_FORMAT!r})")
    if data["format"] != PROFILE_FORMAT:
        raise ProfileError("format", f"must be {PROFILE_FORMAT!r}, got {_show(data['format'])}")
    if "version" not in data:
        raise ProfileError("version", f"missing (required; this sparseprefill reads version {PROFILE_VERSION})")
    version = data["version"]
    if isinstance(version, bool) or not isinstance(version, int):
        raise ProfileError("version", f"must be an integer, got {_type_name(version)} {_show(version)}")
    if version != PROFILE_VERSION:
        raise ProfileError("version", f"found version {version}, this sparseprefill supports version {PROFILE_VERSION} only")
    _check_keys(data, "", _TOP_LEVEL_KEYS, _OPTIONAL_TOP_LEVEL_KEYS)

    model_obj = _req_object(data["model"], "model")
    _check_keys(model_obj, "model", _MODEL_FIELDS)
    model = ModelIdentity(**model_obj)

    calibration_obj = _req_object(data["calibration"], "calibration")
    _check_keys(calibration_obj, "calibration", _CALIBRATION_FIELDS)
    calibration = Calibration(**calibration_obj)

    layers_obj = _req_array(data["layers"], "layers")
    _check_layer_count(len(layers_obj), model)
    layers = []
    for i, layer_obj in enumerate(layers_obj):
        layer_obj = _req_array(layer_obj, f"layers[{i}]")
        _check_head_count(i, len(layer_obj), model)
        layers.append(tuple(HeadSetting._from_json(head, f"layers[{i}][{j}]") for j, head in enumerate(layer_obj)))
    decode = None
    if "decode" in data:
        decode_obj = _req_array(data["decode"], "decode")
        decode = tuple(LayerDecodeSetting._from_json(entry, f"decode[{i}]") for i, entry in enumerate(decode_obj))
    return Profile(model=model, calibration=calibration, layers=tuple(layers), decode=decode)


def load_profile(source: str | os.PathLike[str] | Mapping[str, Any]) -> Profile:
    """Read and fully validate a profile from a JSON file path or an already-parsed dict.

    Raises ProfileError (a ValueError) naming the exact path of the first problem; for files the
    message ends with "(in <file>)".
    """
    if isinstance(source, Mapping):
        return _profile_from_dict(source)
    if isinstance(source, (str, os.PathLike)):
        data = _read_json_file(source)
        try:
            return _profile_from_dict(data)
        except ProfileError as exc:
            raise ProfileError(exc.path, exc.problem, os.fspath(source)) from None
    raise TypeError(f"load_profile takes a path or a dict, got {type(source).__name__}")


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


def save_profile(profile: Profile, path: str | os.PathLike[str]) -> None:
    """Write ``profile`` as indented JSON with a trailing newline; ``load_profile(path) == profile``."""
    if not isinstance(profile, Profile):
        raise TypeError(f"save_profile takes a Profile, got {type(profile).__name__}")
    Path(os.fspath(path)).write_text(_dumps(profile.to_dict()), encoding="utf-8", newline="\n")
