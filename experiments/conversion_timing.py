"""The vertical-slash index conversion on the GPU, by builder variant, on the default's own lines.

Structured input (``bench.kernels.structured_qkv``; Llama-3.1-8B and Qwen2.5-0.5B attention shapes, bf16):
the default's lines (``VerticalSlashPattern.estimate_lines``), then ``build_vertical_slash_index_triton``
with full-width blocks' ranges from their visible diagonals (``head_runs=False``, the shipped builder) or
from their head's runs (``head_runs=True``), whole bands, per-block columns: do_bench medians (the
builder's one host read included) and whether both list the same ranges and columns. Rows to
``conversion.csv``.

    python experiments/conversion_timing.py --out DIR
"""

from __future__ import annotations

import torch
import triton

from sparseprefill.bench.common import git_commit, gpu_name, write_csv
from sparseprefill.bench.kernels import structured_qkv
from sparseprefill.config import SparseConfig
from sparseprefill.kernels.vertical_slash.triton_index import build_vertical_slash_index_triton
from sparseprefill.patterns.vertical_slash import VerticalSlashPattern
from vertical_slash_ceiling import SHAPES, structured_gpu_args  # this folder is on sys.path


def same_index(a, b) -> bool:
    if not (torch.equal(a.range_count, b.range_count) and torch.equal(a.column_count, b.column_count)):
        return False
    for field, counts in (("range_start", a.range_count), ("range_end", a.range_count),
                          ("column_index", a.column_count)):
        width = int(counts.max())
        valid = torch.arange(width, device=counts.device) < counts[..., None]
        if not torch.equal(getattr(a, field)[..., :width][valid], getattr(b, field)[..., :width][valid]):
            return False
    return True


def main() -> None:
    args = structured_gpu_args(__doc__)
    rows = []
    for shape in args.shapes:
        heads, kv_heads, head_dim = SHAPES[shape]
        for length in args.lengths:
            q, k, _ = structured_qkv(heads, kv_heads, length, head_dim, torch.device("cuda"))
            kvh = torch.arange(heads, device="cuda") // (heads // kv_heads)
            lines = VerticalSlashPattern(SparseConfig().vertical_slash).estimate_lines(
                q, k, scale=head_dim**-0.5, softcap=None, kv_head_index=kvh)
            built, times = {}, {}
            for head_runs in (False, True):
                build = lambda head_runs=head_runs: build_vertical_slash_index_triton(  # noqa: E731
                    lines.vertical_index, lines.vertical_count, lines.slash_offset, lines.slash_count,
                    q_len=lines.q_len, k_len=lines.k_len, block_size_q=lines.block_size_q, slashes_sorted=True,
                    head_runs=head_runs)
                built[head_runs] = build()
                times[head_runs] = triton.testing.do_bench(build)
            same = same_index(built[False], built[True])
            for head_runs, ms in times.items():
                rows.append(dict(shape=shape, length=length, builder="head_runs" if head_runs else "visible_diagonals",
                                 ms=ms, speedup=times[False] / ms, same_index=same, gpu=gpu_name("cuda"),
                                 commit=git_commit()))
                print(rows[-1], flush=True)
            built = None
            torch.cuda.empty_cache()
    write_csv(args.out / "conversion.csv", list(rows[0]), rows)


if __name__ == "__main__":
    main()
