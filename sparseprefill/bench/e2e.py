"""End-to-end benchmark: time to first token of full-size architectures, dense SDPA vs patched.

    sparseprefill bench e2e --configs llama-3.1-8b --lengths 4k,8k,16k,32k,64k,128k --out results/e2e
    python -m sparseprefill.bench.e2e --dry-run --out /tmp/e2e      # tiny model on the CPU (CI)

Models are built from the shipped architecture configs (``bench/configs/*.json``: transformers
``config.json`` fields of the public models, no hub access) with random weights, directly on the GPU
in bf16; ``--model PATH`` loads real weights instead. Every variant runs in one process on the same
model and the same token ids, warm:

- ``dense_cudnn``: the unpatched model's SDPA with only the cuDNN backend allowed (the baseline;
  every speedup is against it), ``dense_flash``: the same with only the flash backend;
- ``sparse``: ``sparseprefill.patch`` with a fixed sparse budget (see below), one variant per
  ``--density`` value.

Per length it measures prefill TTFT (``model(ids, logits_to_keep=1, use_cache=False)``, CUDA events,
median and min of ``--repeats`` after ``--warmup``), peak memory (``max_memory_allocated`` after a
reset), and from one greedy ``generate`` of ``--new-tokens`` tokens the TTFT with a KV cache and the
decode rate (median time per decode step; decode is dense SDPA in every variant and runs on the same
backends for all, flash first: cuDNN's single-query path was ~2.7x slower on an H200).

Why the density is fixed. Random weights give near-uniform attention, on which the dynamic estimator
keeps an unrepresentative share of the keys. So by default the sparse variant keeps a *fixed budget*:
the default pattern's kernels (vertical-slash estimation, index conversion and attention, exactly the
work ``auto`` does), with both mass targets at 1.0 and ``max_vertical`` / ``max_slash`` caps sized
per length so that the index computes ``--density`` of the causal pairs (``fixed_budget_config``).
The default 0.1 sits in the range the kernel benchmark measured for ``auto`` on structured input
(README: density 0.05 at mass 0.80, 0.12-0.18 at mass 0.90, 0.12-0.34 at the default 0.95, 16K-128K).
The density actually computed is measured with ``sparseprefill.stats`` and written to every row next
to the target. ``--density dynamic`` runs the default estimator instead (meaningful with ``--model``).
``--density dynamic`` follows the library default (``min_sparse_len=None``: the cost model decides
where sparse pays); a fixed budget forces the sparse path (``min_sparse_len=0``), since the cost model
prices the densities real attention needs, not the forced one. ``--min-sparse-len`` overrides both.

CSV columns: see ``CSV_FIELDS``. ``ms`` is TTFT for ``e2e_ttft*`` rows and the median time per new
token for ``e2e_decode``; ``tokens_per_s`` is prefill throughput (length / TTFT) or decode rate.

This module holds the variants, the run and the command line; the models come from ``bench.models``,
the fixed budget from ``bench.budget``, timing, SDPA backends, run metadata and CSV writing from
``bench.common`` (all still importable from here).
"""

from __future__ import annotations

import argparse
import statistics
import sys
from dataclasses import dataclass
from pathlib import Path

import torch

from ..config import SparseConfig
from .budget import DEFAULT_VERTICAL_SHARE, fixed_budget_config
from .common import (
    decode_sdpa_backends,
    environment,
    measure_generate,
    prefill_sdpa_backend,
    time_ms,
    write_csv as write_csv_rows,
)
from .models import CONFIG_DIR, TINY_OVERRIDES, build_model, load_arch_config, shipped_configs, tiny_config

# Importable from here as before the split (tests, scripts): the model and budget helpers.
__all__ = [
    "BASELINE", "CONFIG_DIR", "CSV_FIELDS", "DEFAULT_VARIANTS", "DEFAULT_VERTICAL_SHARE", "DYNAMIC", "Row",
    "TINY_OVERRIDES", "add_arguments", "build_model", "describe_memory", "fixed_budget_config",
    "format_table", "load_arch_config", "main", "measure_generate", "parse_densities", "parse_lengths", "run",
    "run_from_args", "shipped_configs", "time_ms", "tiny_config", "write_csv",
]

