"""Where the vertical-slash kernel's rate goes: the same kernel on dense work laid out three ways, and
a flat-loop variant, against cuDNN on the GPU.

The kernel (``kernels/vertical_slash/triton_attention.py``) walks each query block's merged key
ranges in a loop nested inside a loop over ranges, then its gathered columns in one flat loop. Triton
software-pipelines only innermost loops, and a merged range is short (median ~80 keys on the
structured input: 3 tiles of 32), so the range loop may never reach its pipelined steady state. This
script separates the causes on work whose answer is known (every causal pair):

- ``dense_one_range``: one range ``[0, block end)`` per query block: the nested loop, fully
  pipelined; the ceiling of the tile shape itself;
- ``dense_64_ranges``: the same keys as 64-key ranges: the nested loop with 2-tile inner trips;
- ``dense_columns``: every key as a gathered column (32K only: the table is blocks x keys);
- and the default's own index on the structured input (``auto``).

Each layout runs through the shipped kernel's nested loop (``nested``) and its flat loop
(``pieces``: the ranges cut into pieces of at most ``RANGE_N`` keys first, ``split_ranges_naive``,
then one loop over them, as the block-sparse kernel walks its blocks). ``--builder`` also times the
index builder on the ``auto`` lines with and without the cut. Rates are TFLOP/s on computed causal pairs
(4 x head_dim flops each) against cuDNN's on the whole causal square. On the GPU machine:

    python experiments/vertical_slash_ceiling.py --out DIR

Measured (one H100, Llama-3.1-8B shapes, 32K, shipped tiles; ``--shapes llama --tile-configs 3``,
benchmarks/results/real_qwen_h100/run9_range_pieces/): every causal pair as one range per block 0.61 of
cuDNN nested / 0.63 pieces (the tile shape's ceiling), as 64-key ranges 0.48 / 0.63, the default's index
0.44 / 0.51 (docs/benchmarks.md, "Range pieces").
"""

from __future__ import annotations

import argparse
import csv
import subprocess
from dataclasses import replace
from pathlib import Path

import torch
import triton

from sparseprefill.bench.kernels import structured_qkv
from sparseprefill.config import SparseConfig
from sparseprefill.kernels.geometry import causal_pairs_total
from sparseprefill.kernels.indices import VerticalSlashIndex
from sparseprefill.kernels.vertical_slash import range_piece_keys
from sparseprefill.kernels.vertical_slash.naive import split_ranges_naive, vertical_slash_attention_naive
from sparseprefill.kernels.vertical_slash.triton_attention import _vertical_slash_fwd_kernel
from sparseprefill.patterns.vertical_slash import VerticalSlashPattern

# (BLOCK_M, RANGE_N, COLUMN_N, num_warps, num_stages, column-loop stages); the first is the shipped policy.
TILES = [(64, 32, 32, 4, 3, 3), (64, 32, 32, 4, 3, 2), (64, 32, 32, 4, 2, 2), (64, 32, 32, 4, 4, 2),
         (64, 64, 64, 4, 3, 2), (64, 64, 64, 4, 2, 2), (64, 64, 32, 4, 3, 2), (64, 32, 64, 4, 3, 2),
         (64, 64, 64, 8, 3, 2), (64, 128, 128, 8, 2, 2)]
SHAPES = {"llama": (32, 8, 128), "qwen": (14, 2, 64)}  # query heads, KV heads, head_dim


def structured_gpu_args(description: str, cuda_reason: str = "needs a CUDA device", argv=None) -> argparse.Namespace:
    """The command line the structured-input GPU scripts share: ``--lengths``, ``--shapes`` (of ``SHAPES``),
    ``--out`` (created); refused in one line without a CUDA device (``cuda_reason`` says why)."""
    parser = argparse.ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--lengths", type=int, nargs="+", default=[32768, 131072])
    parser.add_argument("--shapes", nargs="+", default=list(SHAPES), choices=list(SHAPES))
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        parser.error(cuda_reason)
    args.out.mkdir(parents=True, exist_ok=True)
    return args


