"""What the fused vertical-slash kernel (``kernels/vertical_slash/triton_lines.py``) computes beyond the
index path, on real Qwen2.5-Coder-0.5B q/k.

The fused kernel reads, per query block, every column of its head up to the block's last position and
masks the ones a kept diagonal covers, where the index builder compacts them away first. The masked
slots still occupy column tiles. This counts, per layer, on the default (``auto``) lines: key tiles of
the index path (range tiles of ``RANGE_N`` keys + column tiles of ``COLUMN_N`` compacted columns) and
of the fused path (the same range tiles + column tiles of all candidate columns), so the ratio is the
extra kernel work the O(lines) layout costs, before any GPU timing.

    python experiments/fused_lines_work.py --length 8192 --device cpu --dtype float32 --out DIR
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

from sparseprefill import VerticalSlashConfig
from sparseprefill.evals.logits import reference_input_ids
from sparseprefill.kernels.common import default_kv_head_index
from sparseprefill.kernels.geometry import query_block_bounds
from sparseprefill.kernels.vertical_slash.triton_attention import VERTICAL_SLASH_KEY_TILE
from sparseprefill.kernels.vertical_slash.triton_lines import plan_lines
from sparseprefill.patterns import VerticalSlashPattern

sys.path.insert(0, str(Path(__file__).resolve().parent))
from real_density import capture, load_models, log  # noqa: E402

LAYER_STRIDE = 2


def tiles(counts: torch.Tensor, tile: int) -> torch.Tensor:
    return (counts.long() + tile - 1) // tile


def layer_work(q, k, scale, tile=VERTICAL_SLASH_KEY_TILE):
    """(index-path tiles, fused-path tiles, range tiles, candidate columns, kept columns) of one layer."""
    kvh = default_kv_head_index(q.shape[1], k.shape[1], q.device)
    pattern = VerticalSlashPattern(VerticalSlashConfig())
    lines = pattern.estimate_lines(q, k, scale=scale, softcap=None, kv_head_index=kvh)
    index = lines.to_index()
    lengths = torch.where(index.range_valid(), index.range_end - index.range_start, 0)
    range_tiles = tiles(lengths, tile).sum()
    # Every column up to each block's last position (no skipping of the local band), and what the
    # kernel reads (plan_lines: columns below the local band only).
    _, p1 = query_block_bounds(lines.q_len, lines.k_len, lines.block_size_q, q.device)
    real = torch.arange(lines.vertical_index.shape[-1], device=q.device) < lines.vertical_count[..., None]
    columns = torch.where(real, lines.vertical_index.long(), torch.iinfo(torch.int64).max).contiguous()
    up_to_p1 = torch.searchsorted(columns, p1.expand(*columns.shape[:2], -1).contiguous(), right=True)
    candidates = plan_lines(lines, lines_sorted=True)["visible_columns"]
    index_tiles = range_tiles + tiles(index.column_count, tile).sum()
    fused_tiles = range_tiles + tiles(candidates, tile).sum()
    unskipped_tiles = range_tiles + tiles(up_to_p1, tile).sum()
    return dict(index_tiles=int(index_tiles), fused_tiles=int(fused_tiles), unskipped_tiles=int(unskipped_tiles),
                range_tiles=int(range_tiles), candidate_columns=int(candidates.sum()),
                columns_up_to_p1=int(up_to_p1.sum()), kept_columns=int(index.column_count.sum()))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--length", type=int, default=8192)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    ap.add_argument("--gguf")
    ap.add_argument("--metadata")
    ap.add_argument("--out", default=".cache/fused_lines_work")
    args = ap.parse_args(argv)
    if args.length < 128 or args.length > 32768:
        ap.error("--length must lie in [128, 32768] (native context; no YaRN here)")
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    model, tok = load_models(args, [args.length])[False]
    layers = capture(model, reference_input_ids(tok, args.length).to(args.device))
    rows = []
    for li in range(0, len(layers), LAYER_STRIDE):
        q, k, _, scale = layers[li]
        work = layer_work(q, k, scale)
        rows.append(dict(layer=li, **work, ratio=work["fused_tiles"] / max(work["index_tiles"], 1),
                         unskipped_ratio=work["unskipped_tiles"] / max(work["index_tiles"], 1)))
        log(f"layer {li}: {rows[-1]}")
    total = {key: sum(r[key] for r in rows) for key in work}
    total["ratio"] = total["fused_tiles"] / max(total["index_tiles"], 1)
    total["unskipped_ratio"] = total["unskipped_tiles"] / max(total["index_tiles"], 1)
    total["worst_layer_ratio"] = max(r["ratio"] for r in rows)
    (out_dir / "fused_lines_work.json").write_text(json.dumps(dict(length=args.length, layers=rows, total=total),
                                                              indent=1))
    print(json.dumps(total))
    return 0


if __name__ == "__main__":
    sys.exit(main())
