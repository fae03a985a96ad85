"""GPU soak: many patched prefills at random lengths, batch sizes and padding, on a random-weight model
with Llama-3.1-8B shapes (hidden 4096, 32 query / 8 KV heads of dim 128, MLP 14336, vocab 128256, rope
theta 500000; ``--layers`` decoder layers, 2 by default: the per-layer shapes are what the kernels
see, and 32 layers would spend the device time on identical work).

Each prefill runs twice on the same inputs: unpatched (SDPA) and patched with sparse forced at every
length (``min_sparse_len=0``, so every kernel runs; the default's cost model would run Llama-8B shapes
dense). q/k projections are scaled up (``evals.random_models.QK_SCALE``) so attention has peaks for
the estimators to find. Checked per prefill: no error, finite last-position logits, the patched peak
memory not above the unpatched peak at the same shape except for ``stats()``'s device-side pair
counters (one 0-d int64 per sparse layer call, which the allocator rounds to ``COUNTER_BYTES``: kept
on the device so the forward never waits for the host); after the loop, allocated memory back where it
started (measured after one unpatched and one patched warm-up prefill, which allocate cuBLAS's
workspace and the patcher's cached head-id tensors). An unpatched run
that fails (transformers materialises a ``[B, 1, L, L]`` mask for padded batches: 90 GiB at 3 x 127K)
is recorded and the patched run still goes ahead. Rows go to ``soak.csv`` (one per prefill), the
verdict to ``soak.json``.

    python experiments/gpu_soak.py --prefills 200 --min-length 1024 --max-length 131072 --out DIR   # GPU
    python experiments/gpu_soak.py --dry-run --out /tmp/soak                                        # CPU, tiny
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import time
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, LlamaConfig

import sparseprefill
from sparseprefill import SparseConfig
from sparseprefill.bench.common import git_commit, gpu_name, write_csv
from sparseprefill.evals.random_models import QK_SCALE

LLAMA_8B_SHAPE = dict(hidden_size=4096, intermediate_size=14336, num_attention_heads=32, num_key_value_heads=8,
                      head_dim=128, vocab_size=128256, rope_theta=500000.0)
TINY_SHAPE = dict(hidden_size=64, intermediate_size=128, num_attention_heads=4, num_key_value_heads=2,
                  head_dim=16, vocab_size=256, rope_theta=10000.0)
MAX_BATCH = 3
# Up to this share of a row may be padding (left or right, random per prefill).
MAX_PADDING_SHARE = 0.25
CSV_EVERY = 10  # prefills between rewrites of soak.csv
COUNTER_BYTES = 512  # the caching allocator's smallest block: what one stats counter occupies


def _write_rows(out: Path, rows: list[dict]) -> None:
    fields = list(dict.fromkeys(key for r in rows for key in r))
    write_csv(out / "soak.csv", fields, [{f: r.get(f) for f in fields} for r in rows])


def build_model(shape: dict, layers: int, max_length: int, device: torch.device, seed: int):
    torch.manual_seed(seed)
    config = LlamaConfig(**shape, num_hidden_layers=layers, max_position_embeddings=max_length)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype).eval()
    with torch.no_grad():
        for layer in model.model.layers:
            layer.self_attn.q_proj.weight.mul_(QK_SCALE)
            layer.self_attn.k_proj.weight.mul_(QK_SCALE)
    return model


def draw_inputs(rng: random.Random, lo: int, hi: int, vocab: int, device: torch.device, max_batch: int):
    """``(input_ids [B, L], attention_mask [B, L] or None, description)`` for one prefill."""
    length = rng.randint(lo, hi)
    batch = rng.randint(1, max_batch)
    ids = torch.randint(1, vocab, (batch, length), generator=torch.Generator().manual_seed(rng.getrandbits(31)))
    side = rng.choice(["none", "left", "right"]) if batch > 1 else "none"
    mask = None
    if side != "none":
        mask = torch.ones(batch, length, dtype=torch.long)
        for row in range(1, batch):  # row 0 keeps the full length, so the batch is really L long
            pad = rng.randint(0, int(MAX_PADDING_SHARE * length))
            if pad and side == "left":
                mask[row, :pad] = 0
            elif pad:
                mask[row, length - pad:] = 0
        mask = mask.to(device)
    return ids.to(device), mask, dict(length=length, batch=batch, padding=side)


def prefill(model, ids, mask, device):
    """Last-position logits and the peak memory above the memory allocated before the call."""
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
    with torch.no_grad():
        logits = model(ids, attention_mask=mask, logits_to_keep=1, use_cache=False).logits.float()
    peak = 0
    if device.type == "cuda":
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated() - before
    return logits, peak


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--prefills", type=int, default=200)
    ap.add_argument("--min-length", type=int, default=1024)
    ap.add_argument("--max-length", type=int, default=131072)
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--dry-run", action="store_true", help="CPU, a tiny model, 6 short prefills")
    ap.add_argument("--out", required=True)
    args = ap.parse_args(argv)
    if args.prefills < 1 or not 1 <= args.min_length <= args.max_length:
        ap.error("need --prefills >= 1 and 1 <= --min-length <= --max-length")
    if args.dry_run:
        device, shape, args.prefills, args.min_length, args.max_length = torch.device("cpu"), TINY_SHAPE, 6, 65, 300
    elif not torch.cuda.is_available():
        print("error: the soak needs a CUDA GPU; pass --dry-run without one", file=sys.stderr)
        return 1
    else:
        device, shape = torch.device("cuda"), LLAMA_8B_SHAPE
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    model = build_model(shape, args.layers, args.max_length, device, args.seed)
    config = SparseConfig(min_sparse_len=0)
    rng = random.Random(args.seed)
    warm_ids, _, _ = draw_inputs(random.Random(-1), args.min_length, args.min_length, shape["vocab_size"], device, 1)
    prefill(model, warm_ids, None, device)
    # One patched prefill too: the patcher keeps a bounded cache of small head-id tensors per device
    # (patchers.state.heads_tensor), built on first use and kept across patch / unpatch.
    sparseprefill.patch(model, config)
    try:
        prefill(model, warm_ids, None, device)
    finally:
        sparseprefill.unpatch(model)
    del warm_ids
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.empty_cache()
    start_memory = torch.cuda.memory_allocated() if device.type == "cuda" else 0
    rows, failures, started = [], [], time.perf_counter()
    for i in range(args.prefills):
        ids, mask, row = draw_inputs(rng, args.min_length, args.max_length, shape["vocab_size"], device, MAX_BATCH)
        row["prefill"] = i
        dense_logits = None
        try:
            dense_logits, row["dense_peak_bytes"] = prefill(model, ids, mask, device)
            row["dense_error"] = None
        except Exception as exc:  # recorded; the patched run below still goes ahead
            row["dense_error"] = f"{type(exc).__name__}: {exc}"[:300]
        sparseprefill.patch(model, config)
        try:
            logits, row["sparse_peak_bytes"] = prefill(model, ids, mask, device)
            st = sparseprefill.stats(model)
            row["density"] = st.density
            row["fallbacks"] = ";".join(f"{k}:{v}" for k, v in sorted(st.fallbacks.items())) or None
            row["finite"] = bool(torch.isfinite(logits).all())
            row["error"] = None
            counters = sum(n for layer in st.layers for phase, n in layer.phases.items() if phase != "dense")
            if dense_logits is not None:
                row["max_abs_logit_diff"] = float((logits - dense_logits).abs().max())
                row["peak_excess_bytes"] = row["sparse_peak_bytes"] - row["dense_peak_bytes"]
                row["memory_ok"] = row["peak_excess_bytes"] <= counters * COUNTER_BYTES
            # The stats hold the last call's device-side pair counts (512 B per layer): drop them, or the
            # final memory reading counts them.
            del logits, st
        except Exception as exc:  # the soak records every failure and goes on
            row["error"] = f"{type(exc).__name__}: {exc}"[:300]
        finally:
            sparseprefill.unpatch(model)
        del ids, mask, dense_logits
        if row["error"] or not row.get("finite") or row.get("memory_ok") is False:
            failures.append(row)
        rows.append(row)
        if (i + 1) % CSV_EVERY == 0:  # a run cut short by a time limit keeps what it measured
            _write_rows(out, rows)
        print(f"[{time.perf_counter() - started:7.1f} s] {i + 1}/{args.prefills} L={row['length']} "
              f"B={row['batch']} pad={row['padding']} density={row.get('density')} "
              f"peak sparse/dense={row.get('sparse_peak_bytes', 0) / 2**30:.2f}/"
              f"{row.get('dense_peak_bytes', 0) / 2**30:.2f} GiB {row['error'] or ''}"
              f"{' (dense: ' + row['dense_error'][:60] + ')' if row['dense_error'] else ''}", flush=True)
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.empty_cache()
    end_memory = torch.cuda.memory_allocated() if device.type == "cuda" else 0
    _write_rows(out, rows)
    excess = [r["peak_excess_bytes"] for r in rows if r.get("peak_excess_bytes") is not None]
    verdict = dict(prefills=len(rows), failures=len(failures), errors=sum(bool(r["error"]) for r in rows),
                   dense_errors=sum(bool(r["dense_error"]) for r in rows),
                   non_finite=sum(r.get("finite") is False for r in rows),
                   memory_above_dense=sum(r.get("memory_ok") is False for r in rows),
                   max_peak_excess_bytes=max(excess) if excess else None,
                   memory_start_bytes=start_memory, memory_end_bytes=end_memory,
                   memory_returned=end_memory == start_memory, seconds=time.perf_counter() - started,
                   lengths=[args.min_length, args.max_length], layers=args.layers, shape=shape,
                   gpu=gpu_name(device), commit=git_commit(), first_failures=failures[:5])
    (out / "soak.json").write_text(json.dumps(verdict, indent=1))
    print(json.dumps({k: v for k, v in verdict.items() if k != "first_failures"}, indent=1))
    return 0 if not failures and verdict["memory_returned"] else 1


if __name__ == "__main__":
    sys.exit(main())