def launch(q, k, v, index, tiles, kv_head_index, out, scale, pieces: bool):
    """The shipped kernel with explicit ``(BLOCK_M, RANGE_N, COLUMN_N, warps, stages)``; ``pieces``: its
    flat range loop (the index's ranges must fit ``RANGE_N``)."""
    block_m, range_n, column_n, warps, stages, column_stages = tiles
    b, hq, q_len, head_dim = q.shape
    k_len = k.shape[2]
    grid = (index.range_count.shape[2] * (index.block_size_q // block_m), b * hq)
    _vertical_slash_fwd_kernel[grid](
        q, k, v, out, index.range_count, index.range_start, index.range_end, index.column_count,
        index.column_index, kv_head_index, k, v, index.column_count,  # unread: TMA descriptors, cover
        *q.stride(), *k.stride(), *v.stride(), *out.stride(),
        *index.range_count.stride(), *index.range_start.stride(), *index.column_count.stride(),
        *index.column_index.stride(), hq, q_len, k_len, k_len - q_len, index.range_start.shape[-1],
        float(scale), 1.0, 0,
        HEAD_DIM=head_dim, BLOCK_D=triton.next_power_of_2(head_dim), BLOCK_M=block_m, RANGE_N=range_n,
        COLUMN_N=column_n, BLOCK_Q=index.block_size_q, HAS_WINDOW=False, HAS_SOFTCAP=False,
        UPCAST=q.dtype == torch.float32 or q.device.type == "cpu", RANGE_PIECES=pieces, COLUMN_STAGES=column_stages,
        num_warps=warps, num_stages=stages)
    return out


def dense_index(kind: str, heads: int, length: int, block_q: int, device) -> VerticalSlashIndex:
    """Every causal pair as one range per block, as 64-key ranges, or as columns."""
    blocks = -(-length // block_q)
    block_end = torch.clamp((torch.arange(blocks, device=device) + 1) * block_q, max=length).int()
    empty = torch.zeros(1, heads, blocks, dtype=torch.int32, device=device)
    if kind == "dense_one_range":
        start = torch.zeros(1, heads, blocks, 1, dtype=torch.int32, device=device)
        end = block_end.view(1, 1, blocks, 1).expand(1, heads, blocks, 1).contiguous()
        return VerticalSlashIndex(empty + 1, start, end, empty, torch.zeros_like(start), block_q, length, length)
    if kind == "dense_64_ranges":
        width = -(-length // 64)
        first = torch.arange(width, device=device, dtype=torch.int32) * 64
        start = first.view(1, 1, 1, width).expand(1, heads, blocks, width).contiguous()
        end = torch.minimum(start + 64, block_end.view(1, 1, blocks, 1)).contiguous()
        count = (-(-block_end // 64)).view(1, 1, blocks).expand(1, heads, blocks).contiguous()
        return VerticalSlashIndex(count, start, end, empty, torch.zeros(1, heads, blocks, 1, dtype=torch.int32,
                                                                       device=device), block_q, length, length)
    keys = torch.arange(length, device=device, dtype=torch.int32)
    columns = keys.view(1, 1, 1, length).expand(1, heads, blocks, length).contiguous()
    zeros = torch.zeros(1, heads, blocks, 1, dtype=torch.int32, device=device)
    return VerticalSlashIndex(empty, zeros, zeros, block_end.view(1, 1, blocks).expand(1, heads, blocks).contiguous(),
                              columns, block_q, length, length)


def check(q, k, v, index, out, scale, kv_head_index) -> float:
    """Max |difference| to the fp32 reference on the last two query blocks."""
    rows = 2 * index.block_size_q
    length = q.shape[2]
    first_block = (length - rows) // index.block_size_q
    sub = replace(index, range_count=index.range_count[:, :, first_block:], range_start=index.range_start[:, :, first_block:],
                  range_end=index.range_end[:, :, first_block:], column_count=index.column_count[:, :, first_block:],
                  column_index=index.column_index[:, :, first_block:], q_len=length - first_block * index.block_size_q,
                  block_pairs=None)
    qs = q[:, :, first_block * index.block_size_q:].float()
    ref = vertical_slash_attention_naive(qs, k.float(), v.float(), sub, scale=scale, window=None, softcap=None,
                                         kv_head_index=kv_head_index.long(), out=torch.empty_like(qs))
    return float((ref - out[:, :, first_block * index.block_size_q:].float()).abs().max())


def _time_once(fn) -> float:
    """One timed call in ms (the CPU smoke run: under the interpreter a timing says nothing)."""
    import time

    start = time.perf_counter()
    fn()
    return (time.perf_counter() - start) * 1e3


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--lengths", type=int, nargs="+", default=[32768, 131072])
    parser.add_argument("--shapes", nargs="+", default=list(SHAPES), choices=list(SHAPES))
    parser.add_argument("--tile-configs", type=int, default=len(TILES), help="time the first N of TILES")
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--device", default="cuda", help="cpu: a smoke run under the Triton interpreter "
                        "(TRITON_INTERPRET=1, short --lengths); its timings mean nothing")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    device = torch.device(args.device)
    gpu = torch.cuda.get_device_name() if device.type == "cuda" else "cpu"
    bench = triton.testing.do_bench if device.type == "cuda" else _time_once
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
    rows = []
    for shape in args.shapes:
        heads, kv_heads, head_dim = SHAPES[shape]
        kv_head_index = (torch.arange(heads, device=device) // (heads // kv_heads)).int()
        scale = head_dim**-0.5
        for length in args.lengths:
            q, k, v = structured_qkv(heads, kv_heads, length, head_dim, device)
            causal = causal_pairs_total(length, length) * heads
            dense_ms = {}
            for backend in ("cudnn", "flash"):
                sdpa = getattr(torch.nn.attention.SDPBackend, "CUDNN_ATTENTION" if backend == "cudnn" else "FLASH_ATTENTION")
                if device.type == "cpu":
                    sdpa = torch.nn.attention.SDPBackend.MATH
                with torch.nn.attention.sdpa_kernel(sdpa):
                    dense_ms[backend] = bench(lambda: torch.nn.functional.scaled_dot_product_attention(
                        q, k, v, is_causal=True, enable_gqa=True))
            dense_rate = 4 * head_dim * causal / dense_ms["cudnn"] / 1e9
            print(f"{shape} L={length}: cuDNN {dense_ms['cudnn']:.2f} ms ({dense_rate:.0f} TFLOP/s), "
                  f"flash {dense_ms['flash']:.2f}", flush=True)
            for backend, ms in dense_ms.items():
                rows.append(dict(shape=shape, length=length, layout="dense", kernel=backend, tiles="", ms=ms,
                                 density=1.0, tflops=dense_rate * dense_ms["cudnn"] / ms, of_cudnn=dense_ms["cudnn"] / ms,
                                 max_err="", gpu=gpu, commit=commit))
            pattern = VerticalSlashPattern(SparseConfig().vertical_slash)
            layouts = ["auto", "dense_one_range", "dense_64_ranges"] + (["dense_columns"] if length <= 32768 else [])
            for layout in layouts:
                if layout == "auto":
                    lines = pattern.estimate_lines(q, k, scale=scale, softcap=None, kv_head_index=kv_head_index.long())
                    index = lines.to_index(slashes_sorted=True)
                    piece_keys = range_piece_keys(head_dim, 64, q.element_size())
                    for name, cut in (("index_whole", None), ("index_pieces", piece_keys)):
                        ms = bench(lambda: lines.to_index(slashes_sorted=True, max_range_keys=cut))
                        print(f"  builder {name:<14}{ms:9.3f} ms", flush=True)
                        rows.append(dict(shape=shape, length=length, layout="auto", kernel=name, tiles="", ms=ms,
                                         density="", tflops="", of_cudnn="", max_err="", gpu=gpu, commit=commit))
                    if length <= 32768:  # the comparison's temporaries ran out of memory at 128K
                        assert lines.to_index(slashes_sorted=True, max_range_keys=piece_keys).lists_same_entries(
                            split_ranges_naive(index, piece_keys))
                else:
                    index = dense_index(layout, heads, length, 64, device)
                pairs = float(index.computed_pairs().sum())
                out = torch.empty_like(q)
                for kernel in ("nested", "pieces"):
                    tile_sets = TILES[:args.tile_configs] if (length <= 32768 or layout == "auto") else TILES[:2]
                    for tiles in tile_sets:
                        walked = split_ranges_naive(index, tiles[1]) if kernel == "pieces" else index
                        run = lambda: launch(q, k, v, walked, tiles, kv_head_index, out, scale, kernel == "pieces")  # noqa: E731
                        try:
                            out.fill_(float("nan"))
                            run()
                            err = check(q, k, v, index, out, scale, kv_head_index)
                            ms = bench(run)
                        except Exception as exc:  # an out-of-resources config is a result, not a failure
                            print(f"  {layout:<16}{kernel:<7}{tiles}: failed {type(exc).__name__}: {exc}"[:300], flush=True)
                            continue
                        rate = 4 * head_dim * pairs / ms / 1e9
                        print(f"  {layout:<16}{kernel:<7}{str(tiles):<22}{ms:9.3f} ms {rate:5.0f} TFLOP/s "
                              f"{rate / dense_rate:5.2f} of cuDNN  density {pairs / causal:.3f}  err {err:.1e}", flush=True)
                        rows.append(dict(shape=shape, length=length, layout=layout, kernel=kernel, tiles=str(tiles),
                                         ms=ms, density=pairs / causal, tflops=rate, of_cudnn=rate / dense_rate,
                                         max_err=err, gpu=gpu, commit=commit))
                index = walked = None  # free the tables before the next layout
                _write(args.out / "ceiling.csv", rows)  # a run cut short keeps what it measured
                torch.cuda.empty_cache()
    _write(args.out / "ceiling.csv", rows)


FIELDS = ["shape", "length", "layout", "kernel", "tiles", "ms", "density", "tflops", "of_cudnn", "max_err", "gpu", "commit"]


def _write(path: Path, rows: list[dict]) -> None:
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=FIELDS)
        writer.writeheader()
        writer.writerows(rows)


if __name__ == "__main__":
    main()
