"""How the default's merged ranges fill key tiles on real q/k: what wide leading tiles could change.

The vertical-slash kernels walk each merged range from wherever it starts, so its last tile is partial.
With ``wide_key_tile`` W (``triton_common.attend_key_range``) a range of n keys runs floor(n / W) whole
W-key tiles, then ceil((n mod W) / 32) 32-key tiles. Per captured layer of Qwen2.5-Coder-0.5B on
natural text, for the default's own index (``SparseConfig()``'s lines, 64-row blocks), this counts
the key slots and loop trips each policy walks (32 only, 64 only, 64 then 32, 128 then 32), the share
of listed range keys that land in whole wide tiles, the range-length distribution, and what the same
lines list over 128-row query blocks (the pairs a 128-row program would compute). Counts, not times:
what to expect from the GPU comparison (``experiments/wide_tiles.py``), which decides.

    python experiments/range_tile_work.py --length 8192 --device cpu --dtype float32 --out DIR
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

from sparseprefill.bench.real_model import capture_layers, load_qwen_models, log
from sparseprefill.config import SparseConfig
from sparseprefill.evals.logits import reference_input_ids
from sparseprefill.kernels.common import default_kv_head_index
from sparseprefill.kernels.geometry import causal_pairs_total
from sparseprefill.kernels.vertical_slash import vertical_slash_lines
from sparseprefill.kernels.vertical_slash.triton_attention import VERTICAL_SLASH_KEY_TILE
from sparseprefill.patterns.vertical_slash import VerticalSlashPattern

NARROW = VERTICAL_SLASH_KEY_TILE
POLICIES = {"narrow_32": (0, NARROW), "only_64": (0, 64), "wide_64": (64, NARROW), "wide_128": (128, NARROW)}


def ceil_div(a: torch.Tensor, b: int) -> torch.Tensor:
    return (a + b - 1) // b


def walk(lengths: torch.Tensor, wide: int, narrow: int) -> dict[str, int]:
    """Key slots, loop trips and keys in whole wide tiles for ranges of ``lengths`` keys."""
    whole = lengths // wide if wide else torch.zeros_like(lengths)
    rest = lengths - whole * wide
    narrow_trips = ceil_div(rest, narrow)
    return dict(slots=int((whole * wide + narrow_trips * narrow).sum()), trips=int((whole + narrow_trips).sum()),
                wide_keys=int((whole * wide).sum()))


def layer_work(q, k, scale) -> dict:
    kvh = default_kv_head_index(q.shape[1], k.shape[1], q.device)
    pattern = VerticalSlashPattern(SparseConfig().vertical_slash)
    lines = pattern.estimate_lines(q, k, scale=scale, softcap=None, kv_head_index=kvh)
    index = lines.to_index(slashes_sorted=True)
    lengths = torch.where(index.range_valid(), index.range_end - index.range_start, 0).long()
    lengths = lengths[lengths > 0]
    length = q.shape[2]
    causal = causal_pairs_total(length, length) * q.shape[1]
    wider = vertical_slash_lines(lines.vertical_index, lines.vertical_count, lines.slash_offset, lines.slash_count,
                                 q_len=length, k_len=length, block_size_q=2 * index.block_size_q).to_index(
                                     slashes_sorted=True)
    row = dict(range_keys=int(lengths.sum()), ranges=int(lengths.numel()),
               range_len_median=float(lengths.float().median()), range_len_p90=float(lengths.float().quantile(0.9)),
               column_keys=int(index.column_count.sum()),
               column_slots=int((ceil_div(index.column_count.long(), NARROW) * NARROW).sum()),
               density=float(index.computed_pairs().sum()) / causal,
               density_block128=float(wider.computed_pairs().sum()) / causal)
    for name, (wide, narrow) in POLICIES.items():
        for key, value in walk(lengths, wide, narrow).items():
            row[f"{name}_{key}"] = value
    return row


def captured_qwen_layers(description: str, argv=None):
    """The command line both CPU counting scripts share (``--length``, ``--device``, ``--dtype``,
    ``--layer-stride``, ``--metadata``, ``--out``), refused in one line before any model loads, then
    ``(args, {layer: (q, k, v, scale)})`` of every ``--layer-stride``-th layer of Qwen2.5-Coder-0.5B on the
    natural text."""
    ap = argparse.ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--length", type=int, default=8192)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    ap.add_argument("--layer-stride", type=int, default=2)
    ap.add_argument("--metadata", help="tokenizer/config folder (offline_models.export_metadata)")
    ap.add_argument("--out", type=Path, required=True)
    args = ap.parse_args(argv)
    if not 128 <= args.length <= 32768:
        ap.error("--length must lie in [128, 32768] (native context; no YaRN here)")
    if args.layer_stride < 1:
        ap.error(f"--layer-stride must be >= 1, got {args.layer_stride}")
    args.out.mkdir(parents=True, exist_ok=True)
    model, tok = load_qwen_models([args.length], device=args.device, dtype=args.dtype, metadata=args.metadata)[False]
    n_layers = model.config.num_hidden_layers
    return args, capture_layers(model, reference_input_ids(tok, args.length).to(args.device),
                                range(0, n_layers, args.layer_stride))


def counted_layers(description: str, layer_work, describe, argv=None):
    """``captured_qwen_layers``, then per captured layer ``dict(layer=..., **layer_work(q, k, scale))``, each
    logged as ``describe(row)``: ``(args, rows)``. The counting scripts' shared loop."""
    args, captured = captured_qwen_layers(description, argv)
    rows = []
    for layer, (q, k, _, scale) in captured.items():
        rows.append(dict(layer=layer, **layer_work(q, k, scale)))
        log(f"layer {layer}: {describe(rows[-1])}")
    return args, rows


def write_summary(args, name: str, summary: dict, rows: list[dict]) -> int:
    """``{name}.json`` (summary and per-layer rows) in ``--out``, the summary printed; exit status 0."""
    (args.out / f"{name}.json").write_text(json.dumps(dict(summary=summary, layers=rows), indent=1))
    print(json.dumps(summary, indent=1))
    return 0


def main(argv=None) -> int:
    args, rows = counted_layers(__doc__, layer_work, lambda row: ", ".join(
        f"{key} {value:.3g}" if isinstance(value, float) else f"{key} {value}" for key, value in row.items()), argv)
    totals = {key: sum(r[key] for r in rows) for key in rows[0] if key.endswith(("_slots", "_trips", "_keys"))}
    summary = dict(length=args.length, layers=len(rows),
                   listed_range_keys=totals["range_keys"],
                   range_share_of_listed=totals["range_keys"] / (totals["range_keys"] + totals["column_keys"]),
                   **{f"{name}_slot_waste": totals[f"{name}_slots"] / totals["range_keys"] - 1 for name in POLICIES},
                   **{f"{name}_trips": totals[f"{name}_trips"] for name in POLICIES},
                   **{f"{name}_wide_key_share": totals[f"{name}_wide_keys"] / totals["range_keys"]
                      for name in ("wide_64", "wide_128")},
                   density=sum(r["density"] for r in rows) / len(rows),
                   density_block128=sum(r["density_block128"] for r in rows) / len(rows))
    return write_summary(args, "range_tile_work", summary, rows)


if __name__ == "__main__":
    sys.exit(main())
