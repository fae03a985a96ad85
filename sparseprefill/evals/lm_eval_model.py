"""An lm-evaluation-harness model, ``sparseprefill``: lm-eval's ``HFLM`` with sparse prefill.

Any lm-eval task (a shipped one or a user's own YAML) then runs through the patched model, and a
``dense=true`` run of the very same class gives the same-harness dense baseline::

    pip install "sparseprefill[lm-eval]"
    sparseprefill-lm-eval --model sparseprefill \\
        --model_args pretrained=HuggingFaceTB/SmolLM2-135M-Instruct,sparse_config=auto \\
        --tasks hellaswag --batch_size 1
    sparseprefill-lm-eval --model sparseprefill \\
        --model_args pretrained=HuggingFaceTB/SmolLM2-135M-Instruct,dense=true \\
        --tasks hellaswag --batch_size 1

or from Python (importing this module registers the model)::

    import lm_eval
    import sparseprefill.evals.lm_eval_model  # noqa: F401  registers "sparseprefill"
    results = lm_eval.simple_evaluate(
        model="sparseprefill",
        model_args="pretrained=PATH,sparse_config=min_sparse_len=8192;vertical_slash.vertical_mass=0.9",
        tasks=["my_task"],
    )
    results["config"]["sparseprefill"]["density"]  # what the sparse path computed

``--model_args`` keys of this model (every other key goes to ``HFLM`` unchanged):

* ``sparse_config``: ``auto`` / ``default`` (``SparseConfig()``), ``keep_everything`` (the
  lossless ``SparseConfig.keep_everything()``: the sparse path runs on every prompt and keeps every
  key, for checking an integration), a path to a JSON file of ``SparseConfig`` fields (nested
  configs as objects, e.g. ``{"pattern": "block_sparse", "block_sparse": {"mass": 0.9}}``), or
  inline ``key=value`` items joined by ``;`` or ``|`` (lm-eval splits ``--model_args`` on ``,``),
  optionally after a preset: ``keep_everything;pattern=a_shape;a_shape.local_tokens=512``. Nested
  fields are written ``section.field``; ``none`` clears an optional field.
* ``profile``: a per-head profile, as a JSON file path or a shipped profile's name (see
  ``sparseprefill.shipped_profile``).
* ``allow_profile_mismatch``: ``true`` to apply a profile made for another checkpoint.
* ``dense``: ``true`` to run this class unpatched (the dense baseline).

The sparse path's density is logged in one line when lm-eval finishes and written to the results
under ``results["config"]["sparseprefill"]``; ``SparsePrefillLM.sparse_stats()`` returns it for
callers that run ``lm_eval.evaluate`` themselves.

lm-eval 0.4.x has no plugin discovery (no ``lm_eval.models`` entry points), so ``lm_eval --model
sparseprefill`` only works once this module is imported; the ``sparseprefill-lm-eval`` console
script imports it and then runs lm-eval's own CLI with every flag unchanged.

lm-eval's request cache (``--use_cache``) keys on the request, not on the model arguments: give every
sparse configuration (and the dense baseline) its own cache path, or they will share answers.
"""

from __future__ import annotations

import enum
import json
import logging
import types
import typing
from dataclasses import dataclass, fields, is_dataclass, replace
from pathlib import Path
from typing import Any, Mapping

from ..config import SparseConfig
from ..patchers import PatchStats, patch, stats
from ..profiles import Profile, load_profile, shipped_profile
from ..profiles.schema import PROFILE_FORMAT

__all__ = [
    "INSTALL_HINT",
    "MODEL_NAME",
    "SUPPORTED_LM_EVAL",
    "SparseConfigPreset",
    "SparsePrefillLM",
    "SparsePrefillSettings",
    "main",
    "parse_bool",
    "parse_sparse_config",
    "resolve_profile",
    "resolve_settings",
]

# The name users pass as ``--model`` / ``simple_evaluate(model=...)``.
MODEL_NAME = "sparseprefill"

INSTALL_HINT = 'pip install "sparseprefill[lm-eval]"'

# lm-eval splits --model_args on "," (and its CLI on top-level ","), so inline items use these.
INLINE_ITEM_SEPARATORS = (";", "|")
INLINE_KEY_VALUE = "="
NESTED_FIELD_SEPARATOR = "."
# Spellings that clear an optional (``int | None``) field.
NONE_WORDS = frozenset({"none", "null"})
TRUE_WORDS = frozenset({"true", "1", "yes", "on"})
FALSE_WORDS = frozenset({"false", "0", "no", "off"})

# lm-eval's CLI attaches its handler to the "lm_eval" logger only (and stops propagation), so a
# child of it is the logger whose INFO lines appear in a plain ``lm_eval`` run's output.
logger = logging.getLogger("lm_eval.sparseprefill")

# lm-eval releases before 0.4.10 fail to import under transformers 5 (which sparseprefill requires):
# they read transformers.AutoModelForVision2Seq, removed in 5.0. pyproject's extra pins the same range.
SUPPORTED_LM_EVAL = "lm-eval>=0.4.10,<0.5"

try:  # lm-eval is an optional extra; without it only the parsing helpers below are usable.
    from lm_eval.api.registry import register_model
    from lm_eval.models.huggingface import HFLM

    _LM_EVAL_IMPORT_ERROR: Exception | None = None
# AttributeError: an old lm-eval under transformers 5 (see SUPPORTED_LM_EVAL) breaks at import.
except (ImportError, AttributeError) as error:  # pragma: no cover - only where lm-eval is absent/broken
    _LM_EVAL_IMPORT_ERROR = error


