"""``sparseprefill`` command line (also ``python -m sparseprefill``).

Each subcommand is one ``Command``: a name, a help line, a function that adds its options to its
own parser and a function that runs it. A new subcommand is one more entry in ``COMMANDS``.

    sparseprefill info
    sparseprefill demo --length 4096 --pattern auto
    sparseprefill profile smollm2 --lengths 2048 4096 --out smollm2.json --plot smollm2.png
"""

from __future__ import annotations

import argparse
import importlib.metadata
import importlib.util
import platform
import sys
from dataclasses import dataclass
from typing import Callable

__all__ = ["Command", "COMMANDS", "build_parser", "main"]

DEMO_DEFAULT_LENGTH = 4096
DEMO_DEFAULT_DEPTH = 0.5
DEMO_SCORED_POSITIONS = 256


@dataclass(frozen=True)
class Command:
    name: str
    help: str
    add_arguments: Callable[[argparse.ArgumentParser], None]
    run: Callable[[argparse.Namespace], int]


def _version(distribution: str) -> str | None:
    try:
        return importlib.metadata.version(distribution)
    except importlib.metadata.PackageNotFoundError:
        return None


# ---------------------------------------------------------------------------------------- info


def _add_info_arguments(parser: argparse.ArgumentParser) -> None:
    del parser  # no options yet


def _run_info(args: argparse.Namespace) -> int:
    del args
    import torch
    import transformers

    import sparseprefill

    rows = [
        ("sparseprefill", sparseprefill.__version__),
        ("python", platform.python_version()),
        ("torch", torch.__version__),
        ("transformers", transformers.__version__),
        # Reported from package metadata without importing: importing triton on a CPU-only
        # machine is slow and can print driver warnings.
        ("triton", _version("triton") if importlib.util.find_spec("triton") else None),
        ("gguf (for the demo models)", _version("gguf")),
    ]
    width = max(len(name) for name, _ in rows)
    for name, version in rows:
        print(f"{name:<{width}}  {version or 'not installed'}")

    if torch.cuda.is_available():
        for index in range(torch.cuda.device_count()):
            props = torch.cuda.get_device_properties(index)
            memory_gib = props.total_memory / 2**30
            print(f"{'cuda:' + str(index):<{width}}  {props.name}, {memory_gib:.0f} GiB, sm_{props.major}{props.minor}")
    else:
        print(f"{'cuda':<{width}}  no CUDA device (the CPU reference path is used)")

    print("\nsupported model families (config.model_type):")
    families = sorted(sparseprefill.SUPPORTED_FAMILIES.values(), key=lambda family: family.model_type)
    type_width = max(len(family.model_type) for family in families)
    name_width = max(len(family.family) for family in families)
    for family in families:
        print(f"  {family.model_type:<{type_width}}  {family.family:<{name_width}}  {family.features}")
    return 0


# ---------------------------------------------------------------------------------------- demo


def _add_demo_arguments(parser: argparse.ArgumentParser) -> None:
    from .config import PatternName

    parser.add_argument("--length", type=int, default=DEMO_DEFAULT_LENGTH,
                        help=f"prompt length in tokens (default {DEMO_DEFAULT_LENGTH}; SmolLM2's context is 8192)")
    parser.add_argument("--seed", type=int, default=0, help="chooses the pass key (default 0)")
    parser.add_argument("--depth", type=float, default=DEMO_DEFAULT_DEPTH,
                        help=f"where the key sits in the filler, 0 = start, 1 = end (default {DEMO_DEFAULT_DEPTH})")
    parser.add_argument("--pattern", default=PatternName.AUTO.value, choices=[p.value for p in PatternName],
                        help="sparse pattern forced on every head (default auto)")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"],
                        help="model weights and activations (default float32)")


def _run_demo(args: argparse.Namespace) -> int:
    import torch

    import sparseprefill

    from .fidelity import compare_logits
    from .offline_models import OfflineModelError, load_smollm2
    from .passkey import answer_passkey, build_passkey_prompt

    try:
        model, tokenizer = load_smollm2(dtype=getattr(torch, args.dtype))
    except OfflineModelError as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    prompt = build_passkey_prompt(tokenizer, args.length, depth=args.depth, seed=args.seed)
    print(f"\nprompt: {prompt.num_tokens} tokens, pass key {prompt.key} at depth {prompt.depth:.2f}")

    print("running dense prefill and decode (unpatched) ...", flush=True)
    dense = answer_passkey(model, tokenizer, prompt, scored_positions=DEMO_SCORED_POSITIONS)
    # min_sparse_len=0 forces the sparse path: the default threshold (16K) would run a 4K prompt dense.
    config = sparseprefill.SparseConfig(pattern=args.pattern, min_sparse_len=0)
    sparseprefill.patch(model, config=config)
    try:
        print(f"running sparse prefill ({config.pattern.value}) and decode (patched) ...", flush=True)
        sparse = answer_passkey(model, tokenizer, prompt, scored_positions=DEMO_SCORED_POSITIONS)
        stats = sparseprefill.stats(model)
    finally:
        sparseprefill.unpatch(model)
    comparison = compare_logits(dense.prompt_logits, sparse.prompt_logits)

    def verdict(answer) -> str:
        return f"free {'OK' if answer.free_correct else 'MISS'}, digit-forced {answer.forced_digits} " \
               f"({'OK' if answer.forced_correct else 'MISS'})"

    print(f"\n{'':<8} {'prefill':>8}  answer")
    print(f"{'dense':<8} {dense.prefill_seconds:>7.1f}s  {dense.free_text!r}  [{verdict(dense)}]")
    print(f"{'sparse':<8} {sparse.prefill_seconds:>7.1f}s  {sparse.free_text!r}  [{verdict(sparse)}]")
    density = "n/a" if stats.density is None else f"{stats.density:.3f}"
    print(f"\npattern {config.pattern.value}: density {density} of causal (query, key) pairs computed")
    print(f"next-token top-1 agreement with dense over the last {comparison.positions} prompt positions: "
          f"{comparison.top1_agreement:.3f} (mean KL {comparison.kl_mean:.4f} nats)")
    print("(CPU times: the sparse path here is the torch reference, not the GPU kernels)")
    return 0


