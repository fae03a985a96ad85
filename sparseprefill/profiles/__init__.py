"""Per-head profiles: a versioned JSON format naming each head's pattern and budgets.

``load_profile`` validates a file completely; ``check_profile_matches`` checks it fits a model;
``HeadSetting.to_config`` turns one head's setting into the ``SparseConfig`` its pattern is built
from; ``import_minference`` converts MInference's per-head pattern files. No transformers import.
"""

from __future__ import annotations

from pathlib import Path

from .minference import MINFERENCE_PATTERNS, MINFERENCE_SEARCH_LENGTH, import_minference
from .schema import (
    ALLOWED_PATTERNS,
    MEASURED_KEYS,
    PATTERN_PARAMS,
    PROFILE_FORMAT,
    PROFILE_SCHEMA_PATH,
    PROFILE_VERSION,
    Calibration,
    HeadSetting,
    LayerDecodeSetting,
    ModelIdentity,
    ParamKind,
    ParamSpec,
    Profile,
    ProfileError,
    ProfileMismatchError,
    ProfileMismatchWarning,
    check_profile_matches,
    load_profile,
    model_identity,
    save_profile,
)

SHIPPED_DIR = Path(__file__).parent / "shipped"


def shipped_profile(name: str) -> Profile:
    """A profile shipped with sparseprefill, by file stem (``shipped_profile("smollm2-135m-instruct")``)."""
    path = SHIPPED_DIR / f"{name}.json"
    if not path.is_file():
        available = sorted(p.stem for p in SHIPPED_DIR.glob("*.json"))
        raise FileNotFoundError(f"no shipped profile {name!r}; available: {', '.join(available) or 'none'}")
    return load_profile(path)


__all__ = [
    "ALLOWED_PATTERNS",
    "SHIPPED_DIR",
    "shipped_profile",
    "Calibration",
    "HeadSetting",
    "LayerDecodeSetting",
    "MEASURED_KEYS",
    "MINFERENCE_PATTERNS",
    "MINFERENCE_SEARCH_LENGTH",
    "ModelIdentity",
    "PATTERN_PARAMS",
    "PROFILE_FORMAT",
    "PROFILE_SCHEMA_PATH",
    "PROFILE_VERSION",
    "ParamKind",
    "ParamSpec",
    "Profile",
    "ProfileError",
    "ProfileMismatchError",
    "ProfileMismatchWarning",
    "check_profile_matches",
    "import_minference",
    "load_profile",
    "model_identity",
    "save_profile",
]
