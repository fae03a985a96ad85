"""What the default's distant diagonal bands cost and hold on real q/k: would exact diagonals pay?

A kept diagonal ``d`` is a band in the per-block index: each 64-row query block lists the keys ``[p0 - d,
p1 - d]`` for all its rows, ``64 x 64`` pairs where the diagonal itself holds 64. The local band (the run
of diagonals from 0, which the default always keeps) is dense attention near the diagonal anyway; the
*distant* runs (every other run of kept diagonals at the block width) are where banding multiplies the
pairs. Per captured layer of Qwen2.5-Coder-0.5B on natural text, for the default's own lines, this
counts three selections over every query row (density: causal pairs listed / causal pairs; recall: the
exact attention mass the listed keys hold, mean over rows and heads):

- ``banded``: the default's index (``SparseConfig()``'s lines, whole bands);
- ``no_distant``: the same lines without the distant diagonals (their columns come back where the
  bands had covered them);
- ``exact_distant``: ``no_distant`` plus exactly the pairs on the distant kept diagonals (``(i, i - d)``,
  those not listed already): what a kernel computing diagonals row by row would attend.

and the distant runs' shape (diagonals per run, band offsets per kept diagonal). Counts and masses on
the CPU, not times: a diagonal computed exactly is a row-wise dot product (CUDA cores), where its band
is a tile on the tensor cores.

    python experiments/exact_slash_work.py --length 8192 --device cpu --dtype float32 --metadata DIR --out DIR
"""

from __future__ import annotations

import sys

import torch

from range_tile_work import counted_layers, write_summary  # this folder is on sys.path
from sparseprefill.bench.peers import index_block_keys
from sparseprefill.config import SparseConfig
from sparseprefill.kernels.common import compact, default_kv_head_index
from sparseprefill.kernels.geometry import causal_pairs_total
from sparseprefill.kernels.recall import exact_probs
from sparseprefill.kernels.vertical_slash import vertical_slash_lines
from sparseprefill.kernels.vertical_slash.head_ranges import head_run_bounds
from sparseprefill.patterns.vertical_slash import VerticalSlashPattern

ROW_CHUNK = 512  # query rows per exact-probability pass: [B, H, 512, Lk] fp32 at a time


def distant_diagonals(lines, width: int) -> torch.Tensor:
    """``[B, H, Ns]`` bool: the kept diagonals outside the run that starts at diagonal 0 (the local band)."""
    lo, hi, runs = head_run_bounds(lines.slash_offset, lines.slash_count, width)
    local_end = torch.where((runs > 0) & (lo[..., 0] == 0), hi[..., 0], -1)  # the local run's last diagonal
    real = torch.arange(lines.slash_offset.shape[-1]) < lines.slash_count[..., None]
    return real & (lines.slash_offset > local_end[..., None])


def layer_work(q, k, scale) -> dict:
    kvh = default_kv_head_index(q.shape[1], k.shape[1], q.device)
    pattern = VerticalSlashPattern(SparseConfig().vertical_slash)
    lines = pattern.estimate_lines(q, k, scale=scale, softcap=None, kv_head_index=kvh)
    length, block = q.shape[2], lines.block_size_q
    distant = distant_diagonals(lines, block)
    near_count, near = compact((torch.arange(lines.slash_offset.shape[-1]) < lines.slash_count[..., None]) & ~distant)
    near_offsets = torch.where(near >= 0, torch.gather(lines.slash_offset, -1, near.clamp_min(0).long()), 0)
    banded = lines.to_index(slashes_sorted=True)
    no_distant = vertical_slash_lines(lines.vertical_index, lines.vertical_count, near_offsets, near_count,
                                      q_len=length, k_len=length, block_size_q=block).to_index(slashes_sorted=True)
    causal = causal_pairs_total(length, length) * q.shape[1]
    d_count, d_slot = compact(distant)
    d_offsets = torch.where(d_slot >= 0, torch.gather(lines.slash_offset, -1, d_slot.clamp_min(0).long()), -1)
    mass = {"banded": 0.0, "no_distant": 0.0, "exact_distant": 0.0}
    extra_pairs = 0
    for r0 in range(0, length, ROW_CHUNK):
        r1 = min(r0 + ROW_CHUNK, length)
        probs = exact_probs(q, k, r0, r1, scale=scale, softcap=None, kv_head_index=kvh)  # [B, H, n, Lk]
        total = probs.sum(-1)
        rows = torch.arange(r0, r1)
        blocks = torch.arange(r0 // block, (r1 - 1) // block + 1)
        for name, index in (("banded", banded), ("no_distant", no_distant)):
            keys = index_block_keys(index, blocks)  # [B, H, nb, Lk]
            listed = keys[:, :, rows // block - blocks[0]] & (torch.arange(length) <= rows[:, None])
            kept = torch.where(listed, probs, 0.0).sum(-1)
            mass[name] += float((kept / total).sum())
            if name == "no_distant":
                # Exactly the distant diagonals' pairs (i, i - d) not listed already.
                key = rows[:, None] - d_offsets[:, :, None, :]  # [B, H, n, Nd]
                ok = (d_offsets[:, :, None, :] >= 0) & (key >= 0)
                key = key.clamp(0, length - 1)
                already = torch.gather(listed, -1, key)
                new = ok & ~already
                extra = torch.where(new, torch.gather(probs, -1, key), 0.0).sum(-1)
                mass["exact_distant"] += float(((kept + extra) / total).sum())
                extra_pairs += int(new.sum())
    row_heads = length * q.shape[1] * q.shape[0]
    run_lo, run_hi, runs = head_run_bounds(lines.slash_offset, lines.slash_count, block)
    run_ok = torch.arange(run_lo.shape[-1]) < runs[..., None]
    distant_runs = run_ok & ~((run_lo == 0) & (torch.arange(run_lo.shape[-1]) == 0))
    return dict(
        density_banded=float(banded.computed_pairs().sum()) / causal,
        density_no_distant=float(no_distant.computed_pairs().sum()) / causal,
        density_exact_distant=(float(no_distant.computed_pairs().sum()) + extra_pairs) / causal,
        recall_banded=mass["banded"] / row_heads, recall_no_distant=mass["no_distant"] / row_heads,
        recall_exact_distant=mass["exact_distant"] / row_heads,
        distant_diagonals=int(d_count.sum()), distant_runs=int(distant_runs.sum()),
        diagonals_per_distant_run=float(d_count.sum()) / max(int(distant_runs.sum()), 1),
        kept_diagonals=int(lines.slash_count.sum()), kept_columns=int(lines.vertical_count.sum()),
    )


def main(argv=None) -> int:
    args, rows = counted_layers(__doc__, layer_work, lambda row: ", ".join(
        f"{key} {value:.4g}" if isinstance(value, float) else f"{key} {value}" for key, value in row.items()), argv)
    summary = dict(length=args.length, layers=len(rows),
                   **{f"{key}_mean": sum(r[key] for r in rows) / len(rows) for key in rows[0]
                      if key.startswith(("density", "recall"))})
    return write_summary(args, "exact_slash_work", summary, rows)


if __name__ == "__main__":
    sys.exit(main())
