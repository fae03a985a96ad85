"""The vertical-slash line selection by sort or by threshold search, timed and sized on the GPU.

``select_line_kinds_triton(method="sort" | "search")`` on the estimate's call shape (columns and
diagonals at once, ``[2, 1, H, L]`` fp32 scores, H the query heads of Llama-3.1-8B or Qwen2.5-0.5B,
sink and local prefixes forced, the default's masses 0.95 / 0.95): do_bench median, peak CUDA memory
above the scores, and the largest difference in kept counts between the two (real scores: a line within
fp32 rounding of the target may differ).
Rows to ``line_select.csv``.

    python experiments/line_select_timing.py --out DIR
"""

from __future__ import annotations

import torch
import triton

from sparseprefill.bench.common import git_commit, gpu_name, write_csv
from sparseprefill.config import SparseConfig
from sparseprefill.kernels.mass_select import KEEP_ALL_MASS
from sparseprefill.kernels.vertical_slash.triton_select import select_line_kinds_triton
from vertical_slash_ceiling import SHAPES, structured_gpu_args  # this folder is on sys.path

MIB = 2**20


def main() -> None:
    args = structured_gpu_args(__doc__)
    cfg = SparseConfig().vertical_slash
    rows = []
    for shape in args.shapes:
        heads = SHAPES[shape][0]
        for length in args.lengths:
            g = torch.Generator(device="cuda").manual_seed(length + heads)
            # Heavy-tailed like real line scores: a few lines hold most of the mass.
            scores = torch.rand(2, 1, heads, length, device="cuda", generator=g) ** 12
            lines = torch.arange(length, device="cuda")
            forced = torch.stack([lines < cfg.sink_tokens, lines < cfg.local_tokens])[:, None, None]
            call = dict(masses=[cfg.vertical_mass, cfg.slash_mass], max_counts=[cfg.max_vertical, cfg.max_slash],
                        keep_all_mass=KEEP_ALL_MASS)
            results = {}
            for method in ("sort", "search"):
                run = lambda method=method: select_line_kinds_triton(scores, forced, method=method, **call)  # noqa: E731
                run()
                torch.cuda.synchronize()
                torch.cuda.empty_cache()
                before = torch.cuda.memory_allocated()
                torch.cuda.reset_peak_memory_stats()
                results[method] = run()
                torch.cuda.synchronize()
                peak = (torch.cuda.max_memory_allocated() - before) / MIB
                ms = triton.testing.do_bench(run)
                rows.append(dict(shape=shape, length=length, method=method, ms=ms, peak_mib=peak,
                                 kept_mean=float(results[method][0].float().mean()), gpu=gpu_name("cuda"),
                                 commit=git_commit()))
            diff = int((results["sort"][0] - results["search"][0]).abs().max())
            same = bool(torch.equal(results["sort"][1], results["search"][1]))
            for row in rows[-2:]:
                row.update(max_count_diff=diff, same_lists=same)
                print(row, flush=True)
    write_csv(args.out / "line_select.csv", list(rows[0]), rows)


if __name__ == "__main__":
    main()
