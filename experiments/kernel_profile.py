"""Where the default's sparse kernels spend their time, by hardware counters (Nsight Compute), beside
cuDNN's dense kernel on the same q/k/v.

Issue 15 asks, where a kernel misses its rate target, for the floor and for what the profile shows.
Every earlier kernel study here timed variants (do_bench medians); none read a counter. This script
is the target program of ``ncu``: on the structured input (``bench.kernels.structured_qkv``, Llama-3.1-8B
or Qwen2.5-0.5B attention shapes, bf16) it builds the default's vertical-slash lines, its per-block
index (whole bands and range pieces) and the antidiagonal estimate's block index, compiles and warms
every kernel, then launches each exactly once between ``cudaProfilerStart`` and ``cudaProfilerStop``, so
``ncu --profile-from-start off`` profiles those launches and nothing else, in this order:

    cudnn (SDPA, causal, GQA), index_whole, index_pieces, index_whole_tma, index_pieces_tma (the same with
    range tiles through tensor descriptors, ``range_tma``), index_whole_head, index_pieces_head (the same
    keys with one column list per head, masked per block: ``column_layout="head"``), index_whole_head_tma,
    fused_lines,
    block_sparse (antidiagonal index), block_sparse_tma (its K/V tiles through tensor descriptors, ``block_tma``)

(with ``--rescale-slacks 0 8`` each sparse launch twice in a row, at each slack; ``launch_order`` in the
JSON names them).

It also writes, for each Triton kernel, what the compiler made of it (``triton_kernels.json``: registers
and spills per thread, shared memory, warps, stages, and whether its PTX issues Hopper's asynchronous
warpgroup MMA, ``wgmma``, or the synchronous ``mma.sync``), and the do_bench time of each launch.
``--time-slacks 0 8`` instead times every sparse launch at those lazy-rescale slacks of the online
softmax (``triton_common.online_softmax_step``) at ``--lengths``, for ``--shapes``.

On the GPU machine (``--clock-control none``: METHOD.md leaves the clocks alone; the fused path's plan
launches torch kernels of its own, which the name filter skips; ``--set full`` takes ~10 s per profiled
launch):

    ncu --clock-control none --profile-from-start off --kernel-name regex:"_fwd_kernel|sdpa" --set full \\
        --csv --page raw python experiments/kernel_profile.py --shape qwen --length 32768 --out DIR > DIR/ncu_raw.csv
    python experiments/kernel_profile.py --summarize DIR/ncu_raw.csv --out DIR

``--summarize`` keeps the counters that place a kernel against its ceilings (time, SM and tensor-pipe
utilisation, issue activity, achieved occupancy and what limits it, memory throughput, L2 hit rate, the
warp stall reasons) as ``profile_summary.csv`` and prints them side by side.
"""

from __future__ import annotations

import argparse
import csv
import json
import re
import sys
from pathlib import Path

import torch

# Run order inside the profiled window; the raw CSV lists kernels in launch order.
LAUNCHES = ("cudnn", "index_whole", "index_pieces", "index_whole_tma", "index_pieces_tma", "index_whole_head",
            "index_pieces_head", "index_whole_head_tma", "fused_lines", "block_sparse", "block_sparse_tma")

# Raw-page counters kept by --summarize (Nsight Compute metric names), with a short label.
COUNTERS = {
    "gpu__time_duration.sum": "time",
    "smsp__inst_executed.sum": "instructions",
    "sm__throughput.avg.pct_of_peak_sustained_elapsed": "sm_throughput_pct",
    "smsp__issue_active.avg.pct_of_peak_sustained_active": "issue_active_pct",
    "sm__warps_active.avg.pct_of_peak_sustained_active": "achieved_occupancy_pct",
    "sm__maximum_warps_per_active_cycle_pct": "theoretical_occupancy_pct",
    "launch__registers_per_thread": "registers",
    "launch__shared_mem_per_block_dynamic": "smem_dynamic",
    "launch__shared_mem_per_block_static": "smem_static",
    "launch__occupancy_limit_registers": "blocks_per_sm_by_registers",
    "launch__occupancy_limit_shared_mem": "blocks_per_sm_by_smem",
    "launch__occupancy_limit_warps": "blocks_per_sm_by_warps",
    "launch__grid_size": "grid",
    "launch__block_size": "threads_per_block",
    "launch__waves_per_multiprocessor": "waves",
    "dram__throughput.avg.pct_of_peak_sustained_elapsed": "dram_pct",
    "lts__t_sector_hit_rate.pct": "l2_hit_pct",
    "l1tex__t_sector_hit_rate.pct": "l1_hit_pct",
}
# Tensor-pipe utilisation: Hopper reports wgmma (gmma) and mma.sync (hmma) on separate pipes.
TENSOR_PIPE = re.compile(r"^sm__pipe_tensor_(op_gmma|op_hmma|)_?cycles_active\.avg\.pct_of_peak_sustained_(active|elapsed)$")
STALL = re.compile(r"^smsp__average_warps_issue_stalled_(\w+)_per_issue_active\.ratio$")
TOP_STALLS = 6


