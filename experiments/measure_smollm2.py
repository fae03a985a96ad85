"""Fidelity of sparse prefill on a real model: SmolLM2-135M-Instruct, CPU fp32, forced sparse.

For each length and sparse config (all with ``min_sparse_len=0`` so the sparse path always runs):

* density: computed / causal (query, key) pairs of one forward over natural text;
* top-1 agreement and KL(dense || sparse) of the next-token distributions over the last 256
  positions of that text (``logits_to_keep=256``);
* pass key at several needle depths: free answer (key in 8 greedy tokens) and digit-forced answer,
  each against the dense model's answers to the same prompts.

Results are written to JSON after every config (a partial run keeps what it measured), and a
table is printed at the end.

    python experiments/measure_smollm2.py --lengths 4096 8192 --out .cache/measure_smollm2.json
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import replace
from pathlib import Path

import torch

import sparseprefill
from sparseprefill import AntidiagonalConfig, SparseConfig
from sparseprefill.evals.logits import DEFAULT_SCORED_POSITIONS, compare_logits, last_position_logits, reference_input_ids
from sparseprefill.evals.offline_models import load_smollm2
from sparseprefill.evals.passkey import answer_passkey, build_passkey_prompt

DEFAULT_LENGTHS = (4096,)
DEFAULT_DEPTHS = (0.05, 0.25, 0.5, 0.75, 0.95)
DEFAULT_OUT = Path(".cache/measure_smollm2.json")

FORCED_SPARSE = SparseConfig(min_sparse_len=0)
ANTIDIAGONAL = replace(FORCED_SPARSE, pattern="antidiagonal")
CONFIGS: dict[str, SparseConfig] = {
    "auto (default: vertical-slash m0.95)": FORCED_SPARSE,
    "antidiagonal b128 m0.95": ANTIDIAGONAL,
    "antidiagonal b128 m0.90": replace(ANTIDIAGONAL, antidiagonal=AntidiagonalConfig(mass=0.9)),
    "antidiagonal b64 m0.95": replace(ANTIDIAGONAL, antidiagonal=AntidiagonalConfig(block_size=64, mass=0.95)),
    "antidiagonal b64 m0.90": replace(ANTIDIAGONAL, antidiagonal=AntidiagonalConfig(block_size=64, mass=0.9)),
}


def passkey_sweep(model, tokenizer, length: int, depths, seed: int) -> list[dict]:
    answers = []
    for index, depth in enumerate(depths):
        prompt = build_passkey_prompt(tokenizer, length, depth=depth, seed=seed + index)
        answers.append(answer_passkey(model, tokenizer, prompt).to_dict())
    return answers


def summarize_passkey(answers: list[dict], dense_answers: list[dict]) -> dict:
    return {
        "free_correct": sum(a["free_correct"] for a in answers),
        "forced_correct": sum(a["forced_correct"] for a in answers),
        "same_free_text_as_dense": sum(a["free_text"] == d["free_text"] for a, d in zip(answers, dense_answers)),
        "cases": len(answers),
        "prefill_seconds_mean": sum(a["prefill_seconds"] for a in answers) / max(len(answers), 1),
    }


def measure_length(model, tokenizer, length: int, config_names, depths, seed: int, record: dict, save) -> None:
    input_ids = reference_input_ids(tokenizer, length)
    print(f"\n=== L={length}: dense reference", flush=True)
    dense_logits, dense_seconds = last_position_logits(model, input_ids, DEFAULT_SCORED_POSITIONS)
    dense_answers = passkey_sweep(model, tokenizer, length, depths, seed)
    entry = record.setdefault(str(length), {})
    entry["dense"] = {
        "forward_seconds": dense_seconds,
        "passkey": summarize_passkey(dense_answers, dense_answers),
        "passkey_answers": dense_answers,
    }
    print(f"dense: forward {dense_seconds:.1f} s, passkey {entry['dense']['passkey']}", flush=True)
    save()
    for name in config_names:
        config = CONFIGS[name]
        sparseprefill.patch(model, config=config)
        try:
            sparse_logits, sparse_seconds = last_position_logits(model, input_ids, DEFAULT_SCORED_POSITIONS)
            stats = sparseprefill.stats(model)
            density, fallbacks = stats.density, dict(stats.fallbacks)
            comparison = compare_logits(dense_logits, sparse_logits)
            sparseprefill.reset_stats(model)
            answers = passkey_sweep(model, tokenizer, length, depths, seed)
            passkey_density = sparseprefill.stats(model).density
        finally:
            sparseprefill.unpatch(model)
        entry[name] = {
            "config": config.to_dict(),
            "density": density,
            "passkey_prefill_density": passkey_density,
            "fallbacks": fallbacks,
            "forward_seconds": sparse_seconds,
            **comparison.to_dict(),
            "passkey": summarize_passkey(answers, dense_answers),
            "passkey_answers": answers,
        }
        print(
            f"{name}: density {density:.3f}, top1 {comparison.top1_agreement:.4f}, KL {comparison.kl_mean:.4f} "
            f"(max {comparison.kl_max:.3f}), forward {sparse_seconds:.1f} s, passkey {entry[name]['passkey']}",
            flush=True,
        )
        save()


def print_table(record: dict) -> None:
    header = f"{'L':>5}  {'config':<28} {'density':>7} {'top1':>6} {'KL mean':>8} {'KL max':>7} {'free':>5} {'forced':>6} {'fwd s':>6}"
    print("\n" + header + "\n" + "-" * len(header))
    for length, entry in record.items():
        for name, row in entry.items():
            passkey = row["passkey"]
            score = lambda key: f"{passkey[key]}/{passkey['cases']}"  # noqa: E731
            if name == "dense":
                print(f"{length:>5}  {name:<28} {1.0:>7.3f} {'-':>6} {'-':>8} {'-':>7} {score('free_correct'):>5} "
                      f"{score('forced_correct'):>6} {row['forward_seconds']:>6.1f}")
            else:
                print(f"{length:>5}  {name:<28} {row['density']:>7.3f} {row['top1_agreement']:>6.3f} "
                      f"{row['kl_mean']:>8.4f} {row['kl_max']:>7.3f} {score('free_correct'):>5} "
                      f"{score('forced_correct'):>6} {row['forward_seconds']:>6.1f}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--lengths", type=int, nargs="+", default=list(DEFAULT_LENGTHS))
    parser.add_argument("--depths", type=float, nargs="+", default=list(DEFAULT_DEPTHS))
    parser.add_argument("--configs", nargs="+", default=list(CONFIGS), choices=list(CONFIGS), metavar="NAME",
                        help=f"subset of: {', '.join(CONFIGS)}")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    args = parser.parse_args(argv)

    torch.manual_seed(args.seed)
    model, tokenizer = load_smollm2(dtype=torch.float32)
    record: dict = {}
    meta = {"model": "SmolLM2-135M-Instruct (GGUF Q4_1 dequantised, fp32)", "torch": torch.__version__,
            "threads": torch.get_num_threads(), "depths": args.depths, "seed": args.seed}

    def save() -> None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps({"meta": meta, "results": record}, indent=1))

    start = time.perf_counter()
    for length in args.lengths:
        measure_length(model, tokenizer, length, args.configs, args.depths, args.seed, record, save)
    print_table(record)
    print(f"\ntotal {time.perf_counter() - start:.0f} s; results in {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
