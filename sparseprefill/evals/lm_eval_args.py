"""The ``sparseprefill`` lm-eval model's arguments, parsed and validated before any weights load:
``sparse_config`` (presets, JSON files, inline ``key=value`` items), ``profile``, and the boolean
flags, resolved into :class:`SparsePrefillSettings`. Needs no lm-eval; the accepted forms are
described in :mod:`sparseprefill.evals.lm_eval_model`, which re-exports every name here.
"""

from __future__ import annotations

import enum
import json
import types
import typing
from dataclasses import dataclass, fields, is_dataclass, replace
from pathlib import Path
from typing import Any, Mapping

from ..config import SparseConfig
from ..profiles import Profile, load_profile, shipped_profile
from ..profiles.schema import PROFILE_FORMAT

__all__ = [
    "SparseConfigPreset",
    "SparsePrefillSettings",
    "parse_bool",
    "parse_sparse_config",
    "resolve_profile",
    "resolve_settings",
]

# lm-eval splits --model_args on "," (and its CLI on top-level ","), so inline items use these.
INLINE_ITEM_SEPARATORS = (";", "|")
INLINE_KEY_VALUE = "="
NESTED_FIELD_SEPARATOR = "."
# Spellings that clear an optional (``int | None``) field.
NONE_WORDS = frozenset({"none", "null"})
TRUE_WORDS = frozenset({"true", "1", "yes", "on"})
FALSE_WORDS = frozenset({"false", "0", "no", "off"})


class SparseConfigPreset(str, enum.Enum):
    """Named ``sparse_config`` values."""

    AUTO = "auto"  # SparseConfig(): the adaptive default
    DEFAULT = "default"  # the same, for users who think of it as "the defaults"
    KEEP_EVERYTHING = "keep_everything"  # lossless: sparse path on every prompt, every key kept

    def build(self) -> SparseConfig:
        if self is SparseConfigPreset.KEEP_EVERYTHING:
            return SparseConfig.keep_everything()
        return SparseConfig()


# ----------------------------------------------------------------------------------------------
# sparse_config parsing
# ----------------------------------------------------------------------------------------------

def _field_types(cls: type) -> dict[str, Any]:
    # config.py uses postponed annotations, so the dataclass fields hold strings: resolve them.
    return typing.get_type_hints(cls)


def _union_members(annotation: Any) -> tuple[Any, ...]:
    if isinstance(annotation, types.UnionType) or typing.get_origin(annotation) is typing.Union:
        return typing.get_args(annotation)
    return (annotation,)


def _type_label(annotation: Any) -> str:
    members = _union_members(annotation)
    enums = [m for m in members if isinstance(m, type) and issubclass(m, enum.Enum)]
    if enums:  # ``PatternName | str``: the str only lets callers pass the value, not any text
        return " | ".join(repr(item.value) for item in enums[0])
    names = []
    for member in members:
        if member is type(None):
            names.append("none")
        else:
            names.append(getattr(member, "__name__", str(member)))
    return " or ".join(dict.fromkeys(names))


def _convert(name: str, value: Any, annotation: Any) -> Any:
    """``value`` (text from the inline form, or a JSON value) as the type ``annotation`` declares.

    Raises ValueError naming the field, what was found and what it requires."""
    if typing.get_origin(annotation) is tuple:  # ``tuple[int, ...]``: layer indices
        return _convert_int_tuple(name, value)
    members = _union_members(annotation)
    expected = _type_label(annotation)
    if bool in members:
        if isinstance(value, bool):
            return value
        word = value.strip().lower() if isinstance(value, str) else None
        if word in TRUE_WORDS or word in FALSE_WORDS:
            return word in TRUE_WORDS
        raise ValueError(f"sparse_config: {name}={value!r} is not valid; it requires a bool "
                         f"({', '.join(sorted(TRUE_WORDS))} or {', '.join(sorted(FALSE_WORDS))})")
    if value is None or (isinstance(value, str) and value.strip().lower() in NONE_WORDS):
        if type(None) in members:
            return None
        raise ValueError(f"sparse_config: {name} cannot be none; it requires {expected}")
    for member in members:
        if isinstance(member, type) and issubclass(member, enum.Enum):
            try:
                return member(value.strip() if isinstance(value, str) else value)
            except ValueError:
                raise ValueError(f"sparse_config: {name}={value!r} is not valid; it requires one of {expected}") from None
    text = value.strip() if isinstance(value, str) else None
    if int in members:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if text is not None:
            try:
                return int(text)
            except ValueError:
                pass
        raise ValueError(f"sparse_config: {name}={value!r} is not valid; it requires {expected}")
    if float in members:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if text is not None:
            try:
                return float(text)
            except ValueError:
                pass
        raise ValueError(f"sparse_config: {name}={value!r} is not valid; it requires {expected}")
    if str in members and isinstance(value, str):
        return text
    raise ValueError(f"sparse_config: {name}={value!r} is not valid; it requires {expected}")


