"""Where one layer's sparse attention spends its time: torch.profiler tables on the GPU.

For each length, one layer of Llama-3.1-8B attention shapes (32 query heads, 8 KV heads, head_dim 128,
bf16, the kernel benchmark's structured input) with the end-to-end benchmark's fixed vertical-slash
budget (``bench.budget.fixed_budget_config``, density ``--density``): the estimate, the attention, the
whole ``run`` (estimate, attention and the pair count for the stats) and cuDNN SDPA, each with its wall
time per call (host included), its ``triton.testing.do_bench`` median and the profiler's table of
GPU kernels and host ops. Then, unless ``--no-decode``, the decode-step selection at batch 1 (page
scoring and top-k over a 16-token-page mean/std summary, 2,048-token budget).

    sparseprefill bench layer --lengths 32768 131072 > profile.txt      # GPU machine
    sparseprefill bench layer --dry-run --out /tmp/layer                # CPU: tiny shapes, host ops only

``--out DIR`` also writes ``layer.csv``: op, length, wall_ms, median_ms, gpu, commit (one row per table).
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from dataclasses import dataclass

import torch

from ..config import VerticalSlashConfig
from ..kernels.decode import page_scores, page_summary, select_pages, top_k_pages
from ..kernels.geometry import causal_pairs_total
from ..patterns.vertical_slash import VerticalSlashPattern
from .budget import fixed_budget_config
from .common import HEAD_DIM, HEADS, KV_HEADS, append_csv, bench_ms, git_commit, gpu_name, sync
from .kernels import structured_qkv

DECODE_PAGE, DECODE_BUDGET = 16, 2048
CSV_FIELDS = ["op", "length", "wall_ms", "median_ms", "gpu", "commit"]


@dataclass(frozen=True)
class LayerShape:
    """Attention shape and call counts of one profiling run."""

    heads: int = HEADS
    kv_heads: int = KV_HEADS
    head_dim: int = HEAD_DIM
    timed_calls: int = 20  # wall-clock calls per op (host launch cost included)
    profiled_calls: int = 5


# The dry run: a small layer (head_dim holds structured_qkv's 18 structure channels) and a few calls.
DRY_RUN_SHAPE = LayerShape(heads=4, kv_heads=2, head_dim=32, timed_calls=2, profiled_calls=1)
DRY_RUN_LENGTHS = [512]
DEFAULT_LENGTHS = [32768, 131072]


def report(name: str, fn, rows: int, device: torch.device, shape: LayerShape) -> tuple[float, float]:
    """Time ``fn`` (wall per call, ``bench_ms`` median) and print the profiler table of
    ``shape.profiled_calls`` calls; returns ``(wall_ms, median_ms)``."""
    from torch.profiler import ProfilerActivity, profile

    fn()
    sync(device)
    start = time.perf_counter()
    for _ in range(shape.timed_calls):
        fn()
    sync(device)
    wall = (time.perf_counter() - start) / shape.timed_calls * 1e3
    median = bench_ms(fn, device)
    cuda = device.type == "cuda"
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    with profile(activities=activities) as prof:
        for _ in range(shape.profiled_calls):
            fn()
        sync(device)
    print(f"\n===== {name}: wall/call {wall:.3f} ms, do_bench {median:.3f} ms "
          f"(table: totals over {shape.profiled_calls} calls)", flush=True)
    print(prof.key_averages().table(sort_by="cuda_time_total" if cuda else "cpu_time_total", row_limit=rows,
                                    max_name_column_width=60), flush=True)
    return wall, median


def profile_prefill(length: int, density: float | None, rows: int, device: torch.device,
                    shape: LayerShape) -> list[tuple[str, float, float]]:
    """Estimate, attend, run and SDPA of one layer at ``length`` tokens: ``(op, wall_ms, median_ms)``.
    ``density`` None profiles the default vertical-slash config (the mass rule) instead of a fixed budget."""
    kv_head_index = torch.arange(shape.heads, device=device) // (shape.heads // shape.kv_heads)
    scale = shape.head_dim**-0.5
    if density is None:
        vs = VerticalSlashConfig()
        print(f"L={length} default vertical-slash config (mass {vs.vertical_mass} / {vs.slash_mass})")
    else:
        config, predicted, _ = fixed_budget_config("vertical_slash", length, density, min_sparse_len=0,
                                                   device=device)
        vs = config.vertical_slash
        print(f"L={length} max_vertical={vs.max_vertical} max_slash={vs.max_slash} predicted density {predicted:.3f}")
    q, k, v = structured_qkv(shape.heads, shape.kv_heads, length, shape.head_dim, device)  # [B, H(kv), L, D]
    pattern = VerticalSlashPattern(vs)
    common = dict(scale=scale, softcap=None, kv_head_index=kv_head_index)
    index = pattern.estimate(q, k, **common)
    kept = float(index.computed_pairs().sum()) / (causal_pairs_total(length, length) * shape.heads)
    print(f"L={length} {shape.heads}/{shape.kv_heads} heads, head_dim {shape.head_dim}: density {kept:.3f}")
    out = torch.empty_like(q)
    # "estimate" + "attend" is the per-block index path (the index builder sizes its tables with one
    # host read); "run" is what patch() takes: the lines ("estimate_lines") straight into the fused
    # kernel, with no host wait.
    ops = {
        "estimate": lambda: pattern.estimate(q, k, **common),
        "attend": lambda: pattern.attend(q, k, v, index, out=out, **common),
        "estimate_lines": lambda: pattern.estimate_lines(q, k, **common),
        "run": lambda: pattern.run(q, k, v, out=out, **common),
        "sdpa": lambda: torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True),
    }
    return [(op, *report(f"{op} L={length}", fn, rows, device, shape)) for op, fn in ops.items()]


def profile_decode_selection(length: int, rows: int, device: torch.device,
                             shape: LayerShape) -> list[tuple[str, float, float]]:
    """Page scoring and top-k selection of one decode step over ``length`` cached keys."""
    dtype = torch.bfloat16
    k = torch.randn(1, shape.kv_heads, length, shape.head_dim, device=device, dtype=dtype)  # [B, Hkv, L, D]
    q = torch.randn(1, shape.heads, 1, shape.head_dim, device=device, dtype=dtype)  # [B, H, 1, D]
    scale = shape.head_dim**-0.5
    summary = page_summary(k, page_size=DECODE_PAGE, stats=("mean_std",))
    scores = page_scores(q, summary, scale=scale)
    ops = {
        "top_k_pages": lambda: top_k_pages(q, summary, scale=scale, budget_tokens=DECODE_BUDGET),
        "page_scores": lambda: page_scores(q, summary, scale=scale),
        "select_pages": lambda: select_pages(scores, num_tokens=length, page_size=DECODE_PAGE,
                                             budget_tokens=DECODE_BUDGET),
    }
    return [(op, *report(f"{op} L={length}", fn, rows, device, shape)) for op, fn in ops.items()]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--lengths", type=int, nargs="+", default=None,
                        help=f"prompt lengths (default {' '.join(map(str, DEFAULT_LENGTHS))}; "
                             f"{' '.join(map(str, DRY_RUN_LENGTHS))} in --dry-run)")
    parser.add_argument("--density", type=float, default=0.1,
                        help="fixed vertical-slash budget (share of causal pairs); 0 profiles the default "
                             "config's mass rule instead")
    parser.add_argument("--heads", type=int, default=HEADS, help="query heads (default: Llama-3.1-8B's)")
    parser.add_argument("--kv-heads", type=int, default=KV_HEADS)
    parser.add_argument("--head-dim", type=int, default=HEAD_DIM)
    parser.add_argument("--rows", type=int, default=18, help="profiler table rows")
    parser.add_argument("--no-decode", action="store_true", help="skip the decode selection part")
    parser.add_argument("--dry-run", action="store_true",
                        help=f"CPU, a {DRY_RUN_SHAPE.heads}-head layer, host ops only: checks the code path")
    parser.add_argument("--out", default=None, help="folder for layer.csv (wall and median ms per table)")


def run_from_args(args: argparse.Namespace) -> int:
    if args.dry_run:
        device, shape, lengths = torch.device("cpu"), DRY_RUN_SHAPE, args.lengths or DRY_RUN_LENGTHS
    elif not torch.cuda.is_available():
        print("error: the layer profile needs a CUDA GPU; pass --dry-run without one", file=sys.stderr)
        return 1
    else:
        if args.heads % args.kv_heads:
            print(f"error: --heads {args.heads} is not a multiple of --kv-heads {args.kv_heads}", file=sys.stderr)
            return 2
        device, lengths = torch.device("cuda"), args.lengths or DEFAULT_LENGTHS
        shape = LayerShape(heads=args.heads, kv_heads=args.kv_heads, head_dim=args.head_dim)
    density = args.density or None
    timings: list[tuple[int, str, float, float]] = []
    for length in lengths:
        timings += [(length, *t) for t in profile_prefill(length, density, args.rows, device, shape)]
        if device.type == "cuda":
            torch.cuda.empty_cache()
    if not args.no_decode:
        for length in lengths:
            timings += [(length, *t) for t in profile_decode_selection(length, args.rows, device, shape)]
    if args.out:
        os.makedirs(args.out, exist_ok=True)
        gpu, commit = gpu_name(device), git_commit()
        append_csv(os.path.join(args.out, "layer.csv"), CSV_FIELDS, [
            dict(op=op, length=length, wall_ms=f"{wall:.4f}", median_ms=f"{median:.4f}", gpu=gpu, commit=commit)
            for length, op, wall, median in timings])
    return 0


def main(argv=None) -> int:
    from . import command_main

    return command_main(__doc__, add_arguments, run_from_args, argv)


if __name__ == "__main__":
    sys.exit(main())
