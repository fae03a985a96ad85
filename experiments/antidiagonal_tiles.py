"""The antidiagonal block-mass kernel (XAttention's estimate) under several tile shapes, warps and
strides, in one or two sweeps over the score tiles, against cuDNN dense attention on the same q/k/v (GPU).

Each score tile is a GEMM of depth ``stride x head_dim`` into a small output (64 x 64 reshaped rows
and key groups before stop 28, computed twice: row statistics, then block mass): with a deep, narrow
GEMM the operand loads per output bound the rate, so wider tiles and a single sweep are what to try.
Every variant's block mass is checked against the shipped launch's before it is timed (the knobs
change the schedule, not the result). Also timed: the sampled scoring (``sampled=True``, S
exponentials per output) at the shipped tiles, and the selection that follows (``select_blocks``,
the Triton threshold search, beside its sorting reference ``select_blocks_naive``), so the whole
estimate is priced. Rows: ``(shape, length, op, stride, tile_rows, tile_groups, warps,
sweeps, ms, vs_cudnn, max_abs_diff, gpu, commit)``. On the GPU machine:

    python experiments/antidiagonal_tiles.py --lengths 32768 131072 --out DIR
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

from sparseprefill.bench.common import bench_ms, git_commit, gpu_name, write_csv
from sparseprefill.config import DEFAULT_ANTIDIAGONAL_STRIDE, DEFAULT_BLOCK_MASS, DEFAULT_BLOCK_SIZE
from sparseprefill.kernels import select_blocks
from sparseprefill.kernels.block_sparse import select_blocks_naive
from sparseprefill.kernels.block_sparse.triton_antidiagonal import (
    NUM_WARPS,
    SWEEPS,
    TILE_GROUPS,
    TILE_ROWS,
    antidiagonal_block_mass_triton,
)

# (query heads, KV heads, head_dim): Qwen2.5-Coder-0.5B and Llama-3.1-8B.
SHAPES = {"qwen_0.5b": (14, 2, 64), "llama_8b": (32, 8, 128)}
# (tile_rows, tile_groups, num_warps, sweeps); the first is the shipped launch.
SWEEP = [(TILE_ROWS, TILE_GROUPS, NUM_WARPS, SWEEPS), (128, 64, 4, 2), (128, 64, 8, 2), (64, 128, 4, 2),
         (128, 128, 8, 2), (64, 64, 8, 2), (64, 64, 4, 1), (128, 64, 8, 1), (128, 128, 8, 1), (64, 128, 4, 1)]
STRIDES = (DEFAULT_ANTIDIAGONAL_STRIDE, 2 * DEFAULT_ANTIDIAGONAL_STRIDE)
# Block masses are shares of a row's probability (<= 1): fp32 summation-order noise stays far below this.
SAME_RESULT_ATOL = 1e-4


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--lengths", type=int, nargs="+", default=[32768, 131072])
    ap.add_argument("--shapes", nargs="+", choices=list(SHAPES), default=list(SHAPES))
    ap.add_argument("--shipped-only", action="store_true",
                    help="only the shipped launch at the default stride (no tile sweep): the estimate's price")
    ap.add_argument("--out", default=".cache/antidiagonal_tiles")
    args = ap.parse_args(argv)
    sweep, strides = (SWEEP[:1], STRIDES[:1]) if args.shipped_only else (SWEEP, STRIDES)
    if not torch.cuda.is_available():
        ap.error("needs a CUDA device: the sweep times compiled Triton launches")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    rows, commit, gpu = [], git_commit(), gpu_name("cuda")
    for shape in args.shapes:
        hq, hkv, d = SHAPES[shape]
        kv_head_index = torch.arange(hq, device="cuda") // (hq // hkv)
        for length in args.lengths:
            g = torch.Generator(device="cuda").manual_seed(length)
            q = torch.randn(1, hq, length, d, device="cuda", dtype=torch.bfloat16, generator=g)
            k = torch.randn(1, hkv, length, d, device="cuda", dtype=torch.bfloat16, generator=g)
            v = torch.randn(1, hkv, length, d, device="cuda", dtype=torch.bfloat16, generator=g)
            scale = d**-0.5
            kr, vr = k.repeat_interleave(hq // hkv, 1), v.repeat_interleave(hq // hkv, 1)
            with torch.nn.attention.sdpa_kernel(torch.nn.attention.SDPBackend.CUDNN_ATTENTION):
                dense_ms = bench_ms(lambda: torch.nn.functional.scaled_dot_product_attention(
                    q, kr, vr, is_causal=True, scale=scale))
            base = dict(shape=shape, length=length, gpu=gpu, commit=commit)
            rows.append(dict(base, op="dense_cudnn", ms=dense_ms, vs_cudnn=1.0))
            for stride in strides:
                kw = dict(scale=scale, stride=stride, block_size=DEFAULT_BLOCK_SIZE, softcap=None,
                          kv_head_index=kv_head_index)
                reference = antidiagonal_block_mass_triton(q, k, **kw)
                for tile_rows, tile_groups, warps, sweeps in sweep:
                    tiles = dict(tile_rows=tile_rows, tile_groups=tile_groups, num_warps=warps, sweeps=sweeps)
                    got = antidiagonal_block_mass_triton(q, k, **kw, **tiles)
                    diff = float((got - reference).abs().max())
                    ms = bench_ms(lambda: antidiagonal_block_mass_triton(q, k, **kw, **tiles)) \
                        if diff <= SAME_RESULT_ATOL else None
                    rows.append(dict(base, op="antidiagonal_mass", stride=stride, tile_rows=tile_rows,
                                     tile_groups=tile_groups, warps=warps, sweeps=sweeps, ms=ms,
                                     vs_cudnn=ms / dense_ms if ms else None, max_abs_diff=diff))
                    print(f"{shape} {length} stride {stride} tiles {tile_rows}x{tile_groups} warps {warps} sweeps {sweeps}: "
                          f"{ms if ms is None else round(ms, 3)} ms ({rows[-1]['vs_cudnn'] or float('nan'):.3f} "
                          f"of cuDNN {dense_ms:.2f}), diff {diff:.2e}", flush=True)
                # The sampled scoring (S exponentials per output instead of one) at the shipped tiles.
                sampled_ref = antidiagonal_block_mass_triton(q, k, **kw, sampled=True)
                sampled_ms = bench_ms(lambda: antidiagonal_block_mass_triton(q, k, **kw, sampled=True))
                rows.append(dict(base, op="antidiagonal_mass_sampled", stride=stride, tile_rows=TILE_ROWS,
                                 tile_groups=TILE_GROUPS, warps=NUM_WARPS, sweeps=1, ms=sampled_ms,
                                 vs_cudnn=sampled_ms / dense_ms))
                print(f"{shape} {length} stride {stride} sampled scoring: {sampled_ms:.3f} ms "
                      f"({sampled_ms / dense_ms:.3f} of cuDNN); rows sum to "
                      f"{float(sampled_ref.sum(-1).max()):.4f} at most", flush=True)
                # The shipped selection (the Triton threshold search) and its sorting reference.
                grid = dict(q_len=length, k_len=length, block_size_q=DEFAULT_BLOCK_SIZE,
                            block_size_k=DEFAULT_BLOCK_SIZE, mass=DEFAULT_BLOCK_MASS)
                fast, sorting = select_blocks(reference, **grid), select_blocks_naive(reference, **grid)
                same = (fast.block_count == sorting.block_count).float().mean()
                print(f"{shape} {length} stride {stride} selection: {float(same):.6f} of the rows keep as many "
                      f"blocks as the sorting reference", flush=True)
                for op, select in (("select_blocks", select_blocks), ("select_blocks_sorting", select_blocks_naive)):
                    select_ms = bench_ms(lambda: select(reference, **grid))
                    rows.append(dict(base, op=op, stride=stride, ms=select_ms, vs_cudnn=select_ms / dense_ms))
                    print(f"{shape} {length} stride {stride} {op}: {select_ms:.3f} ms", flush=True)
            write_csv(out / "antidiagonal_tiles.csv",
                      ["shape", "length", "op", "stride", "tile_rows", "tile_groups", "warps", "sweeps", "ms", "vs_cudnn",
                       "max_abs_diff", "gpu", "commit"], rows)
            torch.cuda.empty_cache()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