DEFAULT_CONFIGS = ("llama-3.1-8b",)
DEFAULT_LENGTHS = "4k,8k,16k,32k,64k,128k"
# See the module docstring: inside auto's measured range on structured input (README kernel table).
DEFAULT_DENSITY = 0.1
DYNAMIC = "dynamic"
DEFAULT_VARIANTS = ("dense_cudnn", "dense_flash", "sparse")
BASELINE = "dense_cudnn"
DEFAULT_REPEATS = 3
DEFAULT_WARMUP = 1
DEFAULT_NEW_TOKENS = 32
GIB = 2**30

# The dry run: each config shrunk to ``TINY_OVERRIDES`` (``models.tiny_config``), on the CPU, at short lengths.
DRY_RUN_LENGTHS = "512,1k"
DRY_RUN_MIN_SPARSE_LEN = 256
DRY_RUN_DENSITY = 0.5
DRY_RUN_NEW_TOKENS = 4

CSV_FIELDS = (
    "op", "config", "length", "variant", "pattern", "density_target", "density", "ms", "ms_min", "tokens_per_s",
    "peak_gib", "weights_gib", "activation_gib", "mlp_gib_est", "speedup_vs_dense_cudnn", "repeats", "device",
    "gpu", "torch", "transformers", "commit", "note",
)


@dataclass
class Row:
    op: str
    config: str
    length: int
    variant: str
    pattern: str
    density_target: str
    density: float
    ms: float
    ms_min: float
    tokens_per_s: float
    peak_gib: float
    weights_gib: float
    activation_gib: float
    mlp_gib_est: float
    speedup_vs_dense_cudnn: float
    repeats: int
    device: str
    gpu: str
    torch: str
    transformers: str
    commit: str
    note: str = ""


# ------------------------------------------------------------------------------------ arguments


def parse_lengths(values: str | list[str]) -> list[int]:
    """``"4k,8k"``, ``["4K", "16384"]``, ``"1m"`` -> token counts (k = 1024, m = 1024**2)."""
    items = [values] if isinstance(values, str) else list(values)
    lengths = []
    for item in items:
        for part in str(item).replace(",", " ").split():
            text = part.strip().lower()
            scale = {"k": 1024, "m": 1024**2}.get(text[-1:], 1)
            number = text[:-1] if scale > 1 else text
            try:
                value = float(number) * scale
            except ValueError:
                raise argparse.ArgumentTypeError(f"bad length {part!r}: expected e.g. 4096, 4k, 128K") from None
            if value <= 0 or value != int(value):
                raise argparse.ArgumentTypeError(f"bad length {part!r}: must be a positive whole number of tokens")
            lengths.append(int(value))
    if not lengths:
        raise argparse.ArgumentTypeError("no lengths given")
    return lengths


def parse_densities(values: str | list[str]) -> list[float | str]:
    """``"0.1"``, ``"0.05,0.1"``, ``"dynamic"`` -> targets in (0, 1] or ``"dynamic"``."""
    items = [values] if isinstance(values, str) else list(values)
    out: list[float | str] = []
    for item in items:
        for part in str(item).replace(",", " ").split():
            if part.lower() in (DYNAMIC, "auto"):
                out.append(DYNAMIC)
                continue
            try:
                value = float(part)
            except ValueError:
                raise argparse.ArgumentTypeError(f"bad density {part!r}: a fraction in (0, 1] or 'dynamic'") from None
            if not 0.0 < value <= 1.0:
                raise argparse.ArgumentTypeError(f"bad density {part!r}: must be in (0, 1]")
            out.append(value)
    return out


def _csv_list(text: str) -> list[str]:
    return [p for p in text.replace(",", " ").split() if p]

# ---------------------------------------------------------------------------------------- variants

def _bytes_gib(n: float) -> float:
    return n / GIB


def _mlp_gib_estimate(config, length: int, dtype: torch.dtype) -> float:
    """One MLP's live intermediates at ``length`` tokens: gate, up, act(gate) * up (``L x I`` each)."""
    size = torch.tensor([], dtype=dtype).element_size()
    return _bytes_gib(3 * length * config.intermediate_size * size)


