"""How much of the vertical-slash index builder's work head runs remove, counted on real q/k.

The GPU builder (``triton_index._vs_index_kernel``) runs one program per query block and head. Walking
visible diagonals (``head_runs=False``), a block reads every diagonal up to its last position twice, in
``LINE_TILE``-lane steps, to find and write its merged runs; from its head's runs (``head_runs=True``)
it reads the head's runs once to count those ending below its first position and then writes only
those. Both then read the block's candidate columns once. Per captured layer of Qwen2.5-Coder-0.5B on
natural text, for the default's own lines, this counts the lane steps (loop trips) and the line loads of
each part, summed over blocks and heads. Counts, not times: ``experiments/conversion_timing.py`` times
both builders on the GPU.

    python experiments/builder_work.py --length 8192 --device cpu --dtype float32 --metadata DIR --out DIR
"""

from __future__ import annotations

import sys

import torch

from range_tile_work import counted_layers, write_summary  # this folder is on sys.path
from sparseprefill.config import SparseConfig
from sparseprefill.kernels.common import default_kv_head_index
from sparseprefill.kernels.geometry import query_block_bounds
from sparseprefill.kernels.vertical_slash.triton_index import LINE_TILE
from sparseprefill.patterns.vertical_slash import VerticalSlashPattern


def ceil_div(a: torch.Tensor, b: int) -> torch.Tensor:
    return (a + b - 1) // b


def layer_work(q, k, scale) -> dict:
    q, k = q.float(), k.float()  # counts: the fp32 reference selection
    kvh = default_kv_head_index(q.shape[1], k.shape[1], q.device)
    lines = VerticalSlashPattern(SparseConfig().vertical_slash).estimate_lines(q, k, scale=scale, softcap=None,
                                                                               kv_head_index=kvh)
    p0, p1 = query_block_bounds(lines.q_len, lines.k_len, lines.block_size_q, q.device)  # [Rq]
    width = lines.block_size_q
    totals = dict(diagonal_trips=0, run_trips=0, column_trips=0, diagonal_loads=0, run_loads=0, column_loads=0,
                  blocks=0, head_runs_mean=0.0)
    runs_per_head = []
    for b in range(lines.slash_offset.shape[0]):
        for h in range(lines.slash_offset.shape[1]):
            slashes = lines.slash_offset[b, h, : int(lines.slash_count[b, h])].long().sort().values
            columns = lines.vertical_index[b, h, : int(lines.vertical_count[b, h])].long().sort().values
            visible = torch.searchsorted(slashes, p1, right=True)  # diagonals <= p1, per block
            candidates = torch.searchsorted(columns, p1, right=True)
            ends = torch.ones_like(slashes, dtype=torch.bool)
            ends[:-1] = slashes[1:] - slashes[:-1] > width
            run_last = slashes[ends]
            complete = torch.searchsorted(run_last, p0)  # runs whose last diagonal lies below p0
            runs_per_head.append(int(run_last.numel()))
            # Visible diagonals: two passes (2 then 3 loads per lane); head runs: one counting pass over
            # the head's runs (2 loads) and one writing pass over the complete ones (3 loads).
            totals["diagonal_trips"] += int(2 * ceil_div(visible, LINE_TILE).sum())
            totals["diagonal_loads"] += int(5 * visible.sum())
            totals["run_trips"] += int((ceil_div(torch.full_like(visible, run_last.numel()), LINE_TILE)
                                        + ceil_div(complete, LINE_TILE)).sum())
            totals["run_loads"] += int((2 * run_last.numel() + 3 * complete).sum())
            totals["column_trips"] += int(ceil_div(candidates, LINE_TILE).sum())
            totals["column_loads"] += int(4 * candidates.sum())
            totals["blocks"] += int(p0.numel())
    totals["head_runs_mean"] = sum(runs_per_head) / len(runs_per_head)
    return totals


def main(argv=None) -> int:
    args, rows = counted_layers(__doc__, layer_work, lambda r: (
        f"trips visible-diagonals {r['diagonal_trips'] + r['column_trips']}, head-runs "
        f"{r['run_trips'] + r['column_trips']}; loads {r['diagonal_loads'] + r['column_loads']} vs "
        f"{r['run_loads'] + r['column_loads']}; {r['head_runs_mean']:.1f} runs per head"), argv)
    total = {key: sum(r[key] for r in rows) for key in rows[0] if key not in ("layer", "head_runs_mean")}
    summary = dict(
        length=args.length, layers=len(rows), line_tile=LINE_TILE,
        trips_visible_diagonals=total["diagonal_trips"] + total["column_trips"],
        trips_head_runs=total["run_trips"] + total["column_trips"],
        loads_visible_diagonals=total["diagonal_loads"] + total["column_loads"],
        loads_head_runs=total["run_loads"] + total["column_loads"],
        column_share_of_trips_visible_diagonals=total["column_trips"] / (total["diagonal_trips"] + total["column_trips"]),
        head_runs_mean=sum(r["head_runs_mean"] for r in rows) / len(rows))
    summary["trips_ratio"] = summary["trips_head_runs"] / summary["trips_visible_diagonals"]
    summary["loads_ratio"] = summary["loads_head_runs"] / summary["loads_visible_diagonals"]
    return write_summary(args, "builder_work", summary, rows)


if __name__ == "__main__":
    sys.exit(main())