def _require_lm_eval() -> None:
    if _LM_EVAL_IMPORT_ERROR is not None:
        raise ImportError(
            f"the sparseprefill lm-eval model needs lm-evaluation-harness ({SUPPORTED_LM_EVAL}) and its "
            f"Hugging Face backend; importing it failed ({type(_LM_EVAL_IMPORT_ERROR).__name__}: "
            f"{_LM_EVAL_IMPORT_ERROR}). Install it with: {INSTALL_HINT}"
        ) from _LM_EVAL_IMPORT_ERROR


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
    members = _union_members(annotation)
    expected = _type_label(annotation)
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


def summarize(report: Mapping[str, Any]) -> str:
    """One log line from ``SparsePrefillLM.sparse_report()``."""
    if report["mode"] == "dense":
        return "sparseprefill: dense baseline (model not patched)"
    density = report.get("density")
    phases = report.get("phases") or {}
    fallbacks = report.get("fallbacks") or {}
    sparse_calls = sum(count for phase, count in phases.items() if phase != "dense")
    line = (
        f"sparseprefill: {report['model_type']} pattern={report['pattern']} "
        f"density={'n/a' if density is None else f'{density:.4f}'} over {sparse_calls} sparse attention calls"
    )
    if fallbacks:
        line += "; dense calls: " + ", ".join(f"{reason}={count}" for reason, count in sorted(fallbacks.items()))
    if not sparse_calls:
        line += (
            f" (no call took the sparse path: prompts shorter than min_sparse_len="
            f"{report['config']['min_sparse_len']} run dense)"
        )
    return line


# ----------------------------------------------------------------------------------------------
# The lm-eval model
# ----------------------------------------------------------------------------------------------

if _LM_EVAL_IMPORT_ERROR is None:

    @register_model(MODEL_NAME)
    class SparsePrefillLM(HFLM):
        """lm-eval's ``HFLM`` whose model is patched by ``sparseprefill.patch`` once it has loaded."""

        def __init__(
            self,
            pretrained: Any,
            sparse_config: Any = None,
            profile: Any = None,
            dense: Any = False,
            allow_profile_mismatch: Any = False,
            **kwargs: Any,
        ) -> None:
            # Parse first: a bad argument should fail before minutes of weight loading. These keys
            # must not reach HFLM, which forwards unknown kwargs to from_pretrained.
            self._sparse_settings = resolve_settings(sparse_config, profile, dense, allow_profile_mismatch)
            super().__init__(pretrained=pretrained, **kwargs)
            settings = self._sparse_settings
            if settings.dense:
                logger.info("sparseprefill: dense=true, running %s unpatched", type(self.model).__name__)
                return
            target = self._patch_target()
            patch(
                target, settings.config, profile=settings.profile,
                allow_profile_mismatch=settings.allow_profile_mismatch,
            )
            logger.info(
                "sparseprefill: patched %s (pattern=%s, min_sparse_len=%d%s)",
                type(target).__name__, settings.config.pattern.value, settings.config.min_sparse_len,
                f", profile={settings.profile_source}" if settings.profile is not None else "",
            )

        def _patch_target(self) -> Any:
            # With peft=..., HFLM wraps the causal LM in a PeftModel; the attention lives in the base.
            model = self.model
            get_base_model = getattr(model, "get_base_model", None)
            return get_base_model() if callable(get_base_model) else model

        @property
        def sparse_settings(self) -> SparsePrefillSettings:
            return self._sparse_settings

        def sparse_stats(self) -> PatchStats | None:
            """``sparseprefill.stats`` of the model since it was patched; ``None`` under ``dense=true``."""
            if self._sparse_settings.dense:
                return None
            return stats(self._patch_target())

        def sparse_report(self) -> dict[str, Any]:
            """JSON-ready: mode, the config in force, the profile's source, and the density taken."""
            settings = self._sparse_settings
            report: dict[str, Any] = {
                "mode": "dense" if settings.dense else "sparse",
                "config": settings.config.to_dict(),
                "profile": settings.profile_source,
            }
            patch_stats = self.sparse_stats()
            if patch_stats is not None:
                report.update(patch_stats.to_dict())
            return report

        def get_model_info(self) -> dict:
            # simple_evaluate calls this once, after every request has run, and stores the result in
            # results["config"]: the natural place to log and record the density that was used.
            info = super().get_model_info()
            report = self.sparse_report()
            logger.info(summarize(report))
            info[MODEL_NAME] = report
            return info

else:  # pragma: no cover - exercised only where lm-eval is absent

    class SparsePrefillLM:  # type: ignore[no-redef]
        """Placeholder so the module imports without lm-eval; using it explains what to install."""

        def __init__(self, *args: Any, **kwargs: Any) -> None:
            _require_lm_eval()


def _cli_entry():
    """lm-eval's console-script function for the installed release."""
    _require_lm_eval()
    from lm_eval import __main__ as lm_eval_main

    # 0.4.x (0.4.10 to 0.4.13 at least) names its console script lm_eval.__main__:cli_evaluate.
    entry = getattr(lm_eval_main, "cli_evaluate", None)
    if entry is None:
        raise ImportError(
            "this lm-eval release has no lm_eval.__main__.cli_evaluate (found: "
            f"{', '.join(n for n in dir(lm_eval_main) if not n.startswith('_'))}); "
            f"sparseprefill supports {SUPPORTED_LM_EVAL}: {INSTALL_HINT}"
        )
    return entry


def main() -> None:
    """``sparseprefill-lm-eval``: lm-eval's own CLI with the ``sparseprefill`` model registered.

    This module is imported by the time ``main`` runs, so ``--model sparseprefill`` resolves; every
    argument is lm-eval's (``sparseprefill-lm-eval --help`` prints lm-eval's help)."""
    _cli_entry()()


if __name__ == "__main__":
    main()
