"""What a profile was made for: ``ModelIdentity``, the fingerprint of a model config
(``model_identity``), and the check that a profile fits a model (``check_profile_matches``).

No transformers import: model configs are duck-typed objects with attributes.
"""

from __future__ import annotations

import enum
import hashlib
import json
import math
import re
import warnings
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from .fields import ProfileError, _req_int, _req_str, _show

if TYPE_CHECKING:
    from .schema import Profile

__all__ = [
    "ModelIdentity",
    "ProfileMismatchError",
    "ProfileMismatchWarning",
    "check_profile_matches",
    "model_identity",
]

FINGERPRINT_PREFIX = "sha256:"
_FINGERPRINT_RE = re.compile(r"sha256:[0-9a-f]{64}")

# The rope type transformers assumes when none is named; dropped from the fingerprint so that a
# config that spells it out and one that leaves it implicit fingerprint the same.
_DEFAULT_ROPE_TYPE = "default"


class ProfileMismatchError(ValueError):
    """A well-formed profile that does not fit the model it is applied to."""


class ProfileMismatchWarning(UserWarning):
    """A profile applied to a model that differs from its own, because ``allow_mismatch=True``."""


_MODEL_FIELDS = ("architecture", "model_type", "num_layers", "num_query_heads", "num_kv_heads", "head_dim", "fingerprint")
# Optional: the config fields the fingerprint hashes, so a mismatch can name each one that differs
# (profiles written before it was recorded still load; their mismatches name only the fingerprint).
_OPTIONAL_MODEL_FIELDS = ("fingerprinted",)
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
    fingerprinted: Mapping[str, Any] | None = field(default=None, hash=False)

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
        if self.fingerprinted is not None:
            if not isinstance(self.fingerprinted, Mapping) or not all(isinstance(k, str) for k in self.fingerprinted):
                raise ProfileError(f"{p}.fingerprinted", f"must be an object of config fields, got {_show(self.fingerprinted)}")
            if _fingerprint_of(self.fingerprinted) != self.fingerprint:
                raise ProfileError(f"{p}.fingerprinted", "does not hash to model.fingerprint (edited by hand?)")

    def to_dict(self) -> dict[str, Any]:
        out = {name: getattr(self, name) for name in _MODEL_FIELDS}
        if self.fingerprinted is not None:
            out["fingerprinted"] = dict(self.fingerprinted)
        return out



# ----------------------------------------------------------------------------------------------
# Fingerprint and matching
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
    fingerprinted = _json_safe(decisive)
    return ModelIdentity(
        architecture=architecture,
        model_type=model_type,
        num_layers=num_layers,
        num_query_heads=num_heads,
        num_kv_heads=num_kv_heads,
        head_dim=head_dim,
        fingerprint=_fingerprint_of(fingerprinted),
        fingerprinted=fingerprinted,
    )


def _fingerprint_of(fingerprinted: Mapping[str, Any]) -> str:
    canonical = json.dumps(_json_safe(fingerprinted), sort_keys=True, separators=(",", ":"), allow_nan=False)
    return FINGERPRINT_PREFIX + hashlib.sha256(canonical.encode("utf-8")).hexdigest()


def _fingerprinted_differences(found: ModelIdentity, mine: ModelIdentity) -> list[str]:
    """One line per config field behind a fingerprint difference, where the profile recorded them."""
    if mine.fingerprinted is None or found.fingerprinted is None:
        return ["  (this profile does not record the fingerprinted config fields; re-profile the model to see "
                "which ones differ)"]
    names = sorted(set(found.fingerprinted) | set(mine.fingerprinted))
    return [f"  config.{name}: model has {found.fingerprinted.get(name)!r}, profile says {mine.fingerprinted.get(name)!r}"
            for name in names if found.fingerprinted.get(name) != mine.fingerprinted.get(name)]


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
    if "fingerprint" in differing:
        lines += _fingerprinted_differences(found, mine)
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