# ---------------------------------------------------------------------------------------- bench


def _add_bench_arguments(parser: argparse.ArgumentParser) -> None:
    from .bench import kernels

    targets = parser.add_subparsers(dest="target", metavar="TARGET", required=True)
    kernel_parser = targets.add_parser("kernels", help="sparse kernels vs SDPA cuDNN/flash and FlexAttention (GPU)")
    kernels.add_arguments(kernel_parser)
    kernel_parser.set_defaults(bench_run=kernels.run_from_args)


def _run_bench(args: argparse.Namespace) -> int:
    return args.bench_run(args)


# ---------------------------------------------------------------------------------------- profile

OFFLINE_MODELS = ("smollm2", "gemma3")  # loaded from PyPI wheels (sparseprefill.offline_models)


def _add_profile_arguments(parser: argparse.ArgumentParser) -> None:
    from .profiles import profiler

    parser.add_argument("model", help=f"a transformers model folder, or one of {', '.join(OFFLINE_MODELS)} (offline)")
    parser.add_argument("--lengths", type=int, nargs="+", default=list(profiler.DEFAULT_LENGTHS),
                        help="calibration prompt lengths in tokens")
    parser.add_argument("--samples", type=int, default=profiler.DEFAULT_SAMPLES, help="prompts per length")
    parser.add_argument("--target-recall", type=float, default=profiler.DEFAULT_TARGET_RECALL,
                        help="mean attention-mass recall every head must keep at every length")
    parser.add_argument("--text", nargs="+", default=(), metavar="FILE",
                        help="calibrate on windows of these text files instead of synthetic retrieval prompts")
    parser.add_argument("--out", required=True, help="profile JSON to write")
    parser.add_argument("--plot", default=None, help="PNG: layer x head maps of the chosen patterns and density")
    parser.add_argument("--dtype", default="float32", choices=("float32", "bfloat16", "float16"))
    parser.add_argument("--device", default="cuda" if _cuda_available() else "cpu")


def _cuda_available() -> bool:
    import torch

    return torch.cuda.is_available()


def _load_model(name: str, dtype, device: str):
    from . import offline_models

    if name == "smollm2":
        model, tokenizer = offline_models.load_smollm2(dtype=dtype)
    elif name == "gemma3":
        model, tokenizer = offline_models.load_gemma3(dtype=dtype)
    else:
        from transformers import AutoModelForCausalLM, AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(name)
        model = AutoModelForCausalLM.from_pretrained(name, dtype=dtype)
    return model.to(device).eval(), tokenizer


def _run_profile(args: argparse.Namespace) -> int:
    import torch

    from .profiles import profiler

    options = profiler.ProfilerOptions(lengths=tuple(args.lengths), samples=args.samples,
                                       target_recall=args.target_recall, text_files=tuple(args.text))
    model, tokenizer = _load_model(args.model, getattr(torch, args.dtype), args.device)
    result = profiler.profile_model(model, tokenizer, options)
    written = profiler.write_outputs(result, args.out, args.plot)
    print(result.summary_table())
    print(f"\nprofiled in {result.seconds:.0f} s; wrote {', '.join(str(p) for p in written)}")
    print(f"use it: sparseprefill.patch(model, profile={args.out!r})")
    return 0


COMMANDS: tuple[Command, ...] = (
    Command("info", "versions, CUDA devices and supported model families", _add_info_arguments, _run_info),
    Command("demo", "pass key in a long prompt on SmolLM2-135M, dense vs sparse (CPU, offline from PyPI)",
            _add_demo_arguments, _run_demo),
    Command("bench", "benchmarks on the GPU: kernels (writes CSV rows and a PNG)", _add_bench_arguments, _run_bench),
    Command("profile", "find each head's cheapest pattern that keeps a target recall; writes a profile JSON",
            _add_profile_arguments, _run_profile),
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="sparseprefill", description="Dynamic sparse prefill for transformers LMs.")
    from . import __version__

    parser.add_argument("--version", action="version", version=f"sparseprefill {__version__}")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for command in COMMANDS:
        subparser = subparsers.add_parser(command.name, help=command.help, description=command.help)
        command.add_arguments(subparser)
        subparser.set_defaults(run=command.run)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return args.run(args)


if __name__ == "__main__":
    sys.exit(main())
