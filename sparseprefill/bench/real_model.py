"""Measuring a real model, patched and not: what the real-model experiments share.

- ``load_qwen_models``: Qwen2.5-Coder-0.5B once per rope setting the lengths need (YaRN past 32K);
- ``log``: a timestamped progress line on stderr;
- ``capture_layers``: post-RoPE q/k/v of chosen layers from one exact forward (the patch's inspector
  hook on a keep-everything dense plan), to time or study attention on real inputs;
- ``next_token_nll``: mean next-token NLL of the scored positions;
- ``scored_logits`` / ``agreement`` / ``stats_columns``: the logits of the last positions under one SDPA
  backend, how a candidate's agree with a reference's (NLL delta, top-1, KL), and what ``stats()`` says;
- ``prefill_ms``: wall-clock median of warm prefills (``model(ids)``) under one SDPA backend;
- ``passkey_hits``: the digit-forced pass key at several depths;
- ``describe_row`` / ``write_rows``: a result row as one log line, and rows with differing keys as one
  CSV (the union of their keys, blanks where a row has none).
"""

from __future__ import annotations

import math

import sys
import time
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from ..config import SparseConfig
from ..evals import offline_models
from ..evals.logits import compare_logits
from ..evals.passkey import answer_passkey, build_passkey_prompt
from ..patchers import PatchStats, inspect_prefill, patch, unpatch
from .common import bench_ms, prefill_sdpa_backend, sync, write_csv

__all__ = ["NEEDLE_DEPTHS", "agreement", "capture_layers", "describe_row", "load_qwen_models", "log",
           "next_token_nll", "prefill_ms", "passkey_hits", "scored_logits", "stats_columns", "write_rows"]

NEEDLE_DEPTHS = (0.1, 0.3, 0.5, 0.7, 0.9)
# Warm prefills timed per measurement (after one untimed call): whole prefills take 0.05-2 s, so a few
# calls give a stable median without do_bench's fixed time budget.
TIMED_PREFILLS = 3


def log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def load_qwen_models(lengths: Iterable[int], *, device: str, dtype: str, gguf: str | None = None,
                     metadata: str | None = None) -> dict[bool, tuple[Any, Any]]:
    """``{long_context: (model, tokenizer)}``: Qwen2.5-Coder-0.5B-Instruct in ``dtype`` on ``device``, with
    YaRN (``long_context=True``) for the lengths past its native context and without for the others.
    ``gguf`` installs a carried GGUF file into the cache first; ``metadata`` is a tokenizer/config folder
    from ``offline_models.export_metadata`` (for machines whose transformers builds them wrongly)."""
    if gguf:
        offline_models.install_gguf(offline_models.QWEN_CODER, gguf)
    models = {}
    for long in sorted({length > offline_models.QWEN_NATIVE_CONTEXT for length in lengths}):
        model, tok = offline_models.load_qwen_coder(dtype=getattr(torch, dtype), long_context=long, metadata=metadata)
        models[long] = (model.to(device), tok)
    return models


def capture_layers(model: Any, ids: torch.Tensor, layers: Iterable[int] | None = None) -> dict[int, tuple]:
    """``{layer: (q [B, H, L, D], k [B, Hkv, L, D], v, scale)}`` post-RoPE, from one forward whose
    attention is exact (every head on the dense pattern), for ``layers`` (all when None)."""
    wanted = None if layers is None else set(layers)
    got: dict[int, tuple] = {}

    def inspector(layer, q, k, v, out, selections, *, scale, softcap=None):
        if wanted is None or layer in wanted:
            got[layer] = (q.clone(), k.clone(), v.clone(), scale)

    patch(model, SparseConfig.keep_everything(pattern="dense"))
    try:
        with inspect_prefill(model, inspector), torch.no_grad():
            model(ids, logits_to_keep=1)
    finally:
        unpatch(model)
    return dict(sorted(got.items()))


