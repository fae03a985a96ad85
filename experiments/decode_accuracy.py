"""Accuracy of top-k KV page retrieval for decode (``SparseConfig(decode=...)``) on real models.

For each prompt (natural text, and pass-key prompts), greedy decoding dense vs top-k decode:

    prefix_match     tokens of the free-running top-k generation equal to dense's before the first
                     difference (greedy drifts for good once one token differs, so this is harsh)
    teacher_forced   fraction of decode steps whose top-k argmax equals dense's token when both are fed
                     dense's tokens (the fair per-step measure); also the mean KL(dense || top-k)
    recall           attention-mass recall of the selected pages vs the exact top pages of the same
                     count (``attention_mass_recall``), mean and p5 over (step, sparse layer, head)
    rel_err          per layer: mean relative L2 error of the top-k attention output vs dense attention
                     over all keys, on the same q/k/v
    passkey          the free answers of dense and top-k (``answer_passkey``: prefill, then decode)

Prefill stays dense (``min_sparse_len`` above the prompt) so only decode differs. Writes JSON and prints
a table.

    python experiments/decode_accuracy.py --model smollm2 --length 4096 --new-tokens 256
    python experiments/decode_accuracy.py --model gemma3 --length 8192 --new-tokens 256
    python experiments/decode_accuracy.py --model /path/dir --gguf-file f.gguf --tokenizer /path/tok --device cuda

Measured (CPU, fp32, torch 2.13, transformers 5.23, SmolLM2-135M-Instruct, 4096-token prompt, budget 512,
page 16, sink 64, recent 256, dense layers 0-1, mean_std, 256 new tokens; ``--length 4096 --reselect 1 4
--passkey-depths 0.5 0.9``):

    reselect  prefix  teacher-forced  mean KL  density  recall mean / p5  passkey dense / top-k
           1       9           0.980   0.0089    0.119      0.905 / 0.543   2/2 / 2/2
           4       9           0.980   0.0112    0.119      0.901 / 0.534   2/2 / 2/2

(the free-running generations part at token 9 and then continue differently; per step, 250 of 255
argmaxes agree.)
"""

from __future__ import annotations

import argparse
import json
import os
import time
from collections import defaultdict
from dataclasses import replace

import torch

import sparseprefill
from sparseprefill.config import DecodeRetrievalConfig, SparseConfig
from sparseprefill.kernels.decode import attention_mass_recall, sparse_decode_attention
from sparseprefill.patchers import inspect_decode
from sparseprefill.patchers.support import cache_keyword, output_cache

# Prefill must stay dense whatever the prompt length: only the decode path is measured.
DENSE_PREFILL_LEN = 2**62


class DecodeProbe:
    """Inspects every sparse decode step of a patched model (``sparseprefill.patchers.inspect_decode``):
    per sparse row group, the recall of the selected pages and the output error vs attention over all
    keys, per layer."""

    def __init__(self) -> None:
        self.recall: list[torch.Tensor] = []
        self.rel_err: dict[int, list[float]] = defaultdict(list)

    def __call__(self, layer, q, k, v, out, page_index, page_count, *, page_size, scale, softcap=None) -> None:
        if page_index is None:  # this group attended all its keys: nothing to measure
            return
        rec = attention_mass_recall(q.float(), k.float(), page_index, page_count, page_size=page_size, scale=scale)
        self.recall.append(rec.recall.flatten().cpu())
        dense = sparse_decode_attention(q.float(), k.float(), v.float(), page_size=page_size, scale=scale,
                                        softcap=softcap)
        err = (out.float() - dense).norm(dim=-1) / dense.norm(dim=-1).clamp_min(1e-30)
        self.rel_err[layer].append(float(err.mean()))

    def summary(self) -> dict:
        out: dict = {"sparse_calls": len(self.recall)}
        if self.recall:
            r = torch.cat(self.recall)
            out.update(recall_mean=float(r.mean()), recall_p5=float(r.quantile(0.05)) if r.numel() > 1 else float(r[0]),
                       recall_min=float(r.min()))
        out["rel_err_by_layer"] = {str(layer): sum(v) / len(v) for layer, v in sorted(self.rel_err.items())}
        return out


def _step(model, token: int, cache):
    out = model(input_ids=torch.tensor([[token]], device=model.device), use_cache=True,
                **{cache_keyword(model): cache})
    return out.logits[0, -1].float(), output_cache(out)