def build_cases(shape: str, length: int):
    """``(launches, densities, conversions)``: per entry of ``LAUNCHES`` a launch taking an optional
    lazy-rescale slack (ignored by cuDNN), the share of causal pairs its index computes, and the index
    conversion of the default's lines per column layout."""
    from vertical_slash_ceiling import SHAPES  # this folder is on sys.path

    from sparseprefill.bench.kernels import structured_qkv
    from sparseprefill.config import SparseConfig
    from sparseprefill.kernels.block_sparse.triton_attention import block_sparse_attention_triton
    from sparseprefill.kernels.vertical_slash import range_piece_keys
    from sparseprefill.kernels.vertical_slash.triton_attention import vertical_slash_attention_triton
    from sparseprefill.kernels.vertical_slash.triton_index import build_vertical_slash_index_triton
    from sparseprefill.kernels.vertical_slash.triton_lines import vertical_slash_lines_attention_triton
    from sparseprefill.patterns import build_pattern

    heads, kv_heads, head_dim = SHAPES[shape]
    q, k, v = structured_qkv(heads, kv_heads, length, head_dim, torch.device("cuda"))
    scale = head_dim**-0.5
    kv_head_index = (torch.arange(heads, device="cuda") // (heads // kv_heads)).long()
    config = SparseConfig()
    est = dict(scale=scale, softcap=None, kv_head_index=kv_head_index)
    vs = build_pattern("vertical_slash", config)
    lines = vs.estimate_lines(q, k, **est)
    piece_keys = range_piece_keys(head_dim, config.vertical_slash.block_size, q.element_size())
    whole, pieces = (lines.to_index(slashes_sorted=True, max_range_keys=cut) for cut in (None, piece_keys))
    whole_head, pieces_head = (lines.to_index(slashes_sorted=True, max_range_keys=cut, column_layout="head")
                               for cut in (None, piece_keys))
    blocks = build_pattern("antidiagonal", config).estimate(q, k, **est)
    kw = dict(scale=scale, window=None, softcap=None, kv_head_index=kv_head_index)
    outs = {name: torch.empty_like(q) for name in LAUNCHES}

    def cudnn(slack=None):
        with torch.nn.attention.sdpa_kernel(torch.nn.attention.SDPBackend.CUDNN_ATTENTION):
            return torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True,
                                                                    scale=scale)

    # The index kernel's launches: (index, range tiles through tensor descriptors). Whole bands and range
    # pieces, per-block and per-head column lists (the same keys, O(lines) index memory).
    index_launches = {"index_whole": (whole, False), "index_pieces": (pieces, False),
                      "index_whole_tma": (whole, True), "index_pieces_tma": (pieces, True),
                      "index_whole_head": (whole_head, False), "index_pieces_head": (pieces_head, False),
                      "index_whole_head_tma": (whole_head, True)}

    def index_launch(name, index, tma):
        return lambda slack=None: vertical_slash_attention_triton(q, k, v, index, out=outs[name], rescale_slack=slack,
                                                                  range_tma=tma, **kw)

    def block_launch(name, tma):
        return lambda slack=None: block_sparse_attention_triton(q, k, v, blocks, out=outs[name], rescale_slack=slack,
                                                                block_tma=tma, **kw)

    launches = {"cudnn": cudnn,
                **{name: index_launch(name, index, tma) for name, (index, tma) in index_launches.items()},
                "fused_lines": lambda slack=None: vertical_slash_lines_attention_triton(
                    q, k, v, lines, out=outs["fused_lines"], lines_sorted=True, rescale_slack=slack, **kw),
                "block_sparse": block_launch("block_sparse", False),
                "block_sparse_tma": block_launch("block_sparse_tma", True)}
    causal = length * (length + 1) // 2 * heads
    share = lambda index: float(index.computed_pairs().sum()) / causal  # noqa: E731
    densities = {"cudnn": 1.0, **{name: share(index) for name, (index, _) in index_launches.items()},
                 "fused_lines": share(whole), "block_sparse": share(blocks), "block_sparse_tma": share(blocks)}
    # The index conversion itself (the plan's host read included), per column layout, whole bands; and the
    # per-block layout with full-width blocks' ranges built from their head's runs (``head_runs``).
    conversions = {f"convert_{layout}": (lambda layout=layout: lines.to_index(slashes_sorted=True,
                                                                              column_layout=layout))
                   for layout in ("block", "head")}
    conversions["convert_block_runs"] = lambda: build_vertical_slash_index_triton(
        lines.vertical_index, lines.vertical_count, lines.slash_offset, lines.slash_count, q_len=lines.q_len,
        k_len=lines.k_len, block_size_q=lines.block_size_q, slashes_sorted=True, head_runs=True)
    runs_index = conversions["convert_block_runs"]()
    if not runs_index.lists_same_entries(whole):
        raise AssertionError("the head-runs conversion lists other keys than the default's")
    return launches, densities, conversions