def next_token_nll(logits: torch.Tensor, ids: torch.Tensor) -> float:
    """Mean next-token NLL of the last P positions: ``logits [1, P + 1, V]`` (the last one unused)
    predict the last P tokens of ``ids [1, L]``."""
    targets = ids[0, -(logits.shape[1] - 1):]
    return float(torch.nn.functional.cross_entropy(logits[0, :-1].float(), targets, reduction="mean"))


def scored_logits(model: Any, ids: torch.Tensor, positions: int, variant: str = "dense_cudnn") -> torch.Tensor:
    """fp32 logits ``[1, positions + 1, V]`` of the last ``positions + 1`` positions of ``ids [1, L]``
    (the last predicts nothing scored), prefilled with only ``variant``'s SDPA backend."""
    with torch.no_grad(), prefill_sdpa_backend(ids.device, variant):
        return model(ids, logits_to_keep=positions + 1).logits.float()


def agreement(reference: torch.Tensor, logits: torch.Tensor, ids: torch.Tensor) -> dict[str, float]:
    """How ``logits`` agree with ``reference`` (both from ``scored_logits``) on the scored positions:
    NLL and its delta, top-1 agreement with its binomial standard error over the compared positions
    (``top1_se``: over 512 positions a top-1 near 0.97 resolves about +-0.0075, which is the size of
    most differences the candidates' tables are read for), mean and max KL(reference || logits)."""
    comparison = compare_logits(reference[:, :-1], logits[:, :-1])
    nll = next_token_nll(logits, ids)
    positions = reference.shape[0] * max(reference.shape[1] - 1, 1)
    top1 = comparison.top1_agreement
    return dict(nll=nll, nll_delta=nll - next_token_nll(reference, ids), top1=top1,
                top1_se=math.sqrt(max(top1 * (1.0 - top1), 0.0) / positions),
                kl=comparison.kl_mean, kl_max=comparison.kl_max)


def stats_columns(stats: PatchStats) -> dict[str, Any]:
    """A patched prefill's density and dense fallbacks (``reason:count;...``, None when there were none)."""
    fallbacks = ";".join(f"{reason}:{count}" for reason, count in sorted(stats.fallbacks.items())) or None
    return dict(density=stats.density, fallbacks=fallbacks)


def prefill_ms(model: Any, ids: torch.Tensor, variant: str, repeats: int = TIMED_PREFILLS) -> float:
    """Median milliseconds of a warm prefill ``model(ids, logits_to_keep=1)`` with only ``variant``'s
    SDPA backend (``bench.common.prefill_sdpa_backend``); on the CPU, ``bench_ms``'s wall clock."""
    device = ids.device
    call = lambda: model(ids, logits_to_keep=1)  # noqa: E731
    with prefill_sdpa_backend(device, variant), torch.no_grad():
        if device.type != "cuda":
            return bench_ms(call, device)
        call()
        times = []
        for _ in range(repeats):
            sync(device)
            start = time.perf_counter()
            call()
            sync(device)
            times.append(1e3 * (time.perf_counter() - start))
    return sorted(times)[len(times) // 2]


def passkey_hits(model: Any, tokenizer: Any, length: int, depths: Sequence[float] = NEEDLE_DEPTHS) -> list[bool]:
    """Whether the digit-forced answer finds the pass key hidden at each depth of a ``length``-token
    prompt (prompt ``i`` uses key seed ``i``); prefills run with the cuDNN-only SDPA backend."""
    hits = []
    for i, depth in enumerate(depths):
        prompt = build_passkey_prompt(tokenizer, length, depth=depth, seed=i)
        with prefill_sdpa_backend(model.device, "dense_cudnn"):
            hits.append(answer_passkey(model, tokenizer, prompt, free_tokens=8).forced_correct)
    return hits


def describe_row(row: Mapping[str, Any]) -> str:
    """``key=value, ...`` with floats to 4 significant digits."""
    return ", ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in row.items())


def write_rows(path: str | Path, rows: Sequence[Mapping[str, Any]]) -> None:
    """``rows`` as one CSV whose columns are the union of their keys, in first-seen order."""
    fields = list(dict.fromkeys(key for row in rows for key in row))
    write_csv(path, fields, [{f: row.get(f) for f in fields} for row in rows])