def _convert_int_tuple(name: str, value: Any) -> tuple[int, ...]:
    """A JSON list of ints, or inline text of ints separated by commas or spaces (empty: none)."""
    items = value.replace(",", " ").split() if isinstance(value, str) else value
    if isinstance(items, (list, tuple)) and all(_is_int(item) for item in items):
        return tuple(int(item) for item in items)
    raise ValueError(f"sparse_config: {name}={value!r} is not valid; it requires integers (e.g. {name}=0,1)")


def _is_int(item: Any) -> bool:
    if isinstance(item, str):
        return item.lstrip("-").isdigit()
    return isinstance(item, int) and not isinstance(item, bool)


def _unknown_field(name: str, cls: type, prefix: str = "") -> ValueError:
    valid = ", ".join(prefix + f.name for f in fields(cls))
    return ValueError(f"sparse_config: unknown field {prefix + name!r}; {cls.__name__} has: {valid}")


def _overrides_from_mapping(data: Mapping[str, Any], cls: type = SparseConfig, prefix: str = "") -> dict[str, Any]:
    """Check every key of a JSON object against ``cls``'s fields and convert its values."""
    types_by_name = _field_types(cls)
    out: dict[str, Any] = {}
    for name, value in data.items():
        if name not in types_by_name:
            raise _unknown_field(name, cls, prefix)
        annotation = types_by_name[name]
        if is_dataclass(annotation):
            if not isinstance(value, Mapping):
                raise ValueError(
                    f"sparse_config: {prefix + name} must be an object of {annotation.__name__} fields, "
                    f"got {type(value).__name__}"
                )
            out[name] = _overrides_from_mapping(value, annotation, f"{prefix}{name}{NESTED_FIELD_SEPARATOR}")
        else:
            out[name] = _convert(prefix + name, value, annotation)
    return out


def _apply(base: SparseConfig, overrides: Mapping[str, Any]) -> SparseConfig:
    """``base`` with top-level and nested overrides; nested ones keep the base's other fields."""
    changes: dict[str, Any] = {}
    for name, value in overrides.items():
        if isinstance(value, Mapping):
            changes[name] = replace(getattr(base, name), **value)
        else:
            changes[name] = value
    return replace(base, **changes)


def _overrides_from_inline(items: list[str]) -> dict[str, Any]:
    types_by_name = _field_types(SparseConfig)
    out: dict[str, Any] = {}
    for item in items:
        key, sep, value = item.partition(INLINE_KEY_VALUE)
        key = key.strip()
        if not sep or not key:
            raise ValueError(
                f"sparse_config: expected key=value, got {item!r} (only the first item may be a preset: "
                f"{', '.join(p.value for p in SparseConfigPreset)})"
            )
        section, dot, sub = key.partition(NESTED_FIELD_SEPARATOR)
        if section not in types_by_name:
            raise _unknown_field(section, SparseConfig)
        annotation = types_by_name[section]
        if is_dataclass(annotation):
            if not dot:
                raise ValueError(
                    f"sparse_config: {section} is a section; set its fields one by one, "
                    f"e.g. {section}.{fields(annotation)[0].name}=..."
                )
            sub_types = _field_types(annotation)
            if sub not in sub_types:
                raise _unknown_field(sub, annotation, f"{section}{NESTED_FIELD_SEPARATOR}")
            out.setdefault(section, {})[sub] = _convert(key, value, sub_types[sub])
        else:
            if dot:
                raise ValueError(f"sparse_config: {section} has no fields; got {key!r}")
            out[section] = _convert(key, value, annotation)
    return out


def _split_inline(text: str) -> list[str]:
    for separator in INLINE_ITEM_SEPARATORS[1:]:
        text = text.replace(separator, INLINE_ITEM_SEPARATORS[0])
    return [item.strip() for item in text.split(INLINE_ITEM_SEPARATORS[0]) if item.strip()]


def _build(base: SparseConfig, overrides: Mapping[str, Any]) -> SparseConfig:
    # SparseConfig's own checks (ranges, stride divides block size, ...) raise ValueError/TypeError
    # naming the field; prefix them so the user sees which argument they came from.
    try:
        return _apply(base, overrides)
    except (TypeError, ValueError) as error:
        raise ValueError(f"sparse_config: {error}") from None


def _from_json_file(path: Path) -> SparseConfig:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as error:
        raise ValueError(f"sparse_config: {path} is not valid JSON ({error})") from None
    if not isinstance(data, Mapping):
        raise ValueError(f"sparse_config: {path} must hold a JSON object of SparseConfig fields, got {type(data).__name__}")
    if data.get("format") == PROFILE_FORMAT:
        raise ValueError(f"sparse_config: {path} is a per-head profile, not a SparseConfig; pass it as profile={path}")
    return _build(SparseConfig(), _overrides_from_mapping(data))


