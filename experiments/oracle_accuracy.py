"""How accurate is a perfect selection? The density / accuracy floor of sparse prefill on a real model.

Every layer's attention is computed exactly (fp32, in chunks of query rows), then each query row or
64-row query block keeps the fewest keys (or 64-key blocks) whose exact attention holds a share
``mass`` of its own, and attends only those (the kept weights renormalised, as a sparse kernel does).
Three granularities, one per kind of index the package's kernels execute:

- ``key``: per query row, single keys (the absolute floor at that mass; no kernel runs it);
- ``column``: per 64-row query block, single keys ranked by the block's summed mass (each row's own
  key always kept): the vertical-slash index's granularity (its column lists are per query block);
- ``block``: per 64-row query block, 64x64 blocks ranked by their mass (the diagonal block always
  kept, as every block estimator keeps it): the block-sparse kernel's granularity;
- ``blockrow``: the same blocks, but each row of the query block ranks them by its own mass and the
  block keeps the union of its rows' shortest prefixes, so every row (not just the block's average)
  holds the mass: what a block estimator would keep if it guarded its worst row;
- ``column-sN``: not an oracle but its cheapest imitation: the ``column`` selection ranked from N evenly
  spaced rows of each query block instead of all 64 (the last row of the block among them; the
  block's own causal keys always kept, as the estimators keep a local band). How much of the column
  oracle survives when the ranking sees a few rows is what an estimator at that granularity can hope for.

For a given per-row (per-block) mass, no selection of that granularity keeps fewer pairs, so the
accuracy an oracle reaches at a density is what a perfect estimator of that granularity would reach
there; the shipped estimators' rows (``experiments/real_speed.py``) sit to its right. ``exact`` keeps
everything through the same fp32 path: the oracles' own noise floor against the bf16 cuDNN logits.

Per length: dense cuDNN logits (the reference) and flash (the bf16 dense-vs-dense floor), then each
candidate ``GRANULARITY_MASS`` (e.g. ``block_0.95``): density over every layer's causal pairs, NLL delta
over the last 512 positions, top-1 agreement, KL; per-layer densities in ``layers.csv``. On the GPU:

    python experiments/oracle_accuracy.py --lengths 32768 131072 --out DIR [--gguf FILE --metadata DIR]
    python experiments/oracle_accuracy.py --plot DIR/oracle.csv [--estimators E2E.csv]   # redraw DIR/oracle.png

``--device cpu --dtype float32 --lengths 1024`` is a smoke run of the same code.

Measured (one H100, bf16, natural text; benchmarks/results/real_qwen_h100/run10_oracle/, docs/benchmarks.md
"The accuracy floor"): at 32K, top-1 >= 0.97 needs about 0.98 of each row's mass at every granularity:
key oracle 0.097 of the pairs (top-1 0.971), column oracle 0.174-0.237 (0.969-0.982), block oracle 0.313
(0.977); at 64K column 0.132 (0.973) and block 0.287 (0.982). ``exact`` agrees with cuDNN to 0.982.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch

from sparseprefill.bench.common import git_commit, gpu_name
from sparseprefill.bench.plot import pyplot, save_figure
from sparseprefill.bench.real_model import agreement, describe_row, load_qwen_models, log, scored_logits, write_rows
from sparseprefill.evals import offline_models
from sparseprefill.evals.logits import reference_input_ids

IMPLEMENTATION_NAME = "sparseprefill_oracle"
GRANULARITIES = ("key", "column", "block", "blockrow")
# Rows a query block holds for the column and block oracles: the package's index blocks.
QUERY_BLOCK = 64
KEY_BLOCK = 64
# fp32 scores of one chunk of query rows (all query heads of one KV head) stay under this many bytes.
CHUNK_BYTES = 1 << 29
SCORED_POSITIONS = 512  # as experiments/real_speed.py
DEFAULT_CANDIDATES = ("exact", "block_0.95", "column_0.95", "block_0.98", "column_0.98", "key_0.95",
                      "column-s4_0.95", "column-s4_0.98", "block_0.9", "column_0.9", "key_0.98", "block_0.99",
                      "column_0.99")


def parse_candidate(name: str) -> tuple[str, float]:
    """``"block_0.95"`` -> ``("block", 0.95)``; ``"exact"`` -> ``("exact", 1.0)``."""
    if name == "exact":
        return name, 1.0
    granularity, _, mass = name.partition("_")
    sampled = granularity.startswith("column-s") and granularity[len("column-s"):].isdigit()
    if sampled and not 1 <= int(granularity[len("column-s"):]) <= QUERY_BLOCK:
        raise argparse.ArgumentTypeError(f"candidate {name!r}: sampled rows must be in 1..{QUERY_BLOCK}")
    if (granularity not in GRANULARITIES and not sampled) or not mass:
        raise argparse.ArgumentTypeError(f"candidate {name!r}: expected exact or GRANULARITY_MASS with "
                                         f"GRANULARITY one of {GRANULARITIES} or column-sN, e.g. block_0.95")
    value = float(mass)
    if not 0.0 < value <= 1.0:
        raise argparse.ArgumentTypeError(f"candidate {name!r}: mass must be in (0, 1], got {value}")
    return granularity, value


def _first_kept(sorted_mass: torch.Tensor, target: torch.Tensor | float) -> torch.Tensor:
    """Bool over the sorted (descending) last axis: the shortest prefix whose sum reaches ``target``."""
    before = sorted_mass.cumsum(-1) - sorted_mass
    return before < target


def _scatter_back(keep_sorted: torch.Tensor, order: torch.Tensor) -> torch.Tensor:
    return torch.zeros_like(keep_sorted).scatter_(-1, order, keep_sorted)


def oracle_keep(p: torch.Tensor, granularity: str, mass: float, row0: int) -> torch.Tensor:
    """Bool ``[B, G, R, K]`` of the kept pairs for probabilities ``p [B, G, R, K]`` of query rows
    ``row0 .. row0 + R`` (``R`` and ``row0`` multiples of the query block, ``K = row0 + R``)."""
    if granularity == "exact":
        return torch.ones_like(p, dtype=torch.bool)
    if granularity == "key":
        srt, order = p.sort(-1, descending=True)
        return _scatter_back(_first_kept(srt, mass), order)
    b, g, rows, keys = p.shape
    blocks = rows // QUERY_BLOCK
    by_block = p.view(b, g, blocks, QUERY_BLOCK, keys)
    if granularity.startswith("column-s"):
        sampled = int(granularity[len("column-s"):])
        step = QUERY_BLOCK // sampled
        picked = torch.arange(QUERY_BLOCK - 1, -1, -step, device=p.device)[:sampled]  # the last row first
        column_mass = by_block[:, :, :, picked].mean(3)  # [B, G, blocks, K], each row summing to 1
        srt, order = column_mass.sort(-1, descending=True)
        keep = _scatter_back(_first_kept(srt, mass), order)
        keep = keep[:, :, :, None, :].expand(b, g, blocks, QUERY_BLOCK, keys).reshape(b, g, rows, keys)
        block_of_key = torch.arange(keys, device=p.device) // QUERY_BLOCK
        block_of_row = torch.arange(row0, row0 + rows, device=p.device) // QUERY_BLOCK
        return keep | (block_of_row[:, None] == block_of_key[None, :])
    if granularity == "column":
        column_mass = by_block.sum(3)  # [B, G, blocks, K]
        srt, order = column_mass.sort(-1, descending=True)
        keep = _scatter_back(_first_kept(srt, mass * QUERY_BLOCK), order)
        keep = keep[:, :, :, None, :].expand(b, g, blocks, QUERY_BLOCK, keys).reshape(b, g, rows, keys)
        # Each row's own key too (every vertical-slash index keeps the main diagonal): a row whose
        # causal keys all missed the block's ranking would otherwise attend nothing.
        own_key = torch.arange(row0, row0 + rows, device=p.device)[:, None] == torch.arange(keys, device=p.device)
        return keep | own_key
    key_blocks = keys // KEY_BLOCK
    if granularity == "blockrow":
        # Each row ranks the key blocks by its own mass (its diagonal block first) and keeps the fewest
        # reaching ``mass`` of the row; the query block keeps the union: every row holds ``mass``, where
        # the block oracle below guarantees it only on average over the block's rows.
        row_mass = by_block.view(b, g, blocks, QUERY_BLOCK, key_blocks, KEY_BLOCK).sum(5)
        diagonal = (row0 // KEY_BLOCK) + torch.arange(blocks, device=p.device) * (QUERY_BLOCK // KEY_BLOCK)
        forced = diagonal.view(1, 1, blocks, 1, 1).expand(b, g, blocks, QUERY_BLOCK, 1)
        srt, order = row_mass.scatter(-1, forced, float("inf")).sort(-1, descending=True)
        srt = torch.where(torch.isinf(srt), row_mass.gather(-1, order), srt)
        keep = _scatter_back(_first_kept(srt, mass), order).any(3)
        keep = keep[:, :, :, None, :, None].expand(b, g, blocks, QUERY_BLOCK, key_blocks, KEY_BLOCK)
        return keep.reshape(b, g, rows, keys)
    block_mass = by_block.view(b, g, blocks, QUERY_BLOCK, key_blocks, KEY_BLOCK).sum((3, 5))
    diagonal = (row0 // KEY_BLOCK) + torch.arange(blocks, device=p.device) * (QUERY_BLOCK // KEY_BLOCK)
    # The diagonal block first (every block estimator keeps it), then by mass.
    ranked = block_mass.scatter(-1, diagonal.view(1, 1, blocks, 1).expand(b, g, blocks, 1), float("inf"))
    srt, order = ranked.sort(-1, descending=True)
    srt = torch.where(torch.isinf(srt), block_mass.gather(-1, order), srt)
    keep = _scatter_back(_first_kept(srt, mass * QUERY_BLOCK), order)
    keep = keep[:, :, :, None, :, None].expand(b, g, blocks, QUERY_BLOCK, key_blocks, KEY_BLOCK)
    return keep.reshape(b, g, rows, keys)


class OracleAttention:
    """An HF attention function (``AttentionInterface``) computing the oracle's attention for one
    candidate, counting kept and causal pairs per layer."""

    def __init__(self, granularity: str, mass: float):
        self.granularity, self.mass = granularity, mass
        self.kept: dict[int, float] = {}
        self.empty_rows = 0
        self.causal: dict[int, float] = {}
        self.started = time.monotonic()

    def __call__(self, module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
        """``query [B, Hq, L, D]``, ``key``/``value [B, Hkv, L, D]`` -> ``(out [B, L, Hq, D], None)``."""
        b, hq, length, _ = query.shape
        hkv = key.shape[1]
        if key.shape[2] != length or length % QUERY_BLOCK:
            raise ValueError(f"the oracle runs whole prefills of a multiple of {QUERY_BLOCK} tokens; got "
                             f"{length} queries for {key.shape[2]} keys")
        group = hq // hkv
        scale = scaling if scaling is not None else query.shape[-1] ** -0.5
        out = query.new_empty(b, length, hq, query.shape[-1])
        rows_per_chunk = max(QUERY_BLOCK, CHUNK_BYTES // (4 * b * group * length) // QUERY_BLOCK * QUERY_BLOCK)
        kept = 0.0
        for kv in range(hkv):
            heads = slice(kv * group, (kv + 1) * group)
            k, v = key[:, kv:kv + 1].float(), value[:, kv:kv + 1].float()
            for row0 in range(0, length, rows_per_chunk):
                row1 = min(length, row0 + rows_per_chunk)
                q = query[:, heads, row0:row1].float()
                scores = torch.matmul(q, k[:, :, :row1].transpose(-1, -2)) * scale  # [B, G, R, row1]
                causal = (torch.arange(row0, row1, device=q.device)[:, None]
                          >= torch.arange(row1, device=q.device)[None, :])
                p = torch.softmax(scores.masked_fill_(~causal, float("-inf")), dim=-1)
                keep = oracle_keep(p, self.granularity, self.mass, row0) & causal
                kept += float(keep.sum())
                p = p * keep
                row_mass = p.sum(-1, keepdim=True)
                # Only the sampled-row imitation can keep no mass of a row (its own key underflowed to 0
                # in fp32): that row attends nothing (zeros), counted, instead of 0 / 0.
                self.empty_rows += int((row_mass == 0).sum())
                p = p / row_mass.clamp_min(torch.finfo(torch.float32).tiny)
                out[:, row0:row1, heads] = torch.matmul(p, v[:, :, :row1]).transpose(1, 2).to(out.dtype)
        layer = module.layer_idx
        self.kept[layer] = kept
        self.causal[layer] = b * hq * length * (length + 1) / 2
        if layer % 6 == 5:
            log(f"  {self.granularity} {self.mass}: layer {layer} density {kept / self.causal[layer]:.3f} "
                f"({time.monotonic() - self.started:.0f} s)")
        return out, None

    @property
    def density(self) -> float:
        return sum(self.kept.values()) / sum(self.causal.values())


def oracle_logits(model, ids, granularity: str, mass: float) -> tuple[torch.Tensor, OracleAttention]:
    """The scored logits (``bench.real_model.scored_logits``) with every layer's attention the oracle's."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, flash_attention_mask

    oracle = OracleAttention(granularity, mass)
    AttentionInterface.register(IMPLEMENTATION_NAME, oracle)
    AttentionMaskInterface.register(IMPLEMENTATION_NAME, flash_attention_mask)  # causal, no padding: None
    previous = model.config._attn_implementation
    model.set_attn_implementation(IMPLEMENTATION_NAME)
    try:
        return scored_logits(model, ids, SCORED_POSITIONS), oracle
    finally:
        model.set_attn_implementation(previous)


