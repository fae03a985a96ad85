"""Leading wide tiles in the vertical-slash kernels' range loops, measured on the default's own indices.

A merged range starts wherever its band does, so with 32-key tiles its last tile is partial, and with
64-key tiles as the only tile the default's short bands lost 7-16% (docs/benchmarks.md, stop 27); yet
64-key tiles run dense work at 0.72-0.82 of cuDNN's rate against 0.61-0.63. The kernels now walk each
range as whole ``wide_key_tile``-key tiles first, then 32-key tiles for the rest
(``triton_common.attend_key_range``). This times, in one process and warm, the index kernel
(ranges whole), the index kernel on range pieces (the head_dim-128 default's layout, where the wide
tiles do not apply), and the fused lines kernel, each with ``wide_key_tile`` 0 (the old loop), 64 and
128, and the index kernel on 128-row query blocks (the same lines), against SDPA cuDNN, on:

- the structured synthetic input (Llama-3.1-8B and Qwen2.5-0.5B head shapes), and
- with ``--qk-from MODEL``, real post-RoPE q/k/v of a few layers (``bench.real_qk``'s capture).

Each output is checked against the wide-0 output of the same kernel (max |difference|) and the index
kernel's against the fp32 reference on the last two query blocks. Rows: ``wide_tiles.csv``; plot:
``wide_tiles.png`` (rate as a share of cuDNN's per computed pair). On the GPU machine:

    python experiments/wide_tiles.py --out DIR [--qk-from qwen2.5-coder]
"""

from __future__ import annotations

import argparse
import csv
from pathlib import Path

import torch
import triton

from sparseprefill.bench.common import git_commit, gpu_name
from sparseprefill.bench.kernels import structured_qkv
from sparseprefill.config import SparseConfig
from sparseprefill.kernels.geometry import causal_pairs_total
from sparseprefill.kernels.vertical_slash import range_piece_keys, vertical_slash_lines
from sparseprefill.kernels.vertical_slash.triton_attention import vertical_slash_attention_triton
from sparseprefill.kernels.vertical_slash.triton_lines import vertical_slash_lines_attention_triton
from sparseprefill.patterns.vertical_slash import VerticalSlashPattern
from vertical_slash_ceiling import SHAPES, check  # query heads, KV heads, head_dim (this folder is on sys.path)

FIELDS = ["source", "length", "kernel", "wide_key_tile", "ms", "density", "of_cudnn", "vs_wide0", "max_err",
          "gpu", "commit"]


def structured_inputs(shapes, lengths, device):
    for shape in shapes:
        heads, kv_heads, head_dim = SHAPES[shape]
        for length in lengths:
            q, k, v = structured_qkv(heads, kv_heads, length, head_dim, device)
            yield f"structured_{shape}", length, q, k, v, head_dim**-0.5


def real_inputs(model_name, lengths, layers, device):
    from sparseprefill.bench.real_model import capture_layers
    from sparseprefill.bench.real_qk import load_model
    from sparseprefill.evals.logits import reference_input_ids

    for length in lengths:
        model, tokenizer = load_model(model_name, length, device=device, dtype=torch.bfloat16)
        ids = reference_input_ids(tokenizer, length).to(device)
        captured = capture_layers(model, ids, layers)
        del model
        for layer, (q, k, v, scale) in captured.items():
            yield f"{model_name}_layer{layer}", length, q, k, v, scale
        del captured
        torch.cuda.empty_cache()


