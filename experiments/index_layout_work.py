"""How much of the default's per-block index is padding, on real q/k: what a packed layout would hold.

``VerticalSlashIndex`` keeps ``[B, H, blocks, width]`` tables: every (head, query block) row of column
lists is as wide as the widest head's vertical count, and every row of ranges as wide as the most
merged ranges any block has. On the GPU at 128K that is 11.9x a Llama-3.1-8B layer's KV cache on the
structured input (``experiments/index_memory.py``). Per captured layer of Qwen2.5-Coder-0.5B on natural
text, for the default's own lines, this counts (int32 entries, as a share of the layer's bf16 KV cache):

- ``padded``: what the GPU builder allocates today (column rows at the widest head's vertical count;
  range rows at the most merged ranges of any block, slightly below the builder's bound, its widest
  head's run count);
- ``per_head``: each head's rows padded only to that head's own widest block;
- ``packed``: the listed entries alone (offsets per row, as a CSR layout would store them, are one
  int per row and are counted too);
- ``lines``: the per-head lines the estimate returns (what the fused kernel reads, before its tables);
- ``head``: the per-head layout (``column_layout="head"``): one column list per head cut to the
  widest head's count, the diagonal prefix count (``Lk + 2`` per head), a column and a range count per
  block, and since stop 40 one table of block-relative ranges per head (two rows, whole bands; before
  it, the padded per-block ranges above);

and what the per-head layout reads beyond the per-block one: its column slots and its 32-key tiles
(whole ranges plus columns) as a ratio to the per-block layout's.

Counts from the index's own counts, not a GPU measurement. On the CPU:

    python experiments/index_layout_work.py --length 8192 --device cpu --dtype float32 --metadata DIR --out DIR
"""

from __future__ import annotations

import sys

import torch


from range_tile_work import counted_layers, write_summary  # this folder is on sys.path
from sparseprefill.config import SparseConfig
from sparseprefill.kernels.common import default_kv_head_index
from sparseprefill.kernels.vertical_slash.triton_attention import VERTICAL_SLASH_KEY_TILE as KEY_TILE
from sparseprefill.patterns.vertical_slash import VerticalSlashPattern

INT32_BYTES = 4
BF16_BYTES = 2


def layer_layout(q, k, scale) -> dict:
    kvh = default_kv_head_index(q.shape[1], k.shape[1], q.device)
    lines = VerticalSlashPattern(SparseConfig().vertical_slash).estimate_lines(q, k, scale=scale, softcap=None,
                                                                               kv_head_index=kvh)
    index = lines.to_index(slashes_sorted=True)
    head = lines.to_index(slashes_sorted=True, column_layout="head")
    assert head.lists_same_entries(index), "the per-head layout must list the per-block layout's keys"
    batch, heads, blocks = index.column_count.shape
    rows = batch * heads * blocks
    kv_bytes = 2 * k.shape[1] * k.shape[2] * k.shape[3] * BF16_BYTES
    # The GPU builder's widths: the widest head's vertical count; for ranges the most merged ranges of
    # any block (the builder's bound, the widest head's run count, is at least that).
    column_width = max(int(lines.vertical_count.max()), 1)
    range_width = max(int(index.range_count.max()), 1)
    entries = dict(
        padded=rows * (column_width + 2 * range_width),
        per_head=blocks * int((index.column_count.amax(-1) + 2 * index.range_count.amax(-1)).sum()),
        packed=int(index.column_count.sum()) + 2 * int(index.range_count.sum()) + 2 * rows,
        lines=int(lines.vertical_count.sum()) + int(lines.slash_count.sum()),
        head=batch * heads * (column_width + k.shape[2] + 2) + 2 * rows + 2 * head.range_start.numel(),
    )
    row = {f"{name}_of_kv": INT32_BYTES * n / kv_bytes for name, n in entries.items()}
    range_tiles = int(torch.where(index.range_valid(), -(-(index.range_end - index.range_start) // KEY_TILE), 0).sum())
    tiles = {layout: range_tiles + int((-(-x.column_count.long() // KEY_TILE)).sum()) for layout, x in
             (("block", index), ("head", head))}
    row.update(head_column_slot_ratio=int(head.column_count.sum()) / max(int(index.column_count.sum()), 1),
               head_tile_ratio=tiles["head"] / max(tiles["block"], 1))
    row.update(columns_mean=float(index.column_count.float().mean()), columns_max=int(index.column_count.max()),
               ranges_mean=float(index.range_count.float().mean()), ranges_max=range_width,
               verticals_min=int(lines.vertical_count.min()), verticals_max=int(lines.vertical_count.max()))
    return row


def main(argv=None) -> int:
    args, rows = counted_layers(__doc__, layer_layout,
                                lambda row: ", ".join(f"{key} {value:.3g}" for key, value in row.items()), argv)
    shares = [key for key in rows[0] if key.endswith(("_of_kv", "_ratio"))]
    summary = dict(length=args.length, layers=len(rows),
                   **{f"{key}_mean": sum(r[key] for r in rows) / len(rows) for key in shares},
                   **{f"{key}_max": max(r[key] for r in rows) for key in shares})
    return write_summary(args, "index_layout_work", summary, rows)


if __name__ == "__main__":
    sys.exit(main())