def run(args) -> None:
    args.out.mkdir(parents=True, exist_ok=True)
    if args.device == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = False  # exact fp32 scores: the oracle ranks tiny weights
    started = time.monotonic()
    models = load_qwen_models(args.lengths, device=args.device, dtype=args.dtype, gguf=args.gguf,
                              metadata=args.metadata)
    gpu = gpu_name(args.device) if args.device == "cuda" else "cpu"
    commit = git_commit()
    rows, layer_rows = [], []
    for length in args.lengths:
        model, tok = models[length > offline_models.QWEN_NATIVE_CONTEXT]
        ids = reference_input_ids(tok, length).to(args.device)
        reference = scored_logits(model, ids, SCORED_POSITIONS)
        base = dict(length=length, gpu=gpu, commit=commit)
        rows.append(dict(base, candidate="dense_cudnn", granularity="dense", mass=1.0, density=1.0,
                         **agreement(reference, reference, ids)))
        if args.device == "cuda":
            flash = scored_logits(model, ids, SCORED_POSITIONS, "dense_flash")
            rows.append(dict(base, candidate="dense_flash", granularity="dense", mass=1.0, density=1.0,
                             **agreement(reference, flash, ids)))
        for name in args.candidates:
            if time.monotonic() - started > args.budget_s:
                log(f"budget of {args.budget_s:.0f} s spent: {length} stops before {name}")
                break
            granularity, mass = parse_candidate(name)
            logits, oracle = oracle_logits(model, ids, granularity, mass)
            row = dict(base, candidate=name, granularity=granularity, mass=mass, density=oracle.density,
                       **agreement(reference, logits, ids), empty_rows=oracle.empty_rows)
            rows.append(row)
            layer_rows += [dict(base, candidate=name, layer=layer, density=oracle.kept[layer] / oracle.causal[layer])
                           for layer in sorted(oracle.kept)]
            log(f"{length}: {describe_row(row)}")
            write_rows(args.out / "oracle.csv", rows)
            write_rows(args.out / "layers.csv", layer_rows)
        write_rows(args.out / "oracle.csv", rows)
    plot(args.out / "oracle.csv")


