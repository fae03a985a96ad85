"""Top-k KV page retrieval for decode: per-step kernel timings and selection accuracy.

GPU (the device machine), Llama-3.1-8B attention shapes (32 query heads, 8 KV heads, head_dim 128,
bf16): for each context, batch and page size, ``triton.testing.do_bench`` medians of

    summary_update   page-summary update after appending one token (one page recomputed)
    summary_build    bulk build over the whole cache (end of prefill; for reference)
    score            page scoring (mean+std; Quest as score_quest)
    select           top-k selection (torch.topk) over the scores
    score_select     both, as one decode step runs them
    sparse_attn      split-K sparse decode attention over the selected pages
    sparse_step      summary_update + score_select + sparse_attn in one closure
    dense_all_pages  the same kernel over every page (page_index=None)
    sdpa_flash, sdpa_cudnn   dense decode through torch SDPA with enable_gqa (a backend that refuses is
                     retried on K/V repeated to the query heads, labelled ``*_repeat``, or skipped)

and, on structured random keys (noise, outlier channels, an attention sink, a local drift and planted
needle keys aligned with the queries), the attention-mass recall of each scoring method against the
exact top-k pages at the same budget, and the output relative error against dense fp32 attention.

    sparse_step_reuseR   one selection (summary update + score + select) then R sparse attentions, per
                     step (R = ``--reselect``; what ``SparseConfig(decode=...)`` runs per layer)

End to end (``--e2e``): a random-weight Llama-3.1-8B (``sparseprefill/bench/configs``, bf16, built on
the GPU) prefilled densely to ``--e2e-context`` tokens; the median ms per decode step (one token, all 32
layers) dense (flash/efficient SDPA, as ``bench e2e`` decodes) vs patched with
``SparseConfig(decode=DecodeRetrievalConfig(...))`` at the same budget, per ``--reselect`` value.

    sparseprefill bench decode --e2e --out results/topk     # GPU: kernels, accuracy, e2e; CSVs in the dir
    sparseprefill bench decode --dry-run --out /tmp/topk    # CPU: tiny shapes, naive kernels, tiny e2e

Without ``--out`` the CSVs go to ``--csv``, ``--accuracy-csv`` and ``--e2e-csv`` (appended to when
they exist).

CSV columns: op, context, batch, page, budget, ms, gpu, commit (timings) and method, reduce,
spread_weight, context, page, budget, recall_mean, recall_p5, recall_min, oracle_mean, rel_err_mean,
rel_err_max, gpu, commit (accuracy).
"""

from __future__ import annotations

import argparse
import copy
import math
import os
import statistics
import sys
import time

import torch

from ..config import DecodeRetrievalConfig, SparseConfig
from ..kernels.decode import (
    attention_mass_recall,
    page_scores,
    page_summary,
    select_pages,
    sparse_decode_attention,
    update_page_summary,
)
from ..patchers.support import cache_keyword, output_cache
from .common import (
    HEAD_DIM,
    HEADS,
    KV_HEADS,
    append_csv,
    bench_ms,
    decode_sdpa_backends,
    git_commit,
    gpu_name,
    sync,
)
from .models import build_model, load_arch_config, tiny_config

SINK_TOKENS, RECENT_TOKENS = 64, 256
# Accuracy study: scoring variants (method, group reduce, c).
VARIANTS = [("quest", "max", 0.0), ("quest", "sum", 0.0), ("mean_std", "max", 0.0), ("mean_std", "max", 0.5),
            ("mean_std", "max", 1.0), ("mean_std", "max", 2.0), ("mean_std", "max", 4.0), ("mean_std", "sum", 1.0)]
TIMING_FIELDS = ["op", "context", "batch", "page", "budget", "ms", "gpu", "commit"]
ACCURACY_FIELDS = ["method", "reduce", "spread_weight", "context", "page", "budget", "recall_mean", "recall_p5",
                   "recall_min", "oracle_mean", "rel_err_mean", "rel_err_max", "gpu", "commit"]


