"""Where a sparse layer's time goes on the GPU: device work against host time, per step.

On post-RoPE q/k/v captured from Qwen2.5-Coder-0.5B (as ``real_speed.py --parts timing``), each step
of the default's sparse path is timed warm (``do_bench`` median) and profiled (``torch.profiler``):
the wall time of one call, the time the GPU spent in kernels (union of their intervals), the rest
(the GPU idle, waiting for the host), the number of kernels and of host-side torch ops. Steps:
``estimate_lines`` (scores + selection), ``estimate_index`` (+ per-block index), ``heldout_check``,
``run`` (estimate + attention, no routing), ``run_routed`` (what a patched layer runs on the GPU) and
dense cuDNN, for each of ``--candidates`` (``real_speed.py``'s configurations; ``auto`` is the default's
sparse path forced). Writes ``trace.csv`` and the op tables (and Chrome traces with ``--chrome-traces``).

    python experiments/layer_trace.py --lengths 32768 131072 --layers 0 6 23 --out DIR [--gguf F --metadata D]
    python experiments/layer_trace.py --candidates auto auto_unrouted auto_fused --lengths 32768 --out DIR
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

from sparseprefill.bench.common import bench_ms, git_commit, gpu_name, prefill_sdpa_backend, write_csv
from sparseprefill.bench.real_model import capture_layers, load_qwen_models, log
from sparseprefill.evals import offline_models
from sparseprefill.evals.logits import reference_input_ids
from sparseprefill.kernels.common import default_kv_head_index
from sparseprefill.patterns import build_pattern
from sparseprefill.patterns.cost import dense_break_even

from real_candidates import CANDIDATES  # noqa: E402  (one set of named configurations)

PROFILED_CALLS = 3  # calls per profile; the busy/idle split is their mean
FIELDS = ["length", "layer", "candidate", "step", "bench_ms", "wall_ms", "gpu_busy_ms", "gpu_idle_ms", "kernels", "host_ops",
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


def candidate_steps(name: str, q, k, v, out, kw) -> list[tuple]:
    """``(candidate, step, fn)`` for one configuration: its estimate, check and run as a patched layer
    runs them (routed as ``SparseConfig.route_dense_heads`` says)."""
    cfg = CANDIDATES[name]
    pattern = build_pattern(cfg.pattern, cfg)
    dense_above = dense_break_even(cfg.pattern, q.shape[-1]) if cfg.route_dense_heads else None
    steps = [(name, "estimate_index", lambda: pattern.estimate(q, k, **kw)),
             (name, "run", lambda: pattern.run(q, k, v, out=out, **kw)),
             (name, "run_as_patched", lambda: pattern.run(q, k, v, out=out, dense_above=dense_above, **kw))]
    if hasattr(pattern, "estimate_lines"):
        steps.insert(0, (name, "estimate_lines", lambda: pattern.estimate_lines(q, k, **kw)))
    if getattr(cfg.vertical_slash, "heldout_recall", None) is not None:
        index = pattern.estimate(q, k, **kw)
        steps.append((name, "heldout_check", lambda: pattern.unpredictable_heads(q, k, index, **kw)))
    return steps


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--lengths", type=int, nargs="+", default=[32768, 131072])
    ap.add_argument("--layers", type=int, nargs="+", default=[0, 6, 23])
    ap.add_argument("--gguf")
    ap.add_argument("--metadata")
    ap.add_argument("--out", default=".cache/layer_trace")
    ap.add_argument("--chrome-traces", action="store_true", help="also write one Chrome trace per step (large)")
    ap.add_argument("--candidates", nargs="+", default=["auto"], choices=[n for n in CANDIDATES if n != "default"])
    args = ap.parse_args(argv)
    if not torch.cuda.is_available():
        ap.error("layer_trace profiles GPU kernels and needs a CUDA device")
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    models = load_qwen_models(args.lengths, device="cuda", dtype="bfloat16", gguf=args.gguf, metadata=args.metadata)
    rows, commit, gpu = [], git_commit(), gpu_name("cuda")
    for length in args.lengths:
        model, tok = models[length > offline_models.QWEN_NATIVE_CONTEXT]
        ids = reference_input_ids(tok, length).to("cuda")
        for layer, (q, k, v, scale) in capture_layers(model, ids, args.layers).items():
            kvh = default_kv_head_index(q.shape[1], k.shape[1], q.device)
            kw = dict(scale=scale, softcap=None, kv_head_index=kvh)
            out = torch.empty_like(q)
            kr, vr = (t.repeat_interleave(q.shape[1] // k.shape[1], 1) for t in (k, v))
            steps = [("dense", "dense_cudnn", lambda: torch.nn.functional.scaled_dot_product_attention(
                q, kr, vr, is_causal=True, scale=scale))]
            for name in args.candidates:
                steps += candidate_steps(name, q, k, v, out, kw)
            for name, step, fn in steps:
                with prefill_sdpa_backend(q.device, "dense_cudnn"):
                    ms = bench_ms(fn, "cuda", rep=60)
                    prof = profile_step(fn, out_dir / f"trace_{length}_{layer}_{name}_{step}.json", args.chrome_traces)
                rows.append(dict(length=length, layer=layer, candidate=name, step=step, bench_ms=ms, gpu=gpu,
                                 commit=commit, **prof))
                log(f"{length} layer {layer} {name} {step}: {ms:.2f} ms (profiled wall {prof['wall_ms']:.2f}, GPU "
                    f"busy {prof['gpu_busy_ms']:.2f}, idle {prof['gpu_idle_ms']:.2f}; {prof['kernels']} kernels, "
                    f"{prof['host_ops']} host ops)")
                write_csv(out_dir / "trace.csv", FIELDS, rows)
        torch.cuda.empty_cache()
    return 0


if __name__ == "__main__":
    sys.exit(main())