def plot(csv_path: Path, estimators: Path | None = None) -> None:
    """Top-1 agreement against density: one colour per granularity, one line style per length; with
    ``estimators`` (an ``e2e.csv`` of ``experiments/real_density.py`` or ``real_speed.py``), the
    shipped estimators' rows of the same lengths as crosses."""
    import csv

    with open(csv_path) as f:
        # Rows whose logits went non-finite (the sampled-row imitation before empty rows were counted)
        # have no agreement to draw.
        rows = [r for r in csv.DictReader(f)
                if r["granularity"] not in ("dense", "exact") and r["nll"] not in ("nan", "")]
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(8, 5))
    lengths = sorted({int(r["length"]) for r in rows})
    granularities = list(dict.fromkeys(r["granularity"] for r in rows))
    colours = {g: f"C{i}" for i, g in enumerate(granularities)}
    styles = ["-", "--", ":", "-."]
    for li, length in enumerate(lengths):
        for granularity in granularities:
            mine = sorted((float(r["density"]), float(r["top1"])) for r in rows
                          if int(r["length"]) == length and r["granularity"] == granularity)
            if mine:
                kind = "oracle" if granularity in GRANULARITIES else "ranked from sampled rows"
                ax.plot(*zip(*mine), marker="o", color=colours[granularity], linestyle=styles[li % len(styles)],
                        label=f"{granularity} {kind}, {length // 1024}K")
    if estimators is not None:
        with open(estimators) as f:
            shipped = [r for r in csv.DictReader(f) if r.get("top1") and r.get("density")
                       and int(r["length"]) in lengths and r["candidate"] not in ("dense", "dense_cudnn", "dense_flash")]
        names = list(dict.fromkeys(r["candidate"] for r in shipped))
        markers = ["x", "+", "^", "v"]
        for r in shipped:
            ax.scatter(float(r["density"]), float(r["top1"]), color=f"C{len(granularities) + names.index(r['candidate'])}",
                       marker=markers[lengths.index(int(r["length"])) % len(markers)],
                       label=f"{r['candidate']} (estimator), {int(r['length']) // 1024}K")
    ax.axhline(0.97, color="grey", linestyle="--", linewidth=1, label="top-1 bar (0.97)")
    ax.set_xlabel("density (kept causal pairs)")
    ax.set_ylabel("top-1 agreement with dense, last 512")
    ax.set_title("Oracle selections on Qwen2.5-Coder-0.5B")
    ax.legend(fontsize=7, ncol=2)
    save_figure(fig, csv_path.with_suffix(".png"))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--lengths", type=int, nargs="+", default=[32768, 131072])
    parser.add_argument("--candidates", nargs="+", default=list(DEFAULT_CANDIDATES))
    parser.add_argument("--out", type=Path)
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    parser.add_argument("--budget-s", type=float, default=float("inf"), help="stop starting candidates after this")
    parser.add_argument("--gguf")
    parser.add_argument("--metadata")
    parser.add_argument("--plot", type=Path, help="redraw the PNG beside this oracle.csv and exit")
    parser.add_argument("--estimators", type=Path, help="with --plot: an e2e.csv of estimators to draw beside")
    args = parser.parse_args()
    if args.plot:
        plot(args.plot, args.estimators)
        return
    if args.out is None:
        parser.error("--out is required (unless --plot)")
    for name in args.candidates:
        try:
            parse_candidate(name)
        except argparse.ArgumentTypeError as exc:
            parser.error(str(exc))
    if any(length % QUERY_BLOCK for length in args.lengths):
        parser.error(f"--lengths must be multiples of {QUERY_BLOCK}, got {args.lengths}")
    run(args)


if __name__ == "__main__":
    main()