@torch.inference_mode()
def greedy(model, input_ids: torch.Tensor, new_tokens: int, forced: list[int] | None = None):
    """Greedy decode ``new_tokens`` tokens; with ``forced`` feed those tokens instead of the argmax
    (teacher forcing). Returns (argmax per step, log-softmax per step)."""
    out = model(input_ids=input_ids.to(model.device), use_cache=True, logits_to_keep=1)
    logits, cache = out.logits[0, -1].float(), output_cache(out)
    argmax, logps = [], []
    for i in range(new_tokens):
        argmax.append(int(logits.argmax()))
        logps.append(torch.log_softmax(logits, -1).cpu())
        if i == new_tokens - 1:
            break
        logits, cache = _step(model, forced[i] if forced is not None else argmax[-1], cache)
    return argmax, logps


def dense_reference(model, input_ids: torch.Tensor, new_tokens: int) -> dict:
    """Dense greedy tokens and log-probabilities (``model`` unpatched), shared by every top-k config."""
    start = time.perf_counter()
    tokens, logps = greedy(model, input_ids, new_tokens)
    return {"tokens": tokens, "logps": logps, "seconds": time.perf_counter() - start}


def compare(model, input_ids: torch.Tensor, decode: DecodeRetrievalConfig, new_tokens: int,
            dense: dict | None = None) -> dict:
    """Dense vs top-k decode on one prompt (``model`` unpatched on entry and exit)."""
    dense = dense or dense_reference(model, input_ids, new_tokens)
    dense_tokens, dense_logps, dense_seconds = dense["tokens"], dense["logps"], dense["seconds"]
    sparseprefill.patch(model, SparseConfig(min_sparse_len=DENSE_PREFILL_LEN, decode=decode))
    try:
        start = time.perf_counter()
        free_tokens, _ = greedy(model, input_ids, new_tokens)
        sparse_seconds = time.perf_counter() - start
        # stats() returns live counters: keep the free run's numbers before the teacher-forced run adds to them.
        stats = sparseprefill.stats(model)
        density, phases, fallbacks = stats.density, dict(stats.phases), dict(stats.fallbacks)
        probe = DecodeProbe()
        with inspect_decode(model, probe):
            forced_tokens, forced_logps = greedy(model, input_ids, new_tokens, forced=dense_tokens)
    finally:
        sparseprefill.unpatch(model)
    prefix = next((i for i, (a, b) in enumerate(zip(dense_tokens, free_tokens)) if a != b), new_tokens)
    # Step 0 comes from the (dense) prefill; decode starts at step 1.
    steps = range(1, new_tokens)
    agree = [dense_tokens[i] == forced_tokens[i] for i in steps]
    kl = [float((dense_logps[i].exp() * (dense_logps[i] - forced_logps[i])).sum()) for i in steps]
    return {
        "prompt_tokens": int(input_ids.shape[1]), "new_tokens": new_tokens, "prefix_match": prefix,
        "teacher_forced_agreement": sum(agree) / max(len(agree), 1), "teacher_forced_steps": len(agree),
        "mean_kl": sum(kl) / max(len(kl), 1), "max_kl": max(kl, default=0.0),
        # Prefill is dense (a fallback), so computed / causal pairs are the decode calls' alone.
        "decode_density": density, "sparse_decode_calls": phases.get("sparse_decode", 0),
        "fallbacks": fallbacks, "dense_seconds": dense_seconds, "sparse_seconds": sparse_seconds,
        **probe.summary(),
    }


def passkey(model, tokenizer, prompt, decode: DecodeRetrievalConfig, dense=None) -> dict:
    """Free pass-key answers, dense (unless given) and top-k."""
    from sparseprefill.evals.passkey import answer_passkey

    dense = dense or answer_passkey(model, tokenizer, prompt)
    sparseprefill.patch(model, SparseConfig(min_sparse_len=DENSE_PREFILL_LEN, decode=decode))
    try:
        sparse = answer_passkey(model, tokenizer, prompt)
    finally:
        sparseprefill.unpatch(model)
    return {"depth": prompt.depth, "key": prompt.key, "tokens": prompt.num_tokens, "dense": dense.free_text,
            "topk": sparse.free_text, "dense_correct": dense.free_correct, "topk_correct": sparse.free_correct}


