"""How often a head's lines alone decide that it runs dense, counted on real q/k.

``run(dense_above=...)`` routes a head dense when its index lists at least the break-even share of its
causal pairs. ``VerticalSlashLines.pairs_lower_bound`` (the columns' pairs, or the diagonals' with gaps
up to a block's width filled) is at most what the index counts, so a head whose bound already reaches the
threshold is routed dense before its index rows are built (``LinePattern.routed_estimate``), sparing the
builder its blocks. Per captured layer of Qwen2.5-Coder-0.5B on natural text, for the default's own lines:
each head's index density and bound density, the heads at or past the vertical-slash break-even by each,
and the share of the builder's blocks those heads spare. Counts, not times.

    python experiments/line_bound_work.py --length 8192 --device cpu --dtype float32 --metadata DIR --out DIR
"""

from __future__ import annotations

import sys

from range_tile_work import counted_layers, write_summary  # this folder is on sys.path
from sparseprefill.config import PatternName, SparseConfig
from sparseprefill.kernels.common import default_kv_head_index
from sparseprefill.kernels.geometry import causal_pairs_total
from sparseprefill.patterns.cost import dense_break_even
from sparseprefill.patterns.vertical_slash import VerticalSlashPattern


def layer_work(q, k, scale) -> dict:
    q, k = q.float(), k.float()  # counts: the fp32 reference selection
    kvh = default_kv_head_index(q.shape[1], k.shape[1], q.device)
    lines = VerticalSlashPattern(SparseConfig().vertical_slash).estimate_lines(q, k, scale=scale, softcap=None,
                                                                               kv_head_index=kvh)
    causal = causal_pairs_total(lines.q_len, lines.k_len)
    index_density = lines.to_index(slashes_sorted=True).computed_pairs().double() / causal
    bound_density = lines.pairs_lower_bound(lines_sorted=True).double() / causal
    threshold = dense_break_even(PatternName.AUTO, q.shape[-1])
    by_index, by_bound = index_density >= threshold, bound_density >= threshold
    return dict(heads=index_density.numel(), dense_by_index=int(by_index.sum()), dense_by_lines=int(by_bound.sum()),
                index_density=[round(x, 4) for x in index_density.flatten().tolist()],
                bound_density=[round(x, 4) for x in bound_density.flatten().tolist()],
                bound_share_of_index=float((bound_density / index_density.clamp_min(1e-12)).mean()))


def main(argv=None) -> int:
    args, rows = counted_layers(__doc__, layer_work, lambda row: (
        f"dense by index {row['dense_by_index']} / by lines {row['dense_by_lines']} of {row['heads']} heads, "
        f"bound / index density {row['bound_share_of_index']:.3f}"), argv)
    summary = dict(length=args.length, layers=len(rows), heads=sum(r["heads"] for r in rows),
                   dense_by_index=sum(r["dense_by_index"] for r in rows),
                   dense_by_lines=sum(r["dense_by_lines"] for r in rows),
                   bound_share_of_index=sum(r["bound_share_of_index"] for r in rows) / len(rows))
    return write_summary(args, "line_bound_work", summary, rows)


if __name__ == "__main__":
    sys.exit(main())