def compiled_kernels() -> list[dict]:
    """What Triton compiled for the package's attention kernels in this process (one entry per
    specialisation): registers, spills, shared memory, warps, stages, and the MMA instructions used."""
    from sparseprefill.kernels.block_sparse import triton_attention as block_module
    from sparseprefill.kernels.vertical_slash import triton_attention as vs_module
    from sparseprefill.kernels.vertical_slash import triton_lines as lines_module

    found = []
    for name, fn in (("_vertical_slash_fwd_kernel", vs_module._vertical_slash_fwd_kernel),
                     ("_lines_fwd_kernel", lines_module._lines_fwd_kernel),
                     ("_block_sparse_fwd_kernel", block_module._block_sparse_fwd_kernel)):
        for cache in getattr(fn, "device_caches", {}).values():
            kernels = cache[0] if isinstance(cache, tuple) else cache
            for compiled in getattr(kernels, "values", lambda: [])():
                meta = getattr(compiled, "metadata", None)
                ptx = (getattr(compiled, "asm", {}) or {}).get("ptx", "")
                found.append(dict(kernel=name, registers=getattr(compiled, "n_regs", None),
                                  spills=getattr(compiled, "n_spills", None),
                                  shared_bytes=getattr(meta, "shared", None), num_warps=getattr(meta, "num_warps", None),
                                  num_stages=getattr(meta, "num_stages", None),
                                  wgmma=ptx.count("wgmma.mma_async"), mma_sync=ptx.count("mma.sync"),
                                  cp_async=ptx.count("cp.async"), tma=ptx.count("cp.async.bulk.tensor")))
    return found


def time_slacks(args) -> None:
    """do_bench of every sparse launch at each ``--time-slacks`` value (the online softmax's lazy-rescale
    slack), outputs checked against the slack-0 output; rows to ``rescale_slack.csv``."""
    import triton

    from sparseprefill.bench.common import git_commit, gpu_name, write_csv

    args.out.mkdir(parents=True, exist_ok=True)
    rows = []
    for shape in args.shapes:
        for length in args.lengths:
            launches, densities, conversions = build_cases(shape, length)
            launches["cudnn"]()
            cudnn_ms = triton.testing.do_bench(launches["cudnn"])
            for name, convert in conversions.items():
                convert()
                ms = triton.testing.do_bench(convert)
                rows.append(dict(shape=shape, length=length, kernel=name, rescale_slack=None, ms=ms, density=None,
                                 of_cudnn=None, vs_first=None, max_diff_vs_first=None, cudnn_ms=cudnn_ms,
                                 gpu=gpu_name("cuda"), commit=git_commit()))
                print(f"{shape} {length} {name:<13}: {ms:8.3f} ms", flush=True)
            for name in [n for n in LAUNCHES[1:] if n in args.launches]:
                first = None
                for slack in args.time_slacks:
                    out = launches[name](slack)
                    ms = triton.testing.do_bench(lambda: launches[name](slack))
                    if first is None:
                        first = (out.clone(), ms)
                    diff = float((out.float() - first[0].float()).abs().max())
                    rows.append(dict(shape=shape, length=length, kernel=name, rescale_slack=slack, ms=ms,
                                     density=densities[name], of_cudnn=densities[name] * cudnn_ms / ms,
                                     vs_first=first[1] / ms, max_diff_vs_first=diff, cudnn_ms=cudnn_ms,
                                     gpu=gpu_name("cuda"), commit=git_commit()))
                    print(f"{shape} {length} {name:<13} slack {slack:>4}: {ms:8.3f} ms, {rows[-1]['of_cudnn']:.2f} of "
                          f"cuDNN per pair, x{first[1] / ms:.3f} vs slack {args.time_slacks[0]}, |d| {diff:.1e}",
                          flush=True)
            launches = None  # free this case's tensors before the next
            torch.cuda.empty_cache()
            write_csv(args.out / "rescale_slack.csv", list(rows[0]), rows)  # per case: kept if cut short


