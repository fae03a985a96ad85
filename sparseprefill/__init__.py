"""sparseprefill: training-free dynamic sparse prefill for Hugging Face causal LMs.

    import sparseprefill
    sparseprefill.patch(model)            # adaptive default
    sparseprefill.patch(model, profile=sparseprefill.shipped_profile("smollm2-135m-instruct"))
    sparseprefill.patch(model, sparseprefill.SparseConfig(decode="topk"))  # + top-k KV retrieval at decode
    sparseprefill.stats(model)            # per layer: phase, density, fallbacks
    sparseprefill.unpatch(model)
"""

from __future__ import annotations

from ._version import __version__
from .config import (
    AntidiagonalConfig,
    AntidiagonalScoring,
    AShapeConfig,
    BlockSparseConfig,
    ColumnLayout,
    DecodeMethod,
    DecodeRetrievalConfig,
    PatternName,
    RangeLayout,
    SparseConfig,
    VerticalSlashConfig,
)
from .patchers import (
    SUPPORTED_FAMILIES,
    AlreadyPatchedError,
    NotPatchedError,
    UnsupportedModelError,
    is_patched,
    patch,
    reset_stats,
    stats,
    unpatch,
)
from .profiles import (
    Profile,
    ProfileError,
    ProfileMismatchError,
    load_profile,
    save_profile,
    shipped_profile,
)

__all__ = [
    "__version__",
    "AShapeConfig",
    "AlreadyPatchedError",
    "AntidiagonalConfig",
    "AntidiagonalScoring",
    "BlockSparseConfig",
    "DecodeMethod",
    "DecodeRetrievalConfig",
    "NotPatchedError",
    "PatternName",
    "Profile",
    "ProfileError",
    "ProfileMismatchError",
    "RangeLayout",
    "ColumnLayout",
    "SUPPORTED_FAMILIES",
    "SparseConfig",
    "UnsupportedModelError",
    "VerticalSlashConfig",
    "is_patched",
    "load_profile",
    "patch",
    "reset_stats",
    "save_profile",
    "shipped_profile",
    "stats",
    "unpatch",
]