def measure(source, length, q, k, v, scale, wides, gpu, commit) -> list[dict]:
    heads, head_dim = q.shape[1], q.shape[-1]
    kv_head_index = (torch.arange(heads, device=q.device) // (heads // k.shape[1])).long()
    causal = causal_pairs_total(length, length) * heads
    with torch.nn.attention.sdpa_kernel(torch.nn.attention.SDPBackend.CUDNN_ATTENTION):
        cudnn_ms = triton.testing.do_bench(lambda: torch.nn.functional.scaled_dot_product_attention(
            q, k, v, is_causal=True, enable_gqa=True, scale=scale))
    rows = [dict(source=source, length=length, kernel="dense_cudnn", wide_key_tile="", ms=cudnn_ms, density=1.0,
                 of_cudnn=1.0, vs_wide0="", max_err="", gpu=gpu, commit=commit)]
    pattern = VerticalSlashPattern(SparseConfig().vertical_slash)
    lines = pattern.estimate_lines(q, k, scale=scale, softcap=None, kv_head_index=kv_head_index)
    index = lines.to_index(slashes_sorted=True)
    pieces = lines.to_index(slashes_sorted=True, max_range_keys=range_piece_keys(head_dim, index.block_size_q,
                                                                                  q.element_size()))
    # The same lines over 128-row query blocks: 128-row programs (8 warps) read each K/V tile for twice
    # the rows, but a band over a wider block spans more keys (more pairs computed).
    index_128 = vertical_slash_lines(lines.vertical_index, lines.vertical_count, lines.slash_offset, lines.slash_count,
                                     q_len=length, k_len=length, block_size_q=2 * index.block_size_q
                                     ).to_index(slashes_sorted=True)
    kw = dict(scale=scale, window=None, softcap=None, kv_head_index=kv_head_index)
    runs = {
        "index_whole": lambda wide, out: vertical_slash_attention_triton(q, k, v, index, out=out, wide_key_tile=wide, **kw),
        "index_pieces": lambda wide, out: vertical_slash_attention_triton(q, k, v, pieces, out=out, wide_key_tile=wide,
                                                                          **kw),
        "fused_lines": lambda wide, out: vertical_slash_lines_attention_triton(q, k, v, lines, out=out, lines_sorted=True,
                                                                               wide_key_tile=wide, **kw),
        "index_whole_block128": lambda wide, out: vertical_slash_attention_triton(q, k, v, index_128, out=out,
                                                                                  wide_key_tile=wide, **kw),
    }
    for kernel, run in runs.items():
        density = float((index_128 if kernel == "index_whole_block128" else index).computed_pairs().sum()) / causal
        first = None
        for wide in (wides if kernel != "index_pieces" else [0]):
            out = torch.full_like(q, float("nan"))
            try:
                run(wide, out)
                ms = triton.testing.do_bench(lambda: run(wide, out))
            except Exception as exc:  # an out-of-resources tile is a result, not a failure
                print(f"  {source} {length} {kernel} wide {wide}: failed {type(exc).__name__}: {exc}"[:300], flush=True)
                continue
            if first is None:
                first = (out.clone(), ms)
            vs0 = float((out.float() - first[0].float()).abs().max())
            err = check(q, k, v, index, out, scale, kv_head_index) if kernel == "index_whole" else ""
            rows.append(dict(source=source, length=length, kernel=kernel, wide_key_tile=wide, ms=ms, density=density,
                             of_cudnn=density * cudnn_ms / ms, vs_wide0=vs0, max_err=err, gpu=gpu, commit=commit))
            print(f"  {source} {length} {kernel:<13} wide {wide:>3}: {ms:8.3f} ms, {density * cudnn_ms / ms:.2f} of "
                  f"cuDNN per pair (density {density:.3f}, cuDNN {cudnn_ms:.2f} ms), x{first[1] / ms:.3f} vs first, "
                  f"|d| {vs0:.1e}", flush=True)
    return rows


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cases = sorted({(r["source"], r["length"]) for r in rows if r["kernel"] != "dense_cudnn"})
    series = sorted({(r["kernel"], r["wide_key_tile"]) for r in rows if r["kernel"] != "dense_cudnn"})
    fig, ax = plt.subplots(figsize=(max(8, len(cases) * 0.9), 4.5))
    width = 0.8 / max(1, len(series))
    for i, (kernel, wide) in enumerate(series):
        values = [next((r["of_cudnn"] for r in rows if (r["source"], r["length"], r["kernel"], r["wide_key_tile"])
                        == (c[0], c[1], kernel, wide)), 0.0) for c in cases]
        ax.bar([j + i * width for j in range(len(cases))], values, width, label=f"{kernel} wide {wide}")
    ax.set_xticks([j + 0.4 for j in range(len(cases))])
    ax.set_xticklabels([f"{s}\n{n // 1024}K" for s, n in cases], rotation=60, fontsize=7)
    ax.set_ylabel("rate per computed pair / cuDNN's")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--lengths", type=int, nargs="+", default=[32768, 131072])
    parser.add_argument("--shapes", nargs="*", default=list(SHAPES), choices=list(SHAPES))
    parser.add_argument("--wide", type=int, nargs="+", default=[0, 64, 128])
    parser.add_argument("--qk-from", default=None, help="also real q/k of this model (bench kernels --qk-from)")
    parser.add_argument("--qk-layers", type=int, nargs="+", default=[0, 6, 12, 17, 23])
    parser.add_argument("--qk-lengths", type=int, nargs="+", default=[32768, 65536, 131072])
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    if not torch.cuda.is_available():
        parser.error("needs a CUDA device (the comparison is a timing)")
    args.out.mkdir(parents=True, exist_ok=True)
    gpu, commit = gpu_name("cuda"), git_commit()
    device = torch.device("cuda")
    sources = [structured_inputs(args.shapes, args.lengths, device)]
    if args.qk_from:
        sources.append(real_inputs(args.qk_from, args.qk_lengths, args.qk_layers, device))
    rows: list[dict] = []
    for source in sources:
        for name, length, q, k, v, scale in source:
            rows += measure(name, length, q, k, v, scale, args.wide, gpu, commit)
            del q, k, v
            torch.cuda.empty_cache()
            with open(args.out / "wide_tiles.csv", "w", newline="") as f:  # a run cut short keeps its rows
                writer = csv.DictWriter(f, fieldnames=FIELDS)
                writer.writeheader()
                writer.writerows(rows)
    plot(rows, args.out / "wide_tiles.png")


if __name__ == "__main__":
    main()