def structured_decode_inputs(batch: int, length: int, device, dtype, seed: int = 0, heads: int = HEADS,
                             kv_heads: int = KV_HEADS, head_dim: int = HEAD_DIM, needles: int = 32):
    """q [B, Hq, 1, D], k, v [B, Hkv, L, D] with retrieval structure, in logit units (``scale * q . k``):
    per-channel key scales with a few outlier channels (as in RoPE'd keys of real models; they widen
    every page's min/max), noise logits of std ~1.8, an attention sink (+8) in the first 4 keys, a
    local drift (+4 fading over ~64 keys) and ``needles`` random keys per KV head boosted by +3..+8
    towards the group's mean query. Mass is spread enough that a 2048-token budget is not trivially
    lossless, so the scoring variants separate."""
    g = torch.Generator(device="cpu").manual_seed(seed)
    rnd = lambda *s: torch.randn(*s, generator=g)  # noqa: E731
    group = heads // kv_heads
    channel_scale = torch.ones(head_dim)
    channel_scale[torch.randperm(head_dim, generator=g)[:4]] = 6.0  # outlier channels
    k = rnd(batch, kv_heads, length, head_dim) * channel_scale
    base = rnd(batch, kv_heads, 1, head_dim)
    q = base.repeat_interleave(group, 1) + 0.7 * rnd(batch, heads, 1, head_dim)
    q_mean = q.view(batch, kv_heads, group, head_dim).mean(2, keepdim=True)  # [B, Hkv, 1, D]
    # A key shift that adds +1 logit for the group's mean query.
    unit = q_mean * math.sqrt(head_dim) / q_mean.pow(2).sum(-1, keepdim=True)
    pos = torch.arange(length, dtype=torch.float32)
    k = k + 4.0 * torch.exp(-(length - 1 - pos) / 64.0)[None, None, :, None] * unit
    k[:, :, :4] += 8.0 * unit
    for b in range(batch):
        for h in range(kv_heads):
            where = torch.randint(4, max(length - 512, 5), (needles,), generator=g)
            boost = 3.0 + 5.0 * torch.rand(needles, 1, generator=g)
            k[b, h, where] += boost * unit[b, h, 0]
    v = rnd(batch, kv_heads, length, head_dim)
    return q.to(device, dtype), k.to(device, dtype), v.to(device, dtype)