def load(args):
    dtype = getattr(torch, args.dtype)
    if args.model in ("smollm2", "gemma3"):
        from sparseprefill.evals import offline_models

        model, tokenizer = getattr(offline_models, f"load_{args.model}")(dtype=dtype)
    else:
        from transformers import AutoModelForCausalLM, AutoTokenizer

        kwargs = {"gguf_file": args.gguf_file} if args.gguf_file else {}
        model = AutoModelForCausalLM.from_pretrained(args.model, dtype=dtype, **kwargs).eval()
        tokenizer = AutoTokenizer.from_pretrained(args.tokenizer or args.model, **kwargs if not args.tokenizer else {})
    return model.to(args.device), tokenizer


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="smollm2", help="smollm2, gemma3, or a model folder / hub id")
    p.add_argument("--gguf-file", default=None)
    p.add_argument("--tokenizer", default=None)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", default=None, help="default float32 on CPU, bfloat16 on CUDA")
    p.add_argument("--length", type=int, default=4096)
    p.add_argument("--new-tokens", type=int, default=256)
    p.add_argument("--budget", type=int, default=512)
    p.add_argument("--page", type=int, default=16)
    p.add_argument("--sink", type=int, default=64)
    p.add_argument("--recent", type=int, default=256)
    p.add_argument("--method", default="mean_std")
    p.add_argument("--dense-layers", default="0,1", help="comma-separated layer indices ('' for none)")
    p.add_argument("--reselect", type=int, nargs="+", default=[1, 4])
    p.add_argument("--passkey-depths", type=float, nargs="*", default=[0.1, 0.5, 0.9])
    p.add_argument("--passkey-seed", type=int, default=0)
    p.add_argument("--out", default=".cache/decode_accuracy.json")
    args = p.parse_args(argv)
    args.dtype = args.dtype or ("bfloat16" if args.device.startswith("cuda") else "float32")
    model, tokenizer = load(args)
    dense_layers = tuple(int(x) for x in args.dense_layers.split(",") if x.strip())
    base = DecodeRetrievalConfig(page_size=args.page, budget_tokens=args.budget, sink_tokens=args.sink,
                                 recent_tokens=args.recent, method=args.method, dense_layers=dense_layers,
                                 min_context=0)
    from sparseprefill.evals.logits import reference_input_ids

    ids = reference_input_ids(tokenizer, args.length)
    results = {"model": args.model, "device": args.device, "dtype": args.dtype, "length": args.length,
               "config": base.to_dict(), "runs": []}
    from sparseprefill.evals.passkey import answer_passkey, build_passkey_prompt

    dense = dense_reference(model, ids, args.new_tokens)
    prompts = [build_passkey_prompt(tokenizer, args.length, depth=d, seed=args.passkey_seed)
               for d in args.passkey_depths]
    dense_answers = [answer_passkey(model, tokenizer, prompt) for prompt in prompts]
    for reselect in args.reselect:
        cfg = replace(base, reselect_every=reselect)
        run = {"reselect_every": reselect, "natural": compare(model, ids, cfg, args.new_tokens, dense), "passkey": []}
        for prompt, answer in zip(prompts, dense_answers):
            run["passkey"].append(passkey(model, tokenizer, prompt, cfg, answer))
        results["runs"].append(run)
        print(json.dumps(run, indent=1), flush=True)
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(results, f, indent=1)
    print(f"\n{args.model} {args.length} tokens, budget {args.budget}, page {args.page}, {args.new_tokens} new tokens")
    print(f"{'reselect':>8} {'prefix':>6} {'tf_agree':>8} {'mean_kl':>8} {'density':>7} {'recall':>7} {'rec_p5':>7} "
          f"{'passkey dense/topk':>18}")
    for run in results["runs"]:
        n = run["natural"]
        pk = f"{sum(x['dense_correct'] for x in run['passkey'])}/{sum(x['topk_correct'] for x in run['passkey'])}" \
             f" of {len(run['passkey'])}"
        density = "-" if n["decode_density"] is None else f"{n['decode_density']:.3f}"
        print(f"{run['reselect_every']:>8} {n['prefix_match']:>6} {n['teacher_forced_agreement']:>8.3f} "
              f"{n['mean_kl']:>8.4f} {density:>7} {n.get('recall_mean', float('nan')):>7.3f} "
              f"{n.get('recall_p5', float('nan')):>7.3f} {pk:>18}")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
