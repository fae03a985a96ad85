"""Per-head attention-mass recall vs density of each estimator, on real SmolLM2 q/k.

Captures post-RoPE q/k of every layer from one dense forward over natural text, then for each
candidate estimator computes, per head, the share of the exact attention mass (per query row) that
the selected keys hold, and the density. Exact attention is computed per head in query chunks.

    python experiments/estimator_study.py --length 8192 --out .cache/estimator_study_8k.json
"""
import argparse, json, time
import torch
import sparseprefill
from sparseprefill import SparseConfig, AntidiagonalConfig, VerticalSlashConfig, BlockSparseConfig
from sparseprefill.evals.logits import reference_input_ids
from sparseprefill.evals.offline_models import load_smollm2
from sparseprefill.patchers import observe_prefill
from sparseprefill.patterns import build_pattern
from sparseprefill.kernels.common import qk_scores
from sparseprefill.kernels.geometry import causal_pairs_total

CANDIDATES = {
    "antidiag_s8_b128_m95": SparseConfig(pattern="antidiagonal"),
    "antidiag_s8_b64_m95": SparseConfig(pattern="antidiagonal", antidiagonal=AntidiagonalConfig(block_size=64)),
    "antidiag_s4_b64_m95": SparseConfig(pattern="antidiagonal", antidiagonal=AntidiagonalConfig(block_size=64, stride=4)),
    "antidiag_s8_b64_m98": SparseConfig(pattern="antidiagonal", antidiagonal=AntidiagonalConfig(block_size=64, mass=0.98)),
    # Rows alternating between the two antidiagonal parities (AntidiagonalConfig.alternate).
    "antidiag_s8_b128_m95_alt": SparseConfig(pattern="antidiagonal", antidiagonal=AntidiagonalConfig(alternate=True)),
    "antidiag_s8_b128_m98_alt": SparseConfig(pattern="antidiagonal",
                                             antidiagonal=AntidiagonalConfig(mass=0.98, alternate=True)),
    "antidiag_s8_b128_m98": SparseConfig(pattern="antidiagonal", antidiagonal=AntidiagonalConfig(mass=0.98)),
    # The sampled pairs' own softmax mass instead of the softmax of their mean logit (AntidiagonalConfig.scoring).
    **{f"antidiag_s8_b128_m{round(100 * m)}_sampled": SparseConfig(
        pattern="antidiagonal", antidiagonal=AntidiagonalConfig(mass=m, scoring="sampled_mass")) for m in (0.9, 0.95, 0.98)},
    "antidiag_s8_b128_m90": SparseConfig(pattern="antidiagonal", antidiagonal=AntidiagonalConfig(mass=0.9)),
    "vs_m95": SparseConfig(pattern="vertical_slash"),
    "vs_m90": SparseConfig(pattern="vertical_slash", vertical_slash=VerticalSlashConfig(vertical_mass=0.9, slash_mass=0.9)),
    "pooled_b64_m95": SparseConfig(pattern="block_sparse", block_sparse=BlockSparseConfig(block_size=64)),
}


def capture(model, ids):
    """Post-RoPE (q, k, scale) of every layer, in layer order, from one dense-equivalent forward."""
    got = []

    def observer(layer, q, k, *, scale, softcap=None):
        got.append((q.detach().clone(), k.detach().clone(), scale))

    sparseprefill.patch(model, SparseConfig.keep_everything(pattern="dense"))
    try:
        with observe_prefill(model, observer), torch.no_grad():
            model(ids, logits_to_keep=1)
    finally:
        sparseprefill.unpatch(model)
    return got


def recall_of(mask_fn, q, k, scale, chunk=1024):
    """mask_fn(h, rows) -> bool [len(rows), Lk] of selected keys for head h. Returns per-row recall [H, L]."""
    H, L = q.shape[1], q.shape[2]
    kvh = torch.arange(H) // (H // k.shape[1])
    rec = torch.empty(H, L)
    for r0 in range(0, L, chunk):
        r1 = min(L, r0 + chunk)
        s = qk_scores(q[:, :, r0:r1], k, kvh, scale)[0]
        causal = torch.arange(L)[None, :] <= torch.arange(r0, r1)[:, None]
        p = torch.softmax(s.masked_fill(~causal, float("-inf")), -1)
        m = mask_fn(r0, r1)
        rec[:, r0:r1] = (p * m).sum(-1)
    return rec


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--length", type=int, default=8192)
    ap.add_argument("--layers", type=int, nargs="*", default=None)
    ap.add_argument("--out", default=".cache/estimator_study.json")
    ap.add_argument("--candidates", nargs="+", choices=list(CANDIDATES), default=list(CANDIDATES))
    args = ap.parse_args()
    torch.set_num_threads(2)
    model, tok = load_smollm2()
    ids = reference_input_ids(tok, args.length)
    t = time.time(); qk = capture(model, ids); print(f"captured {len(qk)} layers in {time.time()-t:.0f}s", flush=True)
    layers = args.layers if args.layers else list(range(len(qk)))
    results = {name: [] for name in args.candidates}
    for li in layers:
        q, k, scale = qk[li]
        H, L = q.shape[1], q.shape[2]
        kvh = torch.arange(H) // (H // k.shape[1])
        for name in args.candidates:
            cfg = CANDIDATES[name]
            pattern = build_pattern(cfg.pattern, cfg)
            index = pattern.estimate(q, k, scale=scale, softcap=None, kv_head_index=kvh)
            dense = index.to_dense_mask()[0]  # [H, L, L] bool
            rec = recall_of(lambda r0, r1: dense[:, r0:r1], q, k, scale)
            density = index.computed_pairs()[0].float() / causal_pairs_total(L, L)
            results[name].append({"layer": li, "recall_mean": rec.mean(-1).tolist(), "recall_p5": rec.quantile(0.05, dim=-1).tolist(), "density": density.tolist()})
            print(f"layer {li:2d} {name:24s} recall mean {rec.mean():.4f} p5(min over heads) {rec.quantile(0.05, dim=-1).min():.3f} density {density.mean():.3f}", flush=True)
            dense = None  # free the [H, L, L] mask before the next candidate
    summary = {}
    for name, rows in results.items():
        rm = torch.tensor([r["recall_mean"] for r in rows]); rp = torch.tensor([r["recall_p5"] for r in rows]); d = torch.tensor([r["density"] for r in rows])
        summary[name] = {"recall_mean": rm.mean().item(), "recall_p5_mean": rp.mean().item(), "recall_p5_min": rp.min().item(), "density": d.mean().item()}
    print(json.dumps(summary, indent=1))
    import pathlib; pathlib.Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    json.dump({"length": args.length, "summary": summary, "per_layer": results}, open(args.out, "w"))

if __name__ == "__main__":
    main()
