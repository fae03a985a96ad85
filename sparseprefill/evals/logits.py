"""How close a patched model's logits stay to dense: top-1 agreement and KL(dense || sparse).

Measured on natural text rather than on pass-key filler: the filler repeats five sentences, so
almost any attention predicts it and agreement there says little. The text is the Python
reference manual shipped with the standard library (``pydoc_data.topics``): English prose with
code, present offline on every CPython, identical for a given Python version.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass
from typing import Any

import torch

__all__ = [
    "DEFAULT_SCORED_POSITIONS",
    "LogitComparison",
    "reference_text",
    "long_reference_text",
    "reference_input_ids",
    "last_position_logits",
    "compare_logits",
]

# Positions at the end of the sequence whose next-token distributions are compared: these queries
# see the longest contexts (where sparsity drops the most pairs), and keeping only 256 rows of
# logits (``logits_to_keep``) avoids materialising [L, vocab] for the whole prompt.
DEFAULT_SCORED_POSITIONS = 256


@dataclass(frozen=True)
class LogitComparison:
    """Dense vs sparse next-token distributions over the last ``positions`` positions."""

    positions: int
    top1_agreement: float  # fraction of positions whose arg-max token is the same
    kl_mean: float  # mean over positions of KL(dense || sparse), in nats
    kl_max: float

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def reference_text() -> str:
    """About 465K characters of English technical prose (the Python reference manual's topics)."""
    try:
        from pydoc_data.topics import topics
    except ImportError:  # a stripped-down Python without pydoc_data: fall back to module docstrings
        import argparse  # noqa: E401
        import collections
        import email
        import json
        import logging
        import subprocess
        import typing
        import unittest

        modules = (argparse, collections, email, json, logging, subprocess, typing, unittest)
        return "\n\n".join(module.__doc__ or "" for module in modules) * 16
    return "\n\n".join(topics[name] for name in sorted(topics))


# Standard-library modules whose source follows the reference manual when a prompt needs more
# tokens than the manual's ~106K (Qwen's tokenizer): real Python code, on every CPython.
LONG_TEXT_MODULES = ("typing", "argparse", "pydoc", "inspect", "dataclasses", "pathlib", "subprocess",
                     "tarfile", "zipfile", "shutil", "difflib", "ast", "threading", "functools", "enum",
                     "datetime", "collections", "logging", "unittest.case", "http.client")


def long_reference_text() -> str:
    """``reference_text()`` followed by the source of ``LONG_TEXT_MODULES`` (about 1.7M characters)."""
    import importlib
    import inspect

    parts = [reference_text()]
    for name in LONG_TEXT_MODULES:
        try:
            parts.append(inspect.getsource(importlib.import_module(name)))
        except (ImportError, OSError, TypeError):  # a Python without sources: use what there is
            continue
    return "\n\n".join(parts)


def reference_input_ids(tokenizer: Any, num_tokens: int) -> torch.Tensor:
    """The first ``num_tokens`` tokens of ``reference_text()`` (continued by ``long_reference_text()``
    when the manual is too short): [1, num_tokens] int64."""
    text = reference_text()
    ids = tokenizer(text[: num_tokens * 8])["input_ids"]  # a token is rarely longer than 8 characters
    if len(ids) < num_tokens:
        ids = tokenizer(text)["input_ids"]
    if len(ids) < num_tokens:
        ids = tokenizer(long_reference_text())["input_ids"]
    if len(ids) < num_tokens:
        raise ValueError(f"reference text has only {len(ids)} tokens, {num_tokens} requested")
    return torch.tensor([ids[:num_tokens]])


@torch.inference_mode()
def last_position_logits(
    model: Any, input_ids: torch.Tensor, positions: int = DEFAULT_SCORED_POSITIONS
) -> tuple[torch.Tensor, float]:
    """One forward without a KV cache; returns (logits of the last ``positions`` positions
    [B, positions, V] in fp32, seconds taken)."""
    start = time.perf_counter()
    out = model(input_ids=input_ids.to(model.device), use_cache=False, logits_to_keep=positions)
    return out.logits.float(), time.perf_counter() - start


def compare_logits(dense_logits: torch.Tensor, sparse_logits: torch.Tensor) -> LogitComparison:
    """Compare next-token distributions position by position.

    Args:
        dense_logits, sparse_logits: [B, P, V] logits of the same P positions.
    """
    if dense_logits.shape != sparse_logits.shape:
        raise ValueError(f"shape mismatch: {tuple(dense_logits.shape)} vs {tuple(sparse_logits.shape)}")
    dense_log_probs = torch.log_softmax(dense_logits.float(), dim=-1)
    sparse_log_probs = torch.log_softmax(sparse_logits.float(), dim=-1)
    kl = (dense_log_probs.exp() * (dense_log_probs - sparse_log_probs)).sum(dim=-1)  # [B, P]
    agreement = (dense_logits.argmax(dim=-1) == sparse_logits.argmax(dim=-1)).float().mean()
    return LogitComparison(
        positions=dense_logits.shape[-2], top1_agreement=float(agreement),
        kl_mean=float(kl.mean()), kl_max=float(kl.max()),
    )
