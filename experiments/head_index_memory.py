"""What the default's index keeps at 32K and 128K in each layout, counted on the CPU from the tables'
shapes (no GPU allocator): the per-block layout as the GPU builder allocates it, and the per-head
layout (one column list, one diagonal prefix count and, since stop 40, one table of block-relative
ranges per head), against the layer's bf16 KV cache (issue 15's bound: estimation + index at 128K <= 10%
of a Llama-3.1-8B layer's KV cache).

For each shape (``vertical_slash_ceiling.SHAPES``) and length, on the structured synthetic input built
on the CPU (the same construction as the GPU scripts; its random stream differs, so the lines do too),
the default's lines (``estimate_lines``, fp32), then the per-head index from them
(``head_ranges.build_per_head_index``: the torch twin of the GPU builder's tables) and:

- ``per_block_mib``: the per-block layout at the GPU builder's widths (columns at the widest head's
  vertical count, ranges at the plan's bound on pieces, ``max_range_keys`` as the default cuts them),
  plus its per-block counts and pair counts;
- ``per_head_mib``: the per-head layout's tensors as built here, and ``per_head_gpu_mib`` with the range
  tables at the plan's bound (what the GPU builder allocates), split into ``cover_mib`` (the diagonal
  prefix count, ``Lk + 2`` per head), ``columns_mib``, ``range_tables_mib`` and ``per_block_mib``
  counts (range and column counts, int64 pair counts);
- ``*_of_kv``: each as a share of the layer's KV cache.

Rows: ``head_index_memory.csv`` and a PNG. On the CPU (128K on Llama shapes takes ~10 GiB):

    python experiments/head_index_memory.py --out DIR
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

from sparseprefill.bench.common import git_commit, write_csv
from sparseprefill.bench.kernels import structured_qkv
from sparseprefill.config import SparseConfig
from sparseprefill.kernels.vertical_slash import range_piece_keys, range_pieces_pay
from sparseprefill.kernels.vertical_slash.head_ranges import build_per_head_index, head_run_bounds
from sparseprefill.patterns.vertical_slash import VerticalSlashPattern
from vertical_slash_ceiling import SHAPES  # this folder is on sys.path

MIB = 2**20
INT32_BYTES, INT64_BYTES, BF16_BYTES = 4, 8, 2
FIELDS = ["shape", "length", "max_range_keys", "kv_cache_mib", "per_block_mib", "per_head_mib", "per_head_gpu_mib",
          "cover_mib", "columns_mib", "range_tables_mib", "counts_mib", "per_block_of_kv", "per_head_gpu_of_kv",
          "commit"]


def plan_piece_bound(slash_offset: torch.Tensor, slash_count: torch.Tensor, width: int, piece_keys: int | None) -> int:
    """The GPU plan's bound on any head's ranges at this block width (``triton_plan.slash_plan_kernel``):
    its runs without pieces, else ``(sum over runs of hi - lo + runs * (width + piece_keys - 1)) //
    piece_keys``; the largest head's."""
    lo, hi, runs = head_run_bounds(slash_offset, slash_count, width)
    if piece_keys is None:
        return int(runs.max())
    real = torch.arange(lo.shape[-1]) < runs[..., None].long()
    span = torch.where(real, hi - lo, 0).sum(-1)
    return int(((span + runs.long() * (width + piece_keys - 1)) // piece_keys).max())


def count_layer(shape: str, length: int) -> dict:
    heads, kv_heads, head_dim = SHAPES[shape]
    q, k, _ = structured_qkv(heads, kv_heads, length, head_dim, torch.device("cpu"))
    kv_mib = 2 * k.numel() * BF16_BYTES / MIB
    pattern = VerticalSlashPattern(SparseConfig().vertical_slash)
    kvh = torch.arange(heads) // (heads // kv_heads)
    lines = pattern.estimate_lines(q.float(), k.float(), scale=head_dim**-0.5, softcap=None, kv_head_index=kvh)
    q = k = None
    block = lines.block_size_q
    # Where the GPU cuts ranges into pieces (``VerticalSlashPattern.range_piece_keys`` on bf16 q).
    cut = range_piece_keys(head_dim, block, BF16_BYTES) if range_pieces_pay(head_dim) else None
    index = build_per_head_index(lines.vertical_index, lines.vertical_count, lines.slash_offset, lines.slash_count,
                                 q_len=length, k_len=length, block_size_q=block, max_range_keys=cut)
    batch_heads_blocks = index.range_count.numel()
    max_vertical = max(int(lines.vertical_count.max()), 1)
    last_width = length - (index.range_count.shape[2] - 1) * block
    bound = max(plan_piece_bound(lines.slash_offset, lines.slash_count, width, cut) for width in (block, last_width))
    bound = max(bound, 1)
    counts_bytes = batch_heads_blocks * (2 * INT32_BYTES + INT64_BYTES)
    per_block = batch_heads_blocks * (max_vertical + 2 * bound) * INT32_BYTES + counts_bytes
    cover = index.column_cover.numel() * INT32_BYTES
    columns = lines.vertical_count.numel() * max_vertical * INT32_BYTES  # the GPU trims the lists to this
    tables = 2 * index.range_start.numel() * INT32_BYTES
    tables_gpu = 2 * index.range_start[..., :1].numel() * bound * INT32_BYTES
    per_head = cover + columns + tables + counts_bytes
    per_head_gpu = cover + columns + tables_gpu + counts_bytes
    return dict(shape=shape, length=length, max_range_keys=cut, kv_cache_mib=round(kv_mib, 1),
                per_block_mib=round(per_block / MIB, 1), per_head_mib=round(per_head / MIB, 2),
                per_head_gpu_mib=round(per_head_gpu / MIB, 2), cover_mib=round(cover / MIB, 2),
                columns_mib=round(columns / MIB, 2), range_tables_mib=round(tables_gpu / MIB, 3),
                counts_mib=round(counts_bytes / MIB, 2), per_block_of_kv=round(per_block / MIB / kv_mib, 3),
                per_head_gpu_of_kv=round(per_head_gpu / MIB / kv_mib, 4), commit=git_commit())


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    labels = [f"{r['shape']} {r['length'] // 1024}K" for r in rows]
    x = torch.arange(len(rows)).float()
    ax.bar(x - 0.2, [r["per_block_of_kv"] for r in rows], 0.4, label="per-block index (GPU widths)")
    ax.bar(x + 0.2, [r["per_head_gpu_of_kv"] for r in rows], 0.4, label="per-head index (GPU widths)")
    ax.axhline(0.10, color="k", linestyle="--", linewidth=1, label="issue 15 bound (0.10)")
    ax.set_yscale("log")
    ax.set_xticks(x.tolist(), labels)
    ax.set_ylabel("index kept / layer's bf16 KV cache")
    ax.set_title("The default's index on the structured input (CPU counts)")
    ax.legend(loc="upper center", bbox_to_anchor=(0.5, -0.12), ncol=3, fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--lengths", type=int, nargs="+", default=[32768, 131072])
    parser.add_argument("--shapes", nargs="+", default=list(SHAPES), choices=list(SHAPES))
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args(argv)
    if min(args.lengths) < 128:
        parser.error(f"--lengths must be >= 128, got {min(args.lengths)}")
    args.out.mkdir(parents=True, exist_ok=True)
    rows = []
    for shape in args.shapes:
        for length in args.lengths:
            rows.append(count_layer(shape, length))
            r = rows[-1]
            print(f"{shape} {length}: per-block {r['per_block_mib']} MiB ({r['per_block_of_kv']}x KV), per-head "
                  f"{r['per_head_gpu_mib']} MiB ({r['per_head_gpu_of_kv']}x; cover {r['cover_mib']}, columns "
                  f"{r['columns_mib']}, ranges {r['range_tables_mib']}, counts {r['counts_mib']})", flush=True)
    write_csv(args.out / "head_index_memory.csv", FIELDS, rows)
    plot(rows, args.out / "head_index_memory.png")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
