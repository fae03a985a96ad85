"""Where a sparse layer's time goes on the GPU: device work against host time, per step.

On post-RoPE q/k/v captured from Qwen2.5-Coder-0.5B (as ``real_speed.py --parts timing``), each step
of the default's sparse path is timed warm (``do_bench`` median) and profiled (``torch.profiler``):
the wall time of one call, the time the GPU spent in kernels (union of their intervals), the rest
(the GPU idle, waiting for the host), the number of kernels and of host-side torch ops. Steps:
``estimate_lines`` (scores + selection), ``estimate_index`` (+ per-block index), ``heldout_check``,
``run`` (estimate + attention, no routing), ``run_routed`` (what a patched layer runs on the GPU) and
dense cuDNN. Writes ``trace.csv`` and the op tables (and Chrome traces with ``--chrome-traces``).

    python experiments/layer_trace.py --lengths 32768 131072 --layers 0 6 23 --out DIR [--gguf F --metadata D]
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

from sparseprefill import SparseConfig
from sparseprefill.bench.common import bench_ms, git_commit, gpu_name, prefill_sdpa_backend, write_csv
from sparseprefill.bench.real_model import capture_layers, load_qwen_models, log
from sparseprefill.evals import offline_models
from sparseprefill.evals.logits import reference_input_ids
from sparseprefill.kernels.common import default_kv_head_index
from sparseprefill.patterns import build_pattern
from sparseprefill.patterns.cost import dense_break_even

PROFILED_CALLS = 3  # calls per profile; the busy/idle split is their mean
FIELDS = ["length", "layer", "step", "bench_ms", "wall_ms", "gpu_busy_ms", "gpu_idle_ms", "kernels", "host_ops",
          "gpu", "commit"]


def _union_ms(intervals: list[tuple[float, float]]) -> float:
    total, end = 0.0, float("-inf")
    for start, stop in sorted(intervals):
        if stop <= end:
            continue
        total += stop - max(start, end)
        end = stop
    return total / 1000.0


def profile_step(fn, trace_path: Path, chrome_trace: bool) -> dict:
    """Wall, GPU-busy and idle ms per call of ``fn`` (mean of ``PROFILED_CALLS``), kernels and host ops;
    the op table beside ``trace_path`` (and the Chrome trace itself with ``chrome_trace``)."""
    from torch.profiler import ProfilerActivity, profile

    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        for _ in range(PROFILED_CALLS):
            fn()
        torch.cuda.synchronize()
    if chrome_trace:
        prof.export_chrome_trace(str(trace_path))
    events = prof.events()
    gpu = [(e.time_range.start, e.time_range.end) for e in events if e.device_type == torch.autograd.DeviceType.CUDA]
    cpu_top = [e for e in events if e.device_type == torch.autograd.DeviceType.CPU and e.cpu_parent is None
               and not e.name.startswith("cuda")]
    starts = [e.time_range.start for e in events if e.device_type == torch.autograd.DeviceType.CPU]
    ends = [e.time_range.end for e in events]
    wall = (max(ends) - min(starts)) / 1000.0 / PROFILED_CALLS if starts else float("nan")
    busy = _union_ms(gpu) / PROFILED_CALLS
    (trace_path.with_suffix(".ops.txt")).write_text(
        prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=60))
    return dict(wall_ms=wall, gpu_busy_ms=busy, gpu_idle_ms=wall - busy, kernels=len(gpu) // PROFILED_CALLS,
                host_ops=len(cpu_top) // PROFILED_CALLS)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--lengths", type=int, nargs="+", default=[32768, 131072])
    ap.add_argument("--layers", type=int, nargs="+", default=[0, 6, 23])
    ap.add_argument("--gguf")
    ap.add_argument("--metadata")
    ap.add_argument("--out", default=".cache/layer_trace")
    ap.add_argument("--chrome-traces", action="store_true", help="also write one Chrome trace per step (large)")
    args = ap.parse_args(argv)
    if not torch.cuda.is_available():
        ap.error("layer_trace profiles GPU kernels and needs a CUDA device")
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    models = load_qwen_models(args.lengths, device="cuda", dtype="bfloat16", gguf=args.gguf, metadata=args.metadata)
    cfg = SparseConfig(min_sparse_len=0)
    pattern = build_pattern(cfg.pattern, cfg)
    rows, commit, gpu = [], git_commit(), gpu_name("cuda")
    for length in args.lengths:
        model, tok = models[length > offline_models.QWEN_NATIVE_CONTEXT]
        ids = reference_input_ids(tok, length).to("cuda")
        for layer, (q, k, v, scale) in capture_layers(model, ids, args.layers).items():
            kvh = default_kv_head_index(q.shape[1], k.shape[1], q.device)
            kw = dict(scale=scale, softcap=None, kv_head_index=kvh)
            out = torch.empty_like(q)
            index = pattern.estimate(q, k, **kw)
            kr, vr = (t.repeat_interleave(q.shape[1] // k.shape[1], 1) for t in (k, v))
            steps = {
                "estimate_lines": lambda: pattern.estimate_lines(q, k, **kw),
                "estimate_index": lambda: pattern.estimate(q, k, **kw),
                "heldout_check": lambda: pattern.unpredictable_heads(q, k, index, **kw),
                "run": lambda: pattern.run(q, k, v, out=out, **kw),
                "run_routed": lambda: pattern.run(q, k, v, out=out, dense_above=dense_break_even(cfg.pattern, q.shape[-1]), **kw),
                "dense_cudnn": lambda: torch.nn.functional.scaled_dot_product_attention(q, kr, vr, is_causal=True, scale=scale),
            }
            for step, fn in steps.items():
                with prefill_sdpa_backend(q.device, "dense_cudnn"):
                    ms = bench_ms(fn, "cuda", rep=60)
                    prof = profile_step(fn, out_dir / f"trace_{length}_{layer}_{step}.json", args.chrome_traces)
                row = dict(length=length, layer=layer, step=step, bench_ms=ms, gpu=gpu, commit=commit, **prof)
                rows.append(row)
                log(f"{length} layer {layer} {step}: {ms:.2f} ms (profiled wall {prof['wall_ms']:.2f}, GPU busy "
                    f"{prof['gpu_busy_ms']:.2f}, idle {prof['gpu_idle_ms']:.2f}; {prof['kernels']} kernels, "
                    f"{prof['host_ops']} host ops)")
                write_csv(out_dir / "trace.csv", FIELDS, rows)
        torch.cuda.empty_cache()
    return 0


if __name__ == "__main__":
    sys.exit(main())
