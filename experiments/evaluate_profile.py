"""Held-out check of a profile: recall and density of the profile vs the ``auto`` default.

Both run on prompts the profiler never saw (the calibration prompt builder with later seeds and
needle depths, or later windows of the user's text), at the given lengths; the numbers are means
over the heads of the layers that run sparse. Writes JSON and prints a markdown table.

    python experiments/evaluate_profile.py smollm2 --profile sparseprefill/profiles/shipped/smollm2-135m-instruct.json \
        --lengths 2048 4096 --samples 2 --out benchmarks/results/profile_heldout_smollm2.json
"""

from __future__ import annotations

import argparse
import json
import time
from dataclasses import replace

import torch

import sparseprefill
from sparseprefill import SparseConfig
from sparseprefill.calibrate.profiler import ProfilerOptions, evaluate_settings, profile_plan, uniform_plan
from sparseprefill.evals.harness import load_model
from sparseprefill.profiles import check_profile_matches


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("model", help="smollm2, gemma3 (offline models), or a model folder")
    parser.add_argument("--profile", required=True)
    parser.add_argument("--lengths", type=int, nargs="+", default=[2048, 4096])
    parser.add_argument("--samples", type=int, default=2)
    parser.add_argument("--auto-masses", type=float, nargs="*", default=[],
                        help="also evaluate auto with these vertical/slash masses (equal-recall comparisons)")
    parser.add_argument("--skip-profile", action="store_true", help="evaluate only the auto configs")
    parser.add_argument("--out", default=None)
    args = parser.parse_args(argv)
    profile = sparseprefill.load_profile(args.profile)
    model, tokenizer = load_model(args.model, torch.float32, "cpu")
    check_profile_matches(profile, model.config)
    options = ProfilerOptions(lengths=tuple(args.lengths), samples=args.samples)
    # Held out: prompt indices start after the calibration ones.
    offset = profile.calibration.samples
    start = time.perf_counter()
    plans = {} if args.skip_profile else {"profile": profile_plan(profile)}
    plans["auto"] = uniform_plan(SparseConfig())
    for mass in args.auto_masses:
        default = SparseConfig()
        vertical_slash = replace(default.vertical_slash, vertical_mass=mass, slash_mass=mass)
        plans[f"auto_m{mass:.2f}"] = uniform_plan(replace(default, vertical_slash=vertical_slash))
    rows = evaluate_settings(model, tokenizer, plans, options, offset=offset)
    seconds = time.perf_counter() - start
    print("| config | length | recall mean | recall p5 (mean over heads) | worst head | density |")
    print("| --- | --- | --- | --- | --- | --- |")
    for name, by_length in rows.items():
        for row in by_length:
            print(f"| {name} | {row['length']} | {row['recall_mean']:.4f} | {row['recall_p5_mean']:.4f} | "
                  f"{row['recall_min_head']:.4f} | {row['density']:.4f} |")
    print(f"({seconds:.0f} s, held-out prompts {offset}..{offset + args.samples - 1})")
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"model": args.model, "profile": args.profile, "target": profile.calibration.target,
                       "lengths": args.lengths, "samples": args.samples, "first_prompt": offset,
                       "seconds": round(seconds, 1), "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
