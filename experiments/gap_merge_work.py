"""Would merging neighbouring ranges across small gaps cut the vertical-slash kernel's tile count?

The index kernel is issue-bound on per-tile work (stop 35's counters): a 32-key tile costs about the
same whatever share of its keys is real, and each merged range starts a fresh tile, so a range of n keys
costs ceil(n / 32) tiles. Two ranges of one query block separated by a gap of g keys, walked as one
range over the gap, cost ceil((n1 + g + n2) / 32) tiles instead of ceil(n1 / 32) + ceil(n2 / 32), and
columns inside the gap leave the gathered-column loop. The gap's keys are computed too (never fewer
keys than the estimate kept, so accuracy can only rise); what matters is whether tiles fall.

Per captured layer of Qwen2.5-Coder-0.5B on natural text, for the default's own index (whole merged
bands, 64-row blocks), this counts, per merge rule, the range tiles, the column tiles (32 columns per
gathered tile) and the listed keys (the pairs the kernel would compute, as key slots per block):

- ``gap_G``: merge neighbours whose gap is at most G keys;
- ``tiles``: merge a neighbour pair only when the merged range needs no more tiles than the two apart
  (pairwise, applied along the block's ranges).

Counts, not times; the kernel's time per tile is what the GPU measures.

    python experiments/gap_merge_work.py --length 8192 --device cpu --dtype float32 --metadata DIR --out DIR
"""

from __future__ import annotations

import sys

import torch

from range_tile_work import counted_layers, write_summary  # this folder is on sys.path
from sparseprefill.config import SparseConfig
from sparseprefill.kernels.common import default_kv_head_index
from sparseprefill.kernels.vertical_slash.triton_attention import VERTICAL_SLASH_KEY_TILE
from sparseprefill.patterns.vertical_slash import VerticalSlashPattern

TILE = VERTICAL_SLASH_KEY_TILE
GAPS = (0, 8, 16, 32, 64, 128)
FAR = 2**40


def ceil_div(a: torch.Tensor, b: int) -> torch.Tensor:
    return (a + b - 1) // b


def merged_counts(start, end, valid, columns, column_ok, merge_next) -> dict[str, int]:
    """``start, end, valid [N, R]`` ranges sorted by start per row (a query block of a head),
    ``columns, column_ok [N, V]``, ``merge_next [N, R]``: range i merges with range i + 1 ->
    tiles and keys after merging."""
    opens = valid & ~torch.cat([torch.zeros_like(merge_next[:, :1]), merge_next[:, :-1]], 1)
    group = torch.cumsum(opens.long(), 1) - 1
    group = torch.where(valid, group, start.shape[1] - 1).clamp_min(0)
    m_start = torch.full_like(start, FAR).scatter_reduce(1, group, torch.where(valid, start, FAR), reduce="amin")
    m_end = torch.full_like(end, -1).scatter_reduce(1, group, torch.where(valid, end, -1), reduce="amax")
    m_ok = torch.arange(start.shape[1])[None] < opens.sum(1, keepdim=True)
    lengths = torch.where(m_ok, m_end - m_start, 0)
    searchable = torch.where(m_ok, m_start, FAR).contiguous()
    which = (torch.searchsorted(searchable, columns.contiguous(), right=True) - 1).clamp_min(0)
    inside = (torch.gather(m_start, 1, which) <= columns) & (columns < torch.gather(m_end, 1, which))
    inside &= torch.gather(m_ok, 1, which)
    kept_columns = (column_ok & ~inside).sum(1)
    return dict(range_tiles=int(ceil_div(lengths, TILE).sum()), column_tiles=int(ceil_div(kept_columns, TILE).sum()),
                range_keys=int(lengths.sum()), column_keys=int(kept_columns.sum()), ranges=int(m_ok.sum()))


def layer_work(q, k, scale) -> dict:
    q, k = q.float(), k.float()  # counts: the fp32 reference selection
    kvh = default_kv_head_index(q.shape[1], k.shape[1], q.device)
    pattern = VerticalSlashPattern(SparseConfig().vertical_slash)
    index = pattern.estimate_lines(q, k, scale=scale, softcap=None, kv_head_index=kvh).to_index(
        slashes_sorted=True, column_layout="block")
    valid = index.range_valid().reshape(-1, index.range_start.shape[-1])
    start = torch.where(valid, index.range_start.reshape(valid.shape).long(), FAR)
    start, order = start.sort(1)
    end = torch.gather(index.range_end.reshape(valid.shape).long(), 1, order)
    valid = torch.gather(valid, 1, order)
    columns = index.column_index.reshape(valid.shape[0], -1).long()
    column_ok = torch.arange(columns.shape[1])[None] < index.column_count.reshape(-1, 1)
    columns = torch.where(column_ok, columns, -1)
    next_valid = torch.cat([valid[:, 1:], torch.zeros_like(valid[:, :1])], 1) & valid
    next_start = torch.cat([start[:, 1:], torch.full_like(start[:, :1], FAR)], 1)
    next_end = torch.cat([end[:, 1:], torch.full_like(end[:, :1], FAR)], 1)
    gap = next_start - end
    row = {}
    rules = {f"gap_{g}": next_valid & (gap <= g) for g in GAPS}
    apart = ceil_div(end - start, TILE) + ceil_div(next_end - next_start, TILE)
    rules["tiles"] = next_valid & (ceil_div(next_end - start, TILE) <= apart)
    for name, merge_next in rules.items():
        for key, value in merged_counts(start, end, valid, columns, column_ok, merge_next).items():
            row[f"{name}_{key}"] = value
    return row


def main(argv=None) -> int:
    names = [f"gap_{g}" for g in GAPS] + ["tiles"]

    def describe(row):
        base = row["gap_0_range_tiles"] + row["gap_0_column_tiles"]
        return f"tiles at gap 0 {base}; " + ", ".join(
            f"{name} {(row[f'{name}_range_tiles'] + row[f'{name}_column_tiles']) / base:.3f}" for name in names[1:])

    args, rows = counted_layers(__doc__, layer_work, describe, argv)
    total = {key: sum(r[key] for r in rows) for key in rows[0] if key != "layer"}
    base_tiles = total["gap_0_range_tiles"] + total["gap_0_column_tiles"]
    base_keys = total["gap_0_range_keys"] + total["gap_0_column_keys"]
    summary = {name: dict(tiles_vs_gap0=(total[f"{name}_range_tiles"] + total[f"{name}_column_tiles"]) / base_tiles,
                          keys_vs_gap0=(total[f"{name}_range_keys"] + total[f"{name}_column_keys"]) / base_keys,
                          column_tiles_share=total[f"{name}_column_tiles"]
                          / (total[f"{name}_range_tiles"] + total[f"{name}_column_tiles"]),
                          ranges=total[f"{name}_ranges"]) for name in names}
    summary = dict(length=args.length, layers=len(rows), tile=TILE, rules=summary)
    return write_summary(args, "gap_merge_work", summary, rows)


if __name__ == "__main__":
    sys.exit(main())