@dataclass
class _Variant:
    name: str  # dense_cudnn | dense_flash | sparse
    density: float | str | None = None  # sparse only: target or "dynamic"


def run(
    configs: list[str] | None = None,
    lengths: list[int] | None = None,
    densities: list[float | str] | None = None,
    *,
    variants: list[str] | None = None,
    pattern: str = "vertical_slash",
    device: str = "cuda",
    dtype: torch.dtype = torch.bfloat16,
    model_path: str | None = None,
    tiny: bool = False,
    min_sparse_len: int | None = None,
    repeats: int = DEFAULT_REPEATS,
    warmup: int = DEFAULT_WARMUP,
    new_tokens: int = DEFAULT_NEW_TOKENS,
    vertical_share: float = DEFAULT_VERTICAL_SHARE,
    out_dir: str | Path | None = None,
    progress: bool = True,
    seed: int = 0,
) -> list[Row]:
    """All rows for every (config, length, variant); writes ``e2e.csv`` to ``out_dir`` if given."""
    import sparseprefill

    configs = list(configs or DEFAULT_CONFIGS)
    lengths = lengths or parse_lengths(DEFAULT_LENGTHS)
    densities = densities or [DEFAULT_DENSITY]
    variant_names = list(variants or DEFAULT_VARIANTS)
    dev = torch.device(device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("the end-to-end benchmark needs a CUDA GPU (or --device cpu / --dry-run)")
    env = environment(dev)
    plan: list[_Variant] = []
    for name in variant_names:
        if name == "sparse":
            plan.extend(_Variant("sparse", d) for d in densities)
        elif name in ("dense_cudnn", "dense_flash"):
            plan.append(_Variant(name))
        else:
            raise ValueError(f"unknown variant {name!r}; expected dense_cudnn, dense_flash, sparse")
    rows: list[Row] = []
    runs = [(c, n, v) for c in configs for n in lengths for v in plan]
    bar = _progress(len(runs), progress)
    for config_name in configs:
        config = (tiny_config(config_name) if tiny else load_arch_config(config_name)) if model_path is None else None
        model = build_model(config, device=dev, dtype=dtype, model_path=model_path)
        config = model.config
        label = Path(model_path).name if model_path else config_name + (" (tiny)" if tiny else "")
        weights_gib = _bytes_gib(sum(p.numel() * p.element_size() for p in model.parameters()))
        pad = int(getattr(config, "pad_token_id", None) or 0)
        # One short generate first: the first call of generate pays one-off set-up costs.
        warm_ids = torch.randint(0, config.vocab_size, (1, min(128, min(lengths))), generator=torch.Generator().manual_seed(seed)).to(dev)
        if new_tokens > 1:
            measure_generate(model, warm_ids, 2, dev, pad, decode_context=decode_sdpa_backends(dev))
        for length in lengths:
            g = torch.Generator(device="cpu").manual_seed(seed + length)
            ids = torch.randint(0, config.vocab_size, (1, length), generator=g).to(dev)
            mlp_gib = _mlp_gib_estimate(config, length, dtype)
            for variant in plan:
                bar.set_description(f"{label} {length} {variant.name}" + (
                    f" {variant.density}" if variant.density is not None else ""))
                try:
                    rows.extend(_run_variant(model, ids, variant, label=label, env=env, dev=dev, pattern=pattern,
                                             min_sparse_len=min_sparse_len, repeats=repeats, warmup=warmup,
                                             new_tokens=new_tokens, vertical_share=vertical_share, pad=pad,
                                             weights_gib=weights_gib, mlp_gib=mlp_gib, seed=seed))
                except torch.cuda.OutOfMemoryError as error:
                    rows.append(_failed_row(label, length, variant, env, weights_gib, f"OOM: {str(error)[:120]}"))
                    _release(dev)
                finally:
                    if sparseprefill.is_patched(model):
                        sparseprefill.unpatch(model)
                bar.update(1)
        del model
        _release(dev)
    bar.close()
    _fill_speedups(rows)
    if out_dir is not None:
        write_csv(rows, Path(out_dir) / "e2e.csv")
    return rows


def _run_variant(model, ids, variant: _Variant, *, label, env, dev, pattern, min_sparse_len, repeats, warmup,
                 new_tokens, vertical_share, pad, weights_gib, mlp_gib, seed) -> list[Row]:
    import sparseprefill

    length = ids.shape[1]
    note = ""
    target = ""
    used_pattern = "dense_sdpa"
    if variant.name == "sparse":
        if variant.density == DYNAMIC:
            cfg = SparseConfig(min_sparse_len=min_sparse_len)
            target = DYNAMIC
            note = "dynamic estimator (default auto config)"
        else:
            forced = 0 if min_sparse_len is None else min_sparse_len
            cfg, predicted, floor_note = fixed_budget_config(pattern, length, float(variant.density),
                                                             min_sparse_len=forced, device=dev,
                                                             vertical_share=vertical_share, seed=seed)
            target = f"{float(variant.density):g}"
            budget = (f"max_vertical={cfg.vertical_slash.max_vertical} max_slash={cfg.vertical_slash.max_slash}"
                      if cfg.pattern.value == "vertical_slash" else f"top_k={cfg.block_sparse.top_k}")
            note = f"fixed budget: density target {target} (random weights), {budget}, predicted {predicted:.3f}"
            if floor_note:
                note += f"; {floor_note}"
        used_pattern = cfg.pattern.value
        sparseprefill.patch(model, cfg)
    else:
        model.set_attn_implementation("sdpa")
    if dev.type != "cuda" and variant.name != "sparse":
        note = "cpu: SDPA backend not selectable"

    def prefill():
        with torch.inference_mode():
            return model(ids, logits_to_keep=1, use_cache=False)

    rows = []
    common = dict(config=label, length=length, variant=variant.name, pattern=used_pattern, density_target=target,
                  weights_gib=round(weights_gib, 3), mlp_gib_est=round(mlp_gib, 3), **env)
    with prefill_sdpa_backend(dev, variant.name):
        _release(dev)
        base_alloc = torch.cuda.memory_allocated(dev) if dev.type == "cuda" else 0
        if dev.type == "cuda":
            torch.cuda.reset_peak_memory_stats(dev)
        if variant.name == "sparse":
            sparseprefill.reset_stats(model)
        times = time_ms(prefill, dev, warmup=warmup, repeats=repeats)
        peak = torch.cuda.max_memory_allocated(dev) if dev.type == "cuda" else 0
    density = 1.0
    if variant.name == "sparse":
        measured = sparseprefill.stats(model).density
        if measured is None:
            reasons = ", ".join(sorted(sparseprefill.stats(model).fallbacks))
            note = (note + "; " if note else "") + f"ran dense ({reasons})"
        else:
            density = measured
    ms = statistics.median(times)
    rows.append(Row(op="e2e_ttft", density=density, ms=ms, ms_min=min(times), tokens_per_s=length / ms * 1e3,
                    peak_gib=_bytes_gib(peak), activation_gib=_bytes_gib(max(peak - base_alloc, 0)),
                    speedup_vs_dense_cudnn=float("nan"), repeats=repeats, note=note, **common))
    if new_tokens > 1:
        # The prefill inside generate runs under the variant's backend; decode (dense in every variant)
        # under the same backends for all (``decode_sdpa_backends``).
        _release(dev)
        if dev.type == "cuda":
            torch.cuda.reset_peak_memory_stats(dev)
        ttft_cache, steps = measure_generate(model, ids, new_tokens, dev, pad,
                                             prefill_context=prefill_sdpa_backend(dev, variant.name),
                                             decode_context=decode_sdpa_backends(dev))
        peak = torch.cuda.max_memory_allocated(dev) if dev.type == "cuda" else 0
        gen = dict(peak_gib=_bytes_gib(peak), activation_gib=_bytes_gib(max(peak - base_alloc, 0)), note=note,
                   density=density, speedup_vs_dense_cudnn=float("nan"), **common)
        rows.append(Row(op="e2e_ttft_cache", ms=ttft_cache, ms_min=ttft_cache, tokens_per_s=length / ttft_cache * 1e3,
                        repeats=1, **gen))
        step = statistics.median(steps) if steps else float("nan")
        rows.append(Row(op="e2e_decode", ms=step, ms_min=min(steps) if steps else float("nan"),
                        tokens_per_s=1e3 / step, repeats=len(steps), **gen))
    return rows


def _failed_row(label, length, variant: _Variant, env, weights_gib, note) -> Row:
    nan = float("nan")
    return Row(op="e2e_ttft", config=label, length=length, variant=variant.name, pattern="",
               density_target="" if variant.density is None else str(variant.density), density=nan, ms=nan,
               ms_min=nan, tokens_per_s=nan, peak_gib=nan, weights_gib=weights_gib, activation_gib=nan,
               mlp_gib_est=nan, speedup_vs_dense_cudnn=nan, repeats=0, note=note, **env)


def _release(dev: torch.device) -> None:
    if dev.type == "cuda":
        torch.cuda.empty_cache()


def _fill_speedups(rows: list[Row]) -> None:
    """TTFT rows: baseline ms / ms; decode rows: tokens/s / baseline tokens/s."""
    baseline = {(r.op, r.config, r.length): r for r in rows if r.variant == BASELINE}
    for r in rows:
        b = baseline.get((r.op, r.config, r.length))
        if b is None or not (r.ms > 0) or not (b.ms > 0):
            continue
        r.speedup_vs_dense_cudnn = b.ms / r.ms


class _NoBar:
    def set_description(self, *_):
        pass

    def update(self, *_):
        pass

    def close(self):
        pass


def _progress(total: int, enabled: bool):
    if not enabled:
        return _NoBar()
    from tqdm.auto import tqdm

    return tqdm(total=total, unit="run", file=sys.stderr)


# ------------------------------------------------------------------------------------------ output


def write_csv(rows: list[Row], path: Path) -> Path:
    """``rows`` under the header ``CSV_FIELDS``; floats to 6 significant digits, NaN empty."""
    return write_csv_rows(path, CSV_FIELDS, rows, compact_floats=True)


def format_table(rows: list[Row]) -> str:
    head = (f"{'op':<15}{'config':<22}{'length':>8} {'variant':<12}{'target':>8}{'density':>9}{'ms':>11}"
            f"{'min ms':>11}{'tok/s':>11}{'peak GiB':>10}{'speedup':>9}")
    lines = [head]
    for r in sorted(rows, key=lambda r: (r.config, r.op != "e2e_ttft", r.op, r.length)):
        lines.append(f"{r.op:<15}{r.config[:21]:<22}{r.length:>8} {r.variant:<12}{r.density_target:>8}"
                     f"{r.density:>9.3f}{r.ms:>11.2f}{r.ms_min:>11.2f}{r.tokens_per_s:>11.1f}{r.peak_gib:>10.2f}"
                     f"{r.speedup_vs_dense_cudnn:>8.2f}x")
    return "\n".join(lines)


def describe_memory(rows: list[Row]) -> str:
    """One line per (config, length) of the baseline TTFT: weights, activations, the MLP's share."""
    out = []
    for r in rows:
        if r.op == "e2e_ttft" and r.variant == BASELINE and r.device == "cuda" and r.activation_gib == r.activation_gib:
            share = r.mlp_gib_est / r.activation_gib if r.activation_gib > 0 else float("nan")
            out.append(f"{r.config} {r.length}: peak {r.peak_gib:.2f} GiB = weights {r.weights_gib:.2f} + "
                       f"activations {r.activation_gib:.2f}; one MLP's gate/up/act intermediates "
                       f"~{r.mlp_gib_est:.2f} GiB ({share:.0%} of activations)")
    return "\n".join(out)


# ---------------------------------------------------------------------------------------------- CLI


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--configs", default=None,
                        help=f"shipped architecture configs or config.json paths, comma-separated "
                             f"(default {','.join(DEFAULT_CONFIGS)}; shipped: {', '.join(shipped_configs())})")
    parser.add_argument("--model", default=None, help="a model folder with real weights instead of --configs")
    parser.add_argument("--lengths", nargs="+", default=None,
                        help=f"prompt lengths, e.g. 4k,8k,16k or 4096 8192 (default {DEFAULT_LENGTHS})")
    parser.add_argument("--density", nargs="+", default=None,
                        help=f"sparse budget(s): fraction of causal pairs computed, comma-separated, or 'dynamic' "
                             f"for the default estimator (default {DEFAULT_DENSITY}: see the module docstring)")
    parser.add_argument("--pattern", default="vertical_slash", choices=("vertical_slash", "block_sparse"),
                        help="kernels of the fixed-budget sparse variant (default: the auto pattern's vertical_slash)")
    parser.add_argument("--variants", default=",".join(DEFAULT_VARIANTS),
                        help="comma-separated subset of dense_cudnn,dense_flash,sparse")
    parser.add_argument("--min-sparse-len", type=int, default=None,
                        help="below this length the patched model runs dense (default: the library's cost "
                             "model for --density dynamic, 0 for a fixed budget)")
    parser.add_argument("--repeats", type=int, default=None, help=f"timed prefills per point (default {DEFAULT_REPEATS})")
    parser.add_argument("--warmup", type=int, default=None, help=f"untimed prefills first (default {DEFAULT_WARMUP})")
    parser.add_argument("--new-tokens", type=int, default=None,
                        help=f"tokens of the decode measurement; 0 skips it (default {DEFAULT_NEW_TOKENS})")
    parser.add_argument("--vertical-share", type=float, default=DEFAULT_VERTICAL_SHARE,
                        help="share of the vertical-slash budget given to columns")
    parser.add_argument("--device", default=None, help="cuda (default) or cpu")
    parser.add_argument("--dry-run", action="store_true",
                        help="tiny 2-layer version of each config on the CPU at short lengths (tests the code path)")
    parser.add_argument("--out", default=None, help="directory for e2e.csv and e2e.png")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")


