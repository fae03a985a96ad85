"""What every benchmark shares: timing, SDPA backend choice, run metadata and CSV rows.

- timing: ``sync``, ``bench_ms`` (``triton.testing.do_bench`` median on the GPU, median of a few
  wall-clock calls on the CPU), ``time_ms`` (CUDA events, every repeat) and ``measure_generate``
  (TTFT with a KV cache and per-decode-step times of one greedy ``generate``);
- SDPA backends: ``prefill_sdpa_backend`` (one variant's backend) and ``decode_sdpa_backends``
  (the same backends for every variant's dense decode steps);
- metadata: ``git_commit``, ``gpu_name``, ``environment`` (device, GPU, torch, transformers, commit);
- CSV: ``write_csv`` (dicts or dataclass rows, overwrite or append), ``append_csv`` (as it goes).

``HEADS``, ``KV_HEADS``, ``HEAD_DIM``: Llama-3.1-8B attention, the shape of the per-layer benchmarks.
"""

from __future__ import annotations

import contextlib
import csv
import math
import os
import subprocess
import time
from dataclasses import asdict, is_dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Mapping, Sequence

import torch

HEADS, KV_HEADS, HEAD_DIM = 32, 8, 128  # Llama-3.1-8B attention: query heads, KV heads, head_dim

# ``triton.testing.do_bench`` budgets in milliseconds (its own defaults).
DO_BENCH_WARMUP_MS = 25
DO_BENCH_REP_MS = 100
CPU_TIMED_CALLS = 3  # wall-clock calls after one warm-up call, on the CPU


# ----------------------------------------------------------------------------------------- timing


def sync(device: torch.device) -> None:
    """Wait for ``device``'s queued work (a no-op on the CPU)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def bench_ms(fn: Callable[[], Any], device: torch.device | str = "cuda", *, warmup: int = DO_BENCH_WARMUP_MS,
             rep: int = DO_BENCH_REP_MS) -> float:
    """Median milliseconds per call of ``fn``: ``triton.testing.do_bench`` (``warmup`` / ``rep`` in ms)
    on the GPU; on the CPU one warm-up call, then the median of ``CPU_TIMED_CALLS`` timed calls."""
    device = torch.device(device)
    if device.type == "cuda":
        import triton.testing

        return float(triton.testing.do_bench(fn, warmup=warmup, rep=rep, return_mode="median"))
    fn()
    times = []
    for _ in range(CPU_TIMED_CALLS):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return 1e3 * sorted(times)[len(times) // 2]


def time_ms(fn: Callable[[], Any], device: torch.device, *, warmup: int, repeats: int) -> list[float]:
    """Milliseconds of ``repeats`` calls after ``warmup`` calls (CUDA events on the GPU)."""
    for _ in range(warmup):
        fn()
    sync(device)
    times = []
    for _ in range(repeats):
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            times.append(float(start.elapsed_time(end)))
        else:
            t0 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) * 1e3)
    return times


class _StepClock:
    """A ``generate`` streamer that timestamps the prompt and every new token (synchronising first).
    ``prefill_context`` is entered before the prompt's forward pass and left once the first token is
    out, so it governs the prefill alone (e.g. one SDPA backend) and decode runs outside it."""

    def __init__(self, device: torch.device, prefill_context=None, decode_context=None):
        self.device = device
        self.stamps: list[float] = []
        self.stack = contextlib.ExitStack()
        self.decode_context = decode_context
        if prefill_context is not None:
            self.stack.enter_context(prefill_context)

    def put(self, value) -> None:
        sync(self.device)
        self.stamps.append(time.perf_counter())
        if len(self.stamps) == 2:
            self.stack.close()
            if self.decode_context is not None:
                self.stack.enter_context(self.decode_context)

    def end(self) -> None:
        self.stack.close()


def measure_generate(model, input_ids: torch.Tensor, new_tokens: int, device: torch.device, pad_token_id: int,
                     prefill_context=None, decode_context=None) -> tuple[float, list[float]]:
    """One greedy ``generate`` of ``input_ids`` ``[B, L]``: (TTFT with cache in ms, per-decode-step ms)."""
    sync(device)
    start = time.perf_counter()
    clock = _StepClock(device, prefill_context, decode_context)
    try:
        with torch.inference_mode():
            model.generate(input_ids, attention_mask=torch.ones_like(input_ids), max_new_tokens=new_tokens,
                           min_new_tokens=new_tokens, do_sample=False, streamer=clock, pad_token_id=pad_token_id)
    finally:
        clock.stack.close()
    # stamps[0]: the prompt (before prefill); stamps[1]: first new token; then one per decode step.
    ttft = (clock.stamps[1] - start) * 1e3 if len(clock.stamps) > 1 else float("nan")
    steps = [(b - a) * 1e3 for a, b in zip(clock.stamps[1:], clock.stamps[2:])]
    return ttft, steps


# ----------------------------------------------------------------------------------- SDPA backends


@contextlib.contextmanager
def prefill_sdpa_backend(device: torch.device, variant: str) -> Iterator[None]:
    """Only the variant's SDPA backend: flash for ``dense_flash``, cuDNN otherwise (the sparse variant's
    dense fallbacks get the baseline's). CUDA only; a no-op on the CPU."""
    if device.type != "cuda":
        yield
        return
    from torch.nn.attention import SDPBackend, sdpa_kernel

    backend = SDPBackend.FLASH_ATTENTION if variant == "dense_flash" else SDPBackend.CUDNN_ATTENTION
    with sdpa_kernel([backend]):
        yield


