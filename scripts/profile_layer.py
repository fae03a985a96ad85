"""Where one layer's sparse attention spends its time: torch.profiler tables on the GPU.

For each length, one layer of Llama-3.1-8B attention shapes (32 query heads, 8 KV heads, head_dim 128,
bf16, the kernel benchmark's structured input) with the end-to-end benchmark's fixed vertical-slash
budget (``bench.e2e.fixed_budget_config``, density ``--density``): the estimate, the attention, the
whole ``run`` (estimate, attention and the pair count for the stats) and cuDNN SDPA, each with its wall
time per call (host included), its ``triton.testing.do_bench`` median and the profiler's table of
GPU kernels and host ops. Then, unless ``--no-decode``, the decode-step selection at batch 1 (page
scoring and top-k over a 16-token-page mean/std summary, 2,048-token budget).

    python scripts/profile_layer.py --lengths 32768 131072 > profile.txt     # GPU machine
"""

from __future__ import annotations

import argparse
import time

import torch
import triton
from torch.profiler import ProfilerActivity, profile

from sparseprefill.bench.e2e import fixed_budget_config
from sparseprefill.bench.kernels import structured_qkv
from sparseprefill.kernels.decode import page_scores, select_pages, top_k_pages
from sparseprefill.kernels.decode import page_summary
from sparseprefill.patterns.vertical_slash import VerticalSlashPattern

HEADS, KV_HEADS, HEAD_DIM = 32, 8, 128
DECODE_PAGE, DECODE_BUDGET = 16, 2048
TIMED_CALLS = 20  # wall-clock calls per op (host launch cost included)
PROFILED_CALLS = 5


def report(name: str, fn, rows: int) -> None:
    fn()
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(TIMED_CALLS):
        fn()
    torch.cuda.synchronize()
    wall = (time.perf_counter() - start) / TIMED_CALLS * 1e3
    median = triton.testing.do_bench(fn)
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        for _ in range(PROFILED_CALLS):
            fn()
        torch.cuda.synchronize()
    print(f"\n===== {name}: wall/call {wall:.3f} ms, do_bench {median:.3f} ms "
          f"(table: totals over {PROFILED_CALLS} calls)", flush=True)
    print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=rows, max_name_column_width=60), flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--lengths", type=int, nargs="+", default=[32768, 131072])
    parser.add_argument("--density", type=float, default=0.1)
    parser.add_argument("--rows", type=int, default=18, help="profiler table rows")
    parser.add_argument("--no-decode", action="store_true", help="skip the decode selection part")
    args = parser.parse_args()
    device = torch.device("cuda")
    kv_head_index = torch.arange(HEADS, device=device) // (HEADS // KV_HEADS)
    scale = HEAD_DIM**-0.5
    for length in args.lengths:
        config, predicted, _ = fixed_budget_config("vertical_slash", length, args.density, min_sparse_len=0,
                                                   device=device)
        vs = config.vertical_slash
        print(f"L={length} max_vertical={vs.max_vertical} max_slash={vs.max_slash} predicted density {predicted:.3f}")
        q, k, v = structured_qkv(HEADS, KV_HEADS, length, HEAD_DIM, device)
        pattern = VerticalSlashPattern(vs)
        common = dict(scale=scale, softcap=None, kv_head_index=kv_head_index)
        index = pattern.estimate(q, k, **common)
        out = torch.empty_like(q)
        report(f"estimate L={length}", lambda: pattern.estimate(q, k, **common), args.rows)
        report(f"attend L={length}", lambda: pattern.attend(q, k, v, index, out=out, **common), args.rows)
        report(f"run L={length}", lambda: pattern.run(q, k, v, out=out, **common), args.rows)
        report(f"sdpa L={length}", lambda: torch.nn.functional.scaled_dot_product_attention(
            q, k, v, is_causal=True, enable_gqa=True), args.rows)
        del q, k, v, out, index
        torch.cuda.empty_cache()
    if args.no_decode:
        return
    for length in args.lengths:
        k = torch.randn(1, KV_HEADS, length, HEAD_DIM, device=device, dtype=torch.bfloat16)
        q = torch.randn(1, HEADS, 1, HEAD_DIM, device=device, dtype=torch.bfloat16)
        summary = page_summary(k, page_size=DECODE_PAGE, stats=("mean_std",))
        scores = page_scores(q, summary, scale=scale)
        report(f"top_k_pages L={length}", lambda: top_k_pages(q, summary, scale=scale, budget_tokens=DECODE_BUDGET),
               args.rows)
        report(f"page_scores L={length}", lambda: page_scores(q, summary, scale=scale), args.rows)
        report(f"select_pages L={length}", lambda: select_pages(scores, num_tokens=length, page_size=DECODE_PAGE,
                                                                budget_tokens=DECODE_BUDGET), args.rows)


if __name__ == "__main__":
    main()
