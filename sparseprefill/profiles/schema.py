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

This module holds the settings dataclasses (``Calibration``, ``HeadSetting``, ``LayerDecodeSetting``,
``Profile``), ``load_profile`` and ``save_profile``; the rest of the format lives next to it and is
re-exported here: ``fields`` (``ProfileError`` and the field validators), ``params`` (each
pattern's parameters and their domains), ``identity`` (``ModelIdentity``, ``model_identity``,
``check_profile_matches``) and ``io`` (the strict JSON parser and the file layout).

No transformers import: model configs are duck-typed objects with attributes.
"""

from __future__ import annotations

import dataclasses
import datetime
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..config import PatternName, SparseConfig
from .fields import (
    ProfileError,
    _check_keys,
    _join,
    _req_array,
    _req_fraction,
    _req_int,
    _req_object,
    _req_str,
    _show,
    _type_name,
)
from .identity import (
    _MODEL_FIELDS,
    _OPTIONAL_MODEL_FIELDS,
    ModelIdentity,
    ProfileMismatchError,
    ProfileMismatchWarning,
    check_profile_matches,
    model_identity,
)
from .io import _dumps, _read_json_file, parse_profile_json
from .params import (
    ALLOWED_PATTERNS,
    MEASURED_KEYS,
    PATTERN_CONFIG_SECTION,
    PATTERN_PARAMS,
    ParamKind,
    ParamSpec,
    _check_measured,
    _check_params,
    _check_pattern,
)

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

_ISO_DATE_RE = re.compile(r"[0-9]{4}-[0-9]{2}-[0-9]{2}")

# Keys a head object holds besides its parameters.
_HEAD_PATTERN_KEY = "pattern"
_HEAD_MEASURED_KEY = "measured"


# ----------------------------------------------------------------------------------------------
# The dataclasses
# ----------------------------------------------------------------------------------------------

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
# Loading and saving
# ----------------------------------------------------------------------------------------------

_TOP_LEVEL_KEYS = ("format", "version", "model", "calibration", "layers")
_OPTIONAL_TOP_LEVEL_KEYS = ("decode",)


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
    _check_keys(model_obj, "model", _MODEL_FIELDS, _OPTIONAL_MODEL_FIELDS)
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



def save_profile(profile: Profile, path: str | os.PathLike[str]) -> None:
    """Write ``profile`` as indented JSON with a trailing newline; ``load_profile(path) == profile``."""
    if not isinstance(profile, Profile):
        raise TypeError(f"save_profile takes a Profile, got {type(profile).__name__}")
    Path(os.fspath(path)).write_text(_dumps(profile.to_dict()), encoding="utf-8", newline="\n")