@contextlib.contextmanager
def decode_sdpa_backends(device: torch.device) -> Iterator[None]:
    """The same SDPA backends for every variant's (dense) decode steps: flash, efficient, math. cuDNN
    is left out: on an H200 its single-query path cost ~39 ms per token against flash's ~14 ms (8B
    model, 4K-64K), apparently a new cuDNN graph for every KV length."""
    if device.type != "cuda":
        yield
        return
    from torch.nn.attention import SDPBackend, sdpa_kernel

    with sdpa_kernel([SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH]):
        yield


# ---------------------------------------------------------------------------------------- metadata


def git_commit(checkout: Path | None = None) -> str:
    """``$SPARSEPREFILL_COMMIT`` if set, else the short commit of the checkout holding this package
    (``-dirty`` appended when tracked files differ from it, so a row never names a commit that is not
    what ran), else ``"unknown"`` (an installed wheel). ``checkout``: another folder to ask instead."""
    if os.environ.get("SPARSEPREFILL_COMMIT"):
        return os.environ["SPARSEPREFILL_COMMIT"]
    here = checkout or Path(__file__).parent
    try:
        commit = subprocess.check_output(["git", "rev-parse", "--short", "HEAD"], text=True,
                                         stderr=subprocess.DEVNULL, cwd=here).strip()
        changed = subprocess.check_output(["git", "status", "--porcelain", "--untracked-files=no"], text=True,
                                          stderr=subprocess.DEVNULL, cwd=here).strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    return f"{commit}-dirty" if changed else commit


def gpu_name(device: torch.device | str | None = None) -> str:
    """The CUDA device's name, or ``"cpu"`` for a CPU device."""
    device = torch.device("cuda") if device is None else torch.device(device)
    return torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"


def environment(device: torch.device) -> dict[str, str]:
    """Where a row was measured: device type, GPU name, torch and transformers versions, commit."""
    import transformers

    return dict(device=device.type, gpu=gpu_name(device), torch=torch.__version__,
                transformers=transformers.__version__, commit=git_commit())


# --------------------------------------------------------------------------------------------- CSV


def compact_float(value: Any) -> Any:
    """Floats to 6 significant digits and NaN to an empty cell; anything else unchanged."""
    if isinstance(value, float):
        return "" if math.isnan(value) else f"{value:.6g}"
    return value


def write_csv(path: str | Path, fields: Sequence[str], rows: Iterable[Mapping[str, Any] | Any], *,
              append: bool = False, compact_floats: bool = False) -> Path:
    """Write ``rows`` (dicts or dataclass instances) under the header ``fields``, creating the folder.

    ``append``: add to an existing file (the header only when the file is new). ``compact_floats``:
    cells through ``compact_float``; otherwise the csv module's own formatting (``repr`` of floats).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    new = not (append and path.exists())
    with open(path, "a" if append else "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(fields))
        if new:
            writer.writeheader()
        for row in rows:
            cells = asdict(row) if is_dataclass(row) else dict(row)
            writer.writerow({k: compact_float(v) for k, v in cells.items()} if compact_floats else cells)
    return path


def append_csv(path: str | Path | None, fields: Sequence[str], rows: Sequence[Mapping[str, Any]]) -> None:
    """Append ``rows`` to the CSV at ``path`` (the header when the file is new) and say so; nothing
    without a path or rows (a benchmark writing as it goes keeps what it measured before a failure)."""
    if not path or not rows:
        return
    write_csv(path, fields, rows, append=True)
    print(f"wrote {len(rows)} rows to {path}")
