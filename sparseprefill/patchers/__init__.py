"""transformers integration (the only layer that knows transformers): ``patch``, ``unpatch``, ``stats``
and the inspection hooks live in ``patch.py``; ``attention.py`` routes every attention call,
``decode.py`` is the decode-time cache glue, ``masks.py`` the mask function, ``state.py`` the patch
state and statistics, ``support.py`` the supported families, ``tensor_parallel.py`` rank head slices."""

from .patch import (
    IMPLEMENTATION_NAME,
    SUPPORTED_FAMILIES,
    AlreadyPatchedError,
    FallbackReason,
    NotPatchedError,
    PatchStats,
    Phase,
    SparsePrefillMask,
    UnsupportedModelError,
    inspect_decode,
    inspect_prefill,
    is_patched,
    observe_prefill,
    patch,
    reset_stats,
    stats,
    unpatch,
)

__all__ = [
    "IMPLEMENTATION_NAME",
    "SUPPORTED_FAMILIES",
    "AlreadyPatchedError",
    "NotPatchedError",
    "UnsupportedModelError",
    "FallbackReason",
    "Phase",
    "PatchStats",
    "SparsePrefillMask",
    "patch",
    "unpatch",
    "stats",
    "reset_stats",
    "is_patched",
    "observe_prefill",
    "inspect_prefill",
    "inspect_decode",
]