def profile(args) -> None:
    import triton

    launches, densities, _ = build_cases(args.shape, args.length)
    # The profiled window, in order: cuDNN once, then each sparse launch at each --rescale-slacks value.
    order = [("cudnn", None)] + [(name, slack) for name in LAUNCHES[1:] if name in args.launches
                                 for slack in args.rescale_slacks]
    times = {}
    for name, slack in order:
        launches[name](slack)  # compile
        times[f"{name}@{slack}"] = triton.testing.do_bench(lambda: launches[name](slack))
    # Written before the profiled window: a profiler cut short by its time limit still leaves these.
    args.out.mkdir(parents=True, exist_ok=True)
    facts = dict(shape=args.shape, length=args.length, launch_order=[f"{n}@{s}" for n, s in order],
                 do_bench_ms=times, density=densities, triton=compiled_kernels())
    (args.out / f"triton_kernels_{args.shape}_{args.length}.json").write_text(json.dumps(facts, indent=1))
    print(json.dumps(facts, indent=1), file=sys.stderr)
    torch.cuda.synchronize()
    cudart = torch.cuda.cudart()
    cudart.cudaProfilerStart()
    for name, slack in order:
        launches[name](slack)
    torch.cuda.synchronize()
    cudart.cudaProfilerStop()


def summarize(path: Path, out: Path) -> None:
    """Nsight Compute's raw CSV (``--csv --page raw``; header, units, one row per launch) -> the
    counters of ``COUNTERS``, the tensor pipes and the top warp stall reasons per launch."""
    lines = path.read_text().splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith('"ID"'))
    reader = list(csv.reader(lines[start:]))
    header, units, rows = reader[0], reader[1], reader[2:]
    table = []
    for row in rows:
        record = dict(zip(header, row))
        unit = dict(zip(header, units))
        summary = {"kernel": record.get("Kernel Name", "")[:60]}
        for metric, label in COUNTERS.items():
            if metric in record:
                summary[label] = record[metric]
                if label == "time":
                    summary["time_unit"] = unit[metric]
        for metric, value in record.items():
            match = TENSOR_PIPE.match(metric)
            if match:
                summary[f"tensor_{match.group(1) or 'all'}_{match.group(2)}_pct"] = value
        stalls = sorted(((float(v or 0), STALL.match(m).group(1)) for m, v in record.items() if STALL.match(m)),
                        reverse=True)
        total = sum(value for value, _ in stalls) or 1.0
        summary["stalls"] = "; ".join(f"{name} {value:.2f} ({value / total:.0%})" for value, name in stalls[:TOP_STALLS])
        table.append(summary)
    out.mkdir(parents=True, exist_ok=True)
    fields = sorted({key for row in table for key in row}, key=lambda k: (k != "kernel", k))
    with open(out / "profile_summary.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=fields)
        writer.writeheader()
        writer.writerows(table)
    for row in table:
        print("\n".join(f"{key:>28}: {row[key]}" for key in fields if key in row), end="\n\n")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shape", default="qwen", choices=["llama", "qwen"])
    parser.add_argument("--length", type=int, default=32768)
    parser.add_argument("--summarize", type=Path, metavar="RAW_CSV", help="summarise an ncu raw CSV, then exit")
    parser.add_argument("--rescale-slacks", type=float, nargs="+", default=[None], metavar="SLACK",
                        help="profile each sparse launch at these lazy-rescale slacks (default: the shipped one)")
    parser.add_argument("--time-slacks", type=float, nargs="+", metavar="SLACK",
                        help="instead of profiling: time the sparse launches at these lazy-rescale slacks")
    parser.add_argument("--shapes", nargs="+", default=["qwen", "llama"], choices=["llama", "qwen"],
                        help="with --time-slacks")
    parser.add_argument("--lengths", type=int, nargs="+", default=[32768, 131072], help="with --time-slacks")
    parser.add_argument("--launches", nargs="+", default=list(LAUNCHES[1:]), choices=list(LAUNCHES[1:]),
                        help="the sparse launches to time or profile (cuDNN always runs)")
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    if args.summarize:
        summarize(args.summarize, args.out)
        return
    if not torch.cuda.is_available():
        parser.error("needs a CUDA device (run it under ncu on the GPU machine)")
    if args.time_slacks:
        time_slacks(args)
        return
    profile(args)


if __name__ == "__main__":
    main()