def sdpa_timer(q, k, v, backend_name):
    """A closure running dense SDPA decode under one backend, and its label; None if refused."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    backend = {"flash": SDPBackend.FLASH_ATTENTION, "cudnn": SDPBackend.CUDNN_ATTENTION}[backend_name]
    group = q.shape[1] // k.shape[1]
    attempts = [("", lambda: torch.nn.functional.scaled_dot_product_attention(q, k, v, enable_gqa=True))]
    kr, vr = {}, {}

    def repeated():
        if not kr:
            kr["k"], vr["v"] = k.repeat_interleave(group, 1), v.repeat_interleave(group, 1)
        return torch.nn.functional.scaled_dot_product_attention(q, kr["k"], vr["v"])

    attempts.append(("_repeat", repeated))
    for suffix, fn in attempts:
        def run(fn=fn):
            with sdpa_kernel(backend):
                return fn()
        try:
            run()
            return run, f"sdpa_{backend_name}{suffix}"
        except RuntimeError as exc:
            print(f"  sdpa {backend_name}{suffix}: {str(exc).splitlines()[0][:100]}", flush=True)
    return None, None


def timing_rows(context, batch, page, budget, device, dtype, gpu, commit, sdpa=True, reselects=(4,)):
    scale = HEAD_DIM**-0.5
    g = torch.Generator(device=device).manual_seed(0)
    q = torch.randn(batch, HEADS, 1, HEAD_DIM, generator=g, device=device, dtype=dtype)
    k = torch.randn(batch, KV_HEADS, context, HEAD_DIM, generator=g, device=device, dtype=dtype)
    v = torch.randn(batch, KV_HEADS, context, HEAD_DIM, generator=g, device=device, dtype=dtype)
    # Summary of all but the last token; the timed update appends it (one page recomputed).
    before = page_summary(k[:, :, :-1], page_size=page, capacity_pages=-(-context // page) + 1)
    summary = update_page_summary(before, k)
    scores = page_scores(q, summary, scale=scale)
    index, count = select_pages(scores, num_tokens=context, page_size=page, budget_tokens=budget,
                                sink_tokens=SINK_TOKENS, recent_tokens=RECENT_TOKENS)
    sel = dict(num_tokens=context, page_size=page, budget_tokens=budget, sink_tokens=SINK_TOKENS,
               recent_tokens=RECENT_TOKENS)

    def score_select():
        return select_pages(page_scores(q, summary, scale=scale), **sel)

    def step():
        s = update_page_summary(before, k)
        i, c = select_pages(page_scores(q, s, scale=scale), **sel)
        return sparse_decode_attention(q, k, v, i, c, page_size=page, scale=scale)

    def reuse_step(reselect):
        def run():
            s = update_page_summary(before, k)
            i, c = select_pages(page_scores(q, s, scale=scale), **sel)
            for _ in range(reselect):
                sparse_decode_attention(q, k, v, i, c, page_size=page, scale=scale)
        return run

    ops = {
        "summary_update": lambda: update_page_summary(before, k),
        "summary_build": lambda: page_summary(k, page_size=page),
        "score": lambda: page_scores(q, summary, scale=scale),
        "score_quest": lambda: page_scores(q, summary, scale=scale, method="quest"),
        "select": lambda: select_pages(scores, **sel),
        "score_select": score_select,
        "sparse_attn": lambda: sparse_decode_attention(q, k, v, index, count, page_size=page, scale=scale),
        "sparse_step": step,
        "dense_all_pages": lambda: sparse_decode_attention(q, k, v, page_size=page, scale=scale),
    }
    for reselect in reselects:
        ops[f"sparse_step_reuse{reselect}"] = reuse_step(reselect)
    if sdpa and device.type == "cuda":
        for backend in ("flash", "cudnn"):
            fn, label = sdpa_timer(q, k, v, backend)
            if fn is not None:
                ops[label] = fn
    rows = []
    for op, fn in ops.items():
        try:
            ms = bench_ms(fn, device)
        except Exception as exc:  # a refused shape or backend is a result, not a crash of the table
            print(f"  {op}: failed {type(exc).__name__}: {str(exc).splitlines()[0][:120]}", flush=True)
            continue
        if op.startswith("sparse_step_reuse"):
            ms /= int(op[len("sparse_step_reuse"):])  # per decode step
        rows.append(dict(op=op, context=context, batch=batch, page=page, budget=budget, ms=f"{ms:.4f}", gpu=gpu,
                         commit=commit))
        print(f"{op:>22} ctx={context:>7} B={batch} P={page:>2} budget={budget}: {ms:9.4f} ms", flush=True)
    return rows


def accuracy_rows(context, page, budget, device, gpu, commit, batch=1, seeds=(0,)):
    """Recall vs the exact top-k pages (same count) and output error vs dense fp32, per scoring variant."""
    scale = HEAD_DIM**-0.5
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    per_variant = {v: ([], [], []) for v in VARIANTS}
    for seed in seeds:
        q, k, v = structured_decode_inputs(batch, context, device, dtype, seed=seed)
        summary = page_summary(k, page_size=page)
        dense = sparse_decode_attention(q.float(), k.float(), v.float(), page_size=page, scale=scale)
        for method, reduce, c in VARIANTS:
            scores = page_scores(q, summary, scale=scale, method=method, spread_weight=c, group_reduce=reduce)
            index, count = select_pages(scores, num_tokens=context, page_size=page, budget_tokens=budget,
                                        sink_tokens=SINK_TOKENS, recent_tokens=RECENT_TOKENS)
            rec = attention_mass_recall(q, k, index, count, page_size=page, scale=scale)
            out = sparse_decode_attention(q, k, v, index, count, page_size=page, scale=scale).float()
            err = (out - dense).norm(dim=-1) / dense.norm(dim=-1)
            recalls, oracles, errs = per_variant[(method, reduce, c)]
            recalls.append(rec.recall.flatten().cpu())
            oracles.append(rec.oracle_mass.flatten().cpu())
            errs.append(err.flatten().cpu())
    rows = []
    for (method, reduce, c), (recalls, oracles, errs) in per_variant.items():
        r, o, e = torch.cat(recalls), torch.cat(oracles), torch.cat(errs)
        row = dict(method=method, reduce=reduce, spread_weight=c, context=context, page=page, budget=budget,
                   recall_mean=f"{r.mean():.4f}", recall_p5=f"{r.quantile(0.05):.4f}", recall_min=f"{r.min():.4f}",
                   oracle_mean=f"{o.mean():.4f}", rel_err_mean=f"{e.mean():.4f}", rel_err_max=f"{e.max():.4f}",
                   gpu=gpu, commit=commit)
        rows.append(row)
        print(f"{method:>9}/{reduce:<3} c={c:<3} ctx={context:>7} P={page:>2} budget={budget}: recall mean "
              f"{row['recall_mean']} p5 {row['recall_p5']} min {row['recall_min']} (oracle mass {row['oracle_mean']}), "
              f"rel err mean {row['rel_err_mean']} max {row['rel_err_max']}", flush=True)
    return rows


E2E_FIELDS = ["variant", "context", "batch", "budget", "page", "reselect", "ms_per_token", "ms_p10", "ms_p90",
              "speedup_vs_dense", "decode_density", "steps", "gpu", "commit"]
E2E_CONFIG = "llama-3.1-8b"


def e2e_rows(context, batch, page, budget, reselects, steps, warmup, device, gpu, commit, dry_run=False):
    """Per-token decode time of a whole random-weight model: dense vs top-k decode (see the docstring)."""
    import sparseprefill

    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    config = tiny_config(E2E_CONFIG) if dry_run else load_arch_config(E2E_CONFIG)
    model = build_model(config, device=device, dtype=dtype)
    g = torch.Generator(device="cpu").manual_seed(0)
    ids = torch.randint(3, config.vocab_size, (batch, context), generator=g).to(device)
    with torch.inference_mode():
        prefill = model(input_ids=ids, use_cache=True, logits_to_keep=1)
    cache = output_cache(prefill)
    del prefill
    tokens = torch.randint(3, config.vocab_size, (batch, steps + warmup), generator=g).to(device)

    def decode_times():
        step_cache = copy.deepcopy(cache)
        times = []
        with torch.inference_mode(), decode_sdpa_backends(device):
            for i in range(steps + warmup):
                sync(device)
                t0 = time.perf_counter()
                out = model(input_ids=tokens[:, i: i + 1], use_cache=True, **{cache_keyword(model): step_cache})
                step_cache = output_cache(out)
                sync(device)
                if i >= warmup:  # the first top-k step builds the page summaries
                    times.append((time.perf_counter() - t0) * 1e3)
        del step_cache
        return times

    # The library's default dense layers (0, 1) would leave the 2-layer dry-run model without a sparse layer.
    dense_layers = () if dry_run else DecodeRetrievalConfig().dense_layers
    variants = [("dense", None)] + [
        (f"topk_r{r}", DecodeRetrievalConfig(page_size=page, budget_tokens=budget, reselect_every=r, min_context=0,
                                             dense_layers=dense_layers))
        for r in reselects]
    rows, dense_ms = [], None
    for name, decode in variants:
        density = None
        try:
            if decode is not None:
                # Prefill never runs here (the cache is copied); decode alone is patched.
                sparseprefill.patch(model, SparseConfig(decode=decode))
            try:
                times = decode_times()
                if decode is not None:
                    density = sparseprefill.stats(model).density
            finally:
                if decode is not None:
                    sparseprefill.unpatch(model)
        except Exception as exc:  # an OOM or a kernel failure is a row of the table, not the end of the run
            print(f"  e2e {name}: failed {type(exc).__name__}: {str(exc).splitlines()[0][:160]}", flush=True)
            continue
        ms = statistics.median(times)
        qs = sorted(times)
        dense_ms = ms if name == "dense" else dense_ms
        row = dict(variant=name, context=context, batch=batch, budget=budget, page=page,
                   reselect=decode.reselect_every if decode else "", ms_per_token=f"{ms:.3f}",
                   ms_p10=f"{qs[len(qs) // 10]:.3f}", ms_p90=f"{qs[(9 * len(qs)) // 10]:.3f}",
                   speedup_vs_dense=f"{dense_ms / ms:.3f}" if dense_ms else "",
                   decode_density="" if density is None else f"{density:.4f}", steps=len(times), gpu=gpu,
                   commit=commit)
        rows.append(row)
        print(f"  e2e {name:>9} ctx={context} B={batch}: {ms:8.3f} ms/token (speedup {row['speedup_vs_dense'] or '-'},"
              f" density {row['decode_density'] or '-'})", flush=True)
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return rows


def summary_table(timing, e2e) -> str:
    """Per (context, batch, page): dense SDPA vs the sparse step per token, compactly."""
    by_key: dict = {}
    for row in timing:
        by_key.setdefault((row["context"], row["batch"], row["page"]), {})[row["op"]] = float(row["ms"])
    lines = [f"{'context':>8} {'B':>2} {'P':>3} {'flash':>8} {'cudnn':>8} {'attn':>7} {'sel':>7} {'step_r1':>8} "
             f"{'step_r4':>8} {'x_vs_best_dense(r1/r4)':>24}"]
    for (context, batch, page), ops in sorted(by_key.items()):
        dense = [v for k, v in ops.items() if k.startswith("sdpa_")]
        best = min(dense) if dense else float("nan")
        r1, r4 = ops.get("sparse_step", float("nan")), ops.get("sparse_step_reuse4", float("nan"))
        f = lambda x: f"{x:.4f}" if x == x else "-"  # noqa: E731
        lines.append(f"{context:>8} {batch:>2} {page:>3} {f(ops.get('sdpa_flash', float('nan'))):>8} "
                     f"{f(ops.get('sdpa_cudnn', float('nan'))):>8} {f(ops.get('sparse_attn', float('nan'))):>7} "
                     f"{f(ops.get('score_select', float('nan'))):>7} {f(r1):>8} {f(r4):>8} "
                     f"{(best / r1 if r1 else float('nan')):>11.2f}/{(best / r4 if r4 else float('nan')):<11.2f}")
    if e2e:
        lines.append("")
        lines.append(f"{'e2e variant':>12} {'context':>8} {'B':>2} {'ms/token':>9} {'speedup':>8} {'density':>8}")
        for row in e2e:
            lines.append(f"{row['variant']:>12} {row['context']:>8} {row['batch']:>2} {row['ms_per_token']:>9} "
                         f"{row['speedup_vs_dense'] or '-':>8} {row['decode_density'] or '-':>8}")
    return "\n".join(lines)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--dry-run", action="store_true",
                        help="CPU, tiny shapes, naive kernels: checks the script runs")
    parser.add_argument("--contexts", type=int, nargs="+", default=[32768, 131072])
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--pages", type=int, nargs="+", default=[16, 32, 64])
    parser.add_argument("--budget", type=int, default=2048)
    parser.add_argument("--reselect", type=int, nargs="+", default=[1, 4],
                        help="selection reuse (sparse_step_reuseR, e2e)")
    parser.add_argument("--accuracy-contexts", type=int, nargs="+", default=None,
                        help="default 32768 (2000 in --dry-run)")
    parser.add_argument("--accuracy-seeds", type=int, default=2)
    parser.add_argument("--skip-timing", action="store_true")
    parser.add_argument("--skip-accuracy", action="store_true")
    parser.add_argument("--e2e", action="store_true", help="also time whole-model decode steps (Llama-3.1-8B shapes)")
    parser.add_argument("--e2e-context", type=int, default=32768)
    parser.add_argument("--e2e-batches", type=int, nargs="+", default=[1])
    parser.add_argument("--e2e-steps", type=int, default=24)
    parser.add_argument("--e2e-warmup", type=int, default=4)
    parser.add_argument("--out", default=None,
                        help="folder for timing.csv, accuracy.csv, e2e.csv (overrides --csv paths)")
    parser.add_argument("--csv", default="bench_topk_decode.csv")
    parser.add_argument("--accuracy-csv", default="bench_topk_decode_accuracy.csv")
    parser.add_argument("--e2e-csv", default="bench_topk_decode_e2e.csv")


def run_from_args(args: argparse.Namespace) -> int:
    if not args.dry_run and not torch.cuda.is_available():
        print("error: the top-k decode benchmark needs a CUDA GPU; pass --dry-run without one", file=sys.stderr)
        return 1
    if args.out:
        os.makedirs(args.out, exist_ok=True)
        args.csv, args.accuracy_csv, args.e2e_csv = (os.path.join(args.out, n) for n in
                                                     ("timing.csv", "accuracy.csv", "e2e.csv"))
    e2e_context, e2e_batches = args.e2e_context, args.e2e_batches
    if args.dry_run:
        device = torch.device("cpu")
        contexts, batches, pages, budget = [1000], [1, 2], [16, 32], 512
        acc_contexts = args.accuracy_contexts or [2000]
        seeds = (0,)
        gpu = "cpu-dry-run"
        e2e_context, e2e_batches = 700, [1]
        args.e2e = True  # the dry run exercises every path
        args.e2e_steps, args.e2e_warmup = min(args.e2e_steps, 3), min(args.e2e_warmup, 1)
    else:
        device = torch.device("cuda")
        contexts, batches, pages, budget = args.contexts, args.batches, args.pages, args.budget
        acc_contexts = args.accuracy_contexts or [32768]
        seeds = tuple(range(args.accuracy_seeds))
        gpu = gpu_name(device)
    commit = git_commit()
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    print(f"device {gpu}, commit {commit}, heads {HEADS}/{KV_HEADS}, head_dim {HEAD_DIM}, {dtype}")
    timing, e2e = [], []
    if not args.skip_timing:
        for context in contexts:
            for batch in batches:
                for page in pages:
                    try:
                        rows = timing_rows(context, batch, page, budget, device, dtype, gpu, commit,
                                           reselects=args.reselect)
                    except Exception as exc:  # e.g. OOM at 128K x 8 on a smaller GPU: keep the rest
                        print(f"  timing ctx={context} B={batch} P={page}: failed {type(exc).__name__}: "
                              f"{str(exc).splitlines()[0][:160]}", flush=True)
                        rows = []
                    timing += rows
                    append_csv(args.csv, TIMING_FIELDS, rows)
                    if device.type == "cuda":
                        torch.cuda.empty_cache()
    if args.e2e:
        for batch in e2e_batches:
            try:
                rows = e2e_rows(e2e_context, batch, pages[0], budget, args.reselect, args.e2e_steps, args.e2e_warmup,
                                device, gpu, commit, dry_run=args.dry_run)
            except Exception as exc:
                print(f"  e2e B={batch}: failed {type(exc).__name__}: {str(exc).splitlines()[0][:160]}", flush=True)
                rows = []
            e2e += rows
            append_csv(args.e2e_csv, E2E_FIELDS, rows)
    if not args.skip_accuracy:
        for context in acc_contexts:
            for page in pages:
                append_csv(args.accuracy_csv, ACCURACY_FIELDS, accuracy_rows(context, page, budget, device, gpu, commit,
                                                                            seeds=seeds))
    print("\n" + summary_table(timing, e2e))
    return 0


def main(argv=None) -> int:
    from . import command_main

    return command_main(__doc__, add_arguments, run_from_args, argv)


if __name__ == "__main__":
    sys.exit(main())
