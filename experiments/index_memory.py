"""GPU memory of the default's estimate and index, against the layer's KV cache (issue 15's bound:
estimation + index memory at 128K <= 10% of a Llama-3.1-8B layer's KV cache, 512 MiB).

For each length, on the structured synthetic input (Llama-3.1-8B or Qwen2.5-0.5B head shapes, bf16), it
measures with ``torch.cuda.max_memory_allocated`` above what q, k, v already hold:

- ``line_scores``: the scoring windows' column and diagonal scores;
- ``lines``: the whole estimate (scores, the selection's sort and lists);
- ``lines_to_index``: estimate + the per-block ``VerticalSlashIndex`` (the default's path; ranges cut
  into pieces where the shipped layout cuts them);
- ``lines_to_index_head``: the same index with one column list per head (``column_layout="head"``);
- ``lines_to_index_head_whole``: the same with whole bands (no range pieces);
- ``lines_plan``: estimate + the fused kernel's per-head tables (``plan_lines``);

each as the peak during the step and what stays allocated after it (the index or the tables the
attention then reads). Rows: ``index_memory.csv``. On the GPU machine:

    python experiments/index_memory.py --out DIR
"""

from __future__ import annotations

import torch

from sparseprefill.bench.common import git_commit, gpu_name, write_csv
from sparseprefill.bench.kernels import structured_qkv
from sparseprefill.config import SparseConfig
from sparseprefill.kernels.vertical_slash.triton_lines import plan_lines
from sparseprefill.patterns.vertical_slash import VerticalSlashPattern
from vertical_slash_ceiling import SHAPES, structured_gpu_args  # this folder is on sys.path

FIELDS = ["shape", "length", "step", "peak_mib", "resident_mib", "kv_cache_mib", "peak_of_kv", "gpu", "commit"]
MIB = 2**20


def measured(step):
    """``(peak MiB, resident MiB)`` above what was allocated before ``step()``, and its result."""
    torch.cuda.synchronize()
    torch.cuda.empty_cache()
    before = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    result = step()
    torch.cuda.synchronize()
    return (torch.cuda.max_memory_allocated() - before) / MIB, (torch.cuda.memory_allocated() - before) / MIB, result


def main() -> None:
    args = structured_gpu_args(__doc__, "needs a CUDA device (it reads the CUDA allocator's statistics)")
    gpu, commit = gpu_name("cuda"), git_commit()
    rows = []
    for shape in args.shapes:
        heads, kv_heads, head_dim = SHAPES[shape]
        for length in args.lengths:
            q, k, _ = structured_qkv(heads, kv_heads, length, head_dim, torch.device("cuda"))
            kv_mib = 2 * k.numel() * k.element_size() / MIB
            kvh = torch.arange(heads, device="cuda") // (heads // kv_heads)
            pattern = VerticalSlashPattern(SparseConfig().vertical_slash)
            kw = dict(scale=head_dim**-0.5, softcap=None, kv_head_index=kvh)
            cut = pattern.range_piece_keys(q)
            steps = {
                "line_scores": lambda: pattern.line_scores(q, k, **kw),
                "lines": lambda: pattern.estimate_lines(q, k, **kw),
                "lines_to_index": lambda: pattern.estimate_lines(q, k, **kw).to_index(slashes_sorted=True,
                                                                                      max_range_keys=cut),
                "lines_to_index_head": lambda: pattern.estimate_lines(q, k, **kw).to_index(
                    slashes_sorted=True, max_range_keys=cut, column_layout="head"),
                "lines_to_index_head_whole": lambda: pattern.estimate_lines(q, k, **kw).to_index(
                    slashes_sorted=True, column_layout="head"),
                "lines_plan": lambda: plan_lines(pattern.estimate_lines(q, k, **kw), lines_sorted=True),
            }
            for step, fn in steps.items():
                fn()  # compile and warm the allocator first
                peak, resident, result = measured(fn)
                del result
                rows.append(dict(shape=shape, length=length, step=step, peak_mib=round(peak, 1),
                                 resident_mib=round(resident, 1), kv_cache_mib=round(kv_mib, 1),
                                 peak_of_kv=round(peak / kv_mib, 4), gpu=gpu, commit=commit))
                print(f"{shape} {length} {step:<15} peak {peak:9.1f} MiB, resident {resident:9.1f} MiB "
                      f"({peak / kv_mib:.3f} of the layer's KV cache, {kv_mib:.0f} MiB)", flush=True)
            q = k = steps = None  # free the inputs before the next length
            write_csv(args.out / "index_memory.csv", FIELDS, rows)  # rewritten per length: kept if cut short


if __name__ == "__main__":
    main()