def parse_sparse_config(value: SparseConfig | Mapping[str, Any] | str | Path | None) -> SparseConfig:
    """Turn a ``sparse_config`` model argument into a ``SparseConfig``.

    Accepts ``None`` (the default config), a ``SparseConfig``, a mapping of fields (lm-eval's CLI
    turns a JSON object in ``--model_args`` into a dict), a preset name (``SparseConfigPreset``),
    a path to a JSON file, or inline ``key=value`` items joined by ``;`` or ``|`` with an optional
    leading preset. Raises ValueError saying what was found and what is accepted.
    """
    if value is None:
        return SparseConfig()
    if isinstance(value, SparseConfig):
        return value
    if isinstance(value, Mapping):
        return _build(SparseConfig(), _overrides_from_mapping(value))
    if isinstance(value, Path):
        return _from_json_file(value)
    if not isinstance(value, str):
        raise ValueError(
            f"sparse_config must be a preset, a JSON file path or key=value items, got {type(value).__name__} {value!r}"
        )
    text = value.strip()
    presets = {preset.value: preset for preset in SparseConfigPreset}
    if text.lower() in presets:
        return presets[text.lower()].build()
    if text.startswith("{"):
        try:
            data = json.loads(text)
        except json.JSONDecodeError as error:
            raise ValueError(f"sparse_config: inline JSON is not valid ({error})") from None
        return parse_sparse_config(data)
    path = Path(text).expanduser()
    if path.is_file():
        return _from_json_file(path)
    if INLINE_KEY_VALUE in text or any(separator in text for separator in INLINE_ITEM_SEPARATORS):
        items = _split_inline(text)
        base = SparseConfig()
        if items and INLINE_KEY_VALUE not in items[0]:
            head = items.pop(0)
            if head.lower() not in presets:
                raise ValueError(
                    f"sparse_config: {head!r} is not a preset; the first item may be one of "
                    f"{', '.join(presets)}, every other item must be key=value"
                )
            base = presets[head.lower()].build()
        return _build(base, _overrides_from_inline(items))
    raise ValueError(
        f"sparse_config={value!r} is neither a preset ({', '.join(presets)}), an existing JSON file, "
        f"nor key=value items joined by ';' or '|' (e.g. min_sparse_len=8192;pattern=block_sparse)"
    )


def parse_bool(name: str, value: Any) -> bool:
    """A boolean model argument: lm-eval passes ``true``/``false`` as bools, other spellings as text."""
    if isinstance(value, bool):
        return value
    if isinstance(value, int) and value in (0, 1):
        return bool(value)
    if isinstance(value, str):
        word = value.strip().lower()
        if word in TRUE_WORDS:
            return True
        if word in FALSE_WORDS:
            return False
    raise ValueError(f"{name} must be true or false, got {value!r}")


def resolve_profile(value: Profile | Mapping[str, Any] | str | Path | None) -> tuple[Profile | None, str | None]:
    """``(profile, source)`` for a ``profile`` argument: a JSON file path or a shipped profile's name."""
    if value is None:
        return None, None
    if isinstance(value, Profile):
        return value, "<Profile object>"
    if isinstance(value, Mapping):
        return load_profile(value), "<dict>"
    if not isinstance(value, (str, Path)):
        raise ValueError(f"profile must be a JSON file path or a shipped profile name, got {type(value).__name__}")
    path = Path(value).expanduser()
    if path.is_file():
        return load_profile(path), str(path)
    try:
        return shipped_profile(str(value)), f"shipped:{value}"
    except FileNotFoundError as error:
        raise ValueError(f"profile={str(value)!r} is not an existing file and not a shipped profile ({error})") from None


@dataclass(frozen=True)
class SparsePrefillSettings:
    """Everything the ``sparseprefill`` model arguments decide, resolved before the model loads."""

    config: SparseConfig
    profile: Profile | None = None
    profile_source: str | None = None
    allow_profile_mismatch: bool = False
    dense: bool = False


def resolve_settings(
    sparse_config: Any = None, profile: Any = None, dense: Any = False, allow_profile_mismatch: Any = False
) -> SparsePrefillSettings:
    """Parse and validate the model arguments (all of them, even under ``dense=true``, so a typo in
    a config is reported by the baseline run too)."""
    config = parse_sparse_config(sparse_config)
    loaded, source = resolve_profile(profile)
    return SparsePrefillSettings(
        config=config, profile=loaded, profile_source=source,
        allow_profile_mismatch=parse_bool("allow_profile_mismatch", allow_profile_mismatch),
        dense=parse_bool("dense", dense),
    )