def run_from_args(args: argparse.Namespace) -> int:
    dry = args.dry_run
    device = args.device or ("cpu" if dry else "cuda")
    if device.startswith("cuda") and not torch.cuda.is_available():
        print("error: the end-to-end benchmark needs a CUDA GPU; use --dry-run (or --device cpu) without one",
              file=sys.stderr)
        return 1
    try:
        lengths = parse_lengths(args.lengths or (DRY_RUN_LENGTHS if dry else DEFAULT_LENGTHS))
        densities = parse_densities(args.density) if args.density else [DRY_RUN_DENSITY if dry else DEFAULT_DENSITY]
    except argparse.ArgumentTypeError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    configs = _csv_list(args.configs) if args.configs else list(DEFAULT_CONFIGS)
    rows = run(
        configs, lengths, densities, variants=_csv_list(args.variants), pattern=args.pattern, device=device,
        dtype=torch.float32 if device == "cpu" else torch.bfloat16, model_path=args.model, tiny=dry,
        min_sparse_len=args.min_sparse_len if args.min_sparse_len is not None else (DRY_RUN_MIN_SPARSE_LEN if dry else None),
        repeats=args.repeats if args.repeats is not None else (1 if dry else DEFAULT_REPEATS),
        warmup=args.warmup if args.warmup is not None else (0 if dry else DEFAULT_WARMUP),
        new_tokens=args.new_tokens if args.new_tokens is not None else (DRY_RUN_NEW_TOKENS if dry else DEFAULT_NEW_TOKENS),
        vertical_share=args.vertical_share, out_dir=args.out, progress=not args.no_progress,
    )
    fixed = [d for d in densities if d != DYNAMIC]
    if fixed:
        print(f"sparse variant: FIXED budget ({args.pattern}), density target(s) {', '.join(f'{d:g}' for d in fixed)} "
              f"of causal pairs (random weights give near-uniform attention, so the dynamic estimator is not "
              f"representative); measured density is in the 'density' column")
    print(format_table(rows))
    memory = describe_memory(rows)
    if memory:
        print(memory)
    if args.out is not None:
        from .e2e_plot import plot_e2e
        from .plot import plot_beside_csv

        plot_beside_csv(plot_e2e, args.out, "e2e")
    return 0


def main(argv=None) -> int:
    from . import command_main

    return command_main(__doc__, add_arguments, run_from_args, argv)


if __name__ == "__main__":
    sys.exit(main())
