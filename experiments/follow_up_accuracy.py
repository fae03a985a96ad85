"""A follow-up chunk after a long cached context: page retrieval vs the sparse prefill patterns vs dense.

A document is prefilled into the cache (dense, so every variant sees the same cache), then a follow-up
question of a few dozen tokens runs as a second chunk. Compared with the dense chunk: next-token KL
and top-1 agreement over the chunk's positions, and the density each variant computed for the chunk.

    python experiments/follow_up_accuracy.py --model smollm2 --context 4096 --chunk 48 --budget 512 --out results/
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

import sparseprefill
from sparseprefill import DecodeRetrievalConfig, SparseConfig
from sparseprefill.evals.harness import load_model
from sparseprefill.evals.logits import compare_logits, reference_input_ids
from sparseprefill.patchers.support import cache_keyword

QUESTION = "\nQuestion: which built-in function returns the length of a sequence, and what does it call? Answer:"


def _chunk_logits(model, context_ids, chunk_ids, config):
    from transformers import DynamicCache

    cache = DynamicCache(config=model.config)
    device = next(model.parameters()).device
    with torch.inference_mode():
        model(context_ids.to(device), use_cache=True, **{cache_keyword(model): cache})  # dense: patched below
        if config is not None:
            sparseprefill.patch(model, config)
        try:
            logits = model(chunk_ids.to(device), use_cache=True, **{cache_keyword(model): cache}).logits.float().cpu()
            density = None
            if config is not None:
                layers = [layer for layer in sparseprefill.stats(model).layers if layer.last_density is not None]
                density = sum(layer.last_density for layer in layers) / len(layers) if layers else None
        finally:
            if config is not None:
                sparseprefill.unpatch(model)
    return logits, density


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2")
    parser.add_argument("--context", type=int, default=4096)
    parser.add_argument("--chunk", type=int, default=48, help="follow-up tokens (the question, cut or padded)")
    parser.add_argument("--budget", type=int, default=512)
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    model, tokenizer = load_model(args.model, dtype=torch.float32 if device == "cpu" else torch.bfloat16,
                                  device=device)
    context = reference_input_ids(tokenizer, args.context)
    question = tokenizer(QUESTION * 4, add_special_tokens=False)["input_ids"][: args.chunk]
    chunk = torch.tensor([question])
    retrieval = DecodeRetrievalConfig(budget_tokens=args.budget, min_context=0, dense_layers=(0, 1),
                                      follow_up_chunks=True)
    variants = {
        "dense": None,
        "prefill patterns (auto)": SparseConfig(min_sparse_len=0, min_sparse_query_len=1),
        f"page retrieval (budget {args.budget})": SparseConfig(min_sparse_len=0, min_sparse_query_len=1,
                                                               decode=retrieval),
    }
    dense, _ = _chunk_logits(model, context, chunk, None)
    rows = []
    for name, config in variants.items():
        if config is None:
            continue
        logits, density = _chunk_logits(model, context, chunk, config)
        rows.append({"variant": name, "density": density, **compare_logits(dense, logits).to_dict()})
    print(f"{args.model}: context {args.context}, follow-up chunk {chunk.shape[1]} tokens")
    print("| variant | chunk density (sparse layers) | KL mean | KL max | top-1 |")
    print("|---|---|---|---|---|")
    for row in rows:
        density = "-" if row["density"] is None else f"{row['density']:.3f}"
        print(f"| {row['variant']} | {density} | {row['kl_mean']:.2e} | {row['kl_max']:.2e} | {row['top1_agreement']:.3f} |")
    if args.out:
        Path(args.out).mkdir(parents=True, exist_ok=True)
        (Path(args.out) / f"follow_up_{args.model}_{args.context}_budget{args.budget}.json").write_text(
            json.dumps({"context": args.context, "chunk": chunk.shape[1], "rows": rows}, indent=1) + "\n")


if __name__ == "__main__":
    main()
