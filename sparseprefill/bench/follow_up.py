"""A short follow-up chunk over a long cached context: one layer's attention time, three ways.

A second question about the same long document arrives as a chunk of ``T`` new queries over ``L``
cached keys (``T`` of them the chunk's own). Per layer (Llama-3.1-8B attention shapes: 32 query heads,
8 KV heads, head_dim 128, bf16), ``triton.testing.do_bench`` medians of

    sdpa_cudnn        dense SDPA (cuDNN backend, bottom-right causal) over all keys
    prefill_patterns  the default config's prefill path for a chunk (vertical-slash estimate + attend)
    retrieval         ``DecodeRetrievalConfig(follow_up_chunks=True)``: per run of ``64 // G`` queries a
                      page summary, top-k page selection and the split-K sparse kernel (what the
                      patched model runs for such a chunk), at ``--budget`` tokens

with the density each computed. Keys are random with a sink and planted needle keys aligned with the
chunk's queries, so selection has something to find.

    sparseprefill bench follow-up --contexts 32768 131072 --chunks 64 256 --out results/   # GPU
    sparseprefill bench follow-up --dry-run --out /tmp/follow_up                           # CPU, tiny

CSV (``follow_up.csv`` in ``--out``, appended to when it exists): op, context, chunk, budget, ms,
density, gpu, commit.
"""

from __future__ import annotations

import argparse
import os
import sys
from types import SimpleNamespace

import torch

from ..config import DecodeRetrievalConfig, SparseConfig
from ..kernels.geometry import causal_pairs_total
from ..patchers.decode import follow_up_attention
from ..patchers.masks import SparsePrefillMask
from ..patchers.state import LayerStats
from ..patterns import build_pattern
from .common import HEAD_DIM, HEADS, KV_HEADS, append_csv, bench_ms, git_commit, gpu_name

FIELDS = ["op", "context", "chunk", "budget", "ms", "density", "gpu", "commit"]


def _chunk_inputs(context: int, chunk: int, device, dtype, seed: int = 0):
    """q ``[1, H, T, D]`` for the chunk's queries, k, v ``[1, Hkv, L, D]`` (the chunk's keys last)."""
    g = torch.Generator(device="cpu").manual_seed(seed)
    k = torch.randn(1, KV_HEADS, context, HEAD_DIM, generator=g)
    k[:, :, :4] *= 4.0  # a sink
    needles = torch.randint(0, context, (64,), generator=g)
    q = torch.randn(1, HEADS, chunk, HEAD_DIM, generator=g)
    group = HEADS // KV_HEADS
    for n in needles.tolist():  # keys aligned with their group's mean query: retrieval targets
        k[0, :, n] += 2.0 * q[0].view(KV_HEADS, group, chunk, HEAD_DIM).mean((1, 2))
    v = torch.randn(1, KV_HEADS, context, HEAD_DIM, generator=g)
    return q.to(device, dtype), k.to(device, dtype), v.to(device, dtype)


def rows_for(context: int, chunk: int, budget: int, device, dtype, gpu: str, commit: str) -> list[dict]:
    q, k, v = _chunk_inputs(context, chunk, device, dtype)
    scale = HEAD_DIM**-0.5
    causal = causal_pairs_total(chunk, context) * HEADS
    rows = []

    def add(op, ms, density):
        rows.append(dict(op=op, context=context, chunk=chunk, budget=budget, ms=round(ms, 4),
                         density=round(density, 4), gpu=gpu, commit=commit))
        print(f"L={context} T={chunk} {op:<17} {ms:8.3f} ms  density {density:.3f}", flush=True)

    if device.type == "cuda":
        from torch.nn.attention import SDPBackend, sdpa_kernel

        def dense():
            with sdpa_kernel(SDPBackend.CUDNN_ATTENTION):
                # q sits at the end of the keys: cuDNN's causal mask is bottom-right aligned here.
                from torch.nn.attention.bias import causal_lower_right
                return torch.nn.functional.scaled_dot_product_attention(
                    q, k, v, attn_mask=causal_lower_right(chunk, context), enable_gqa=True)
        try:
            add("sdpa_cudnn", bench_ms(dense, device), 1.0)
        except RuntimeError as exc:
            print(f"  sdpa cudnn refused: {str(exc).splitlines()[0][:120]}")

    config = SparseConfig(min_sparse_len=0, min_sparse_query_len=1)
    pattern = build_pattern(config.pattern, config)
    kv_of_head = torch.arange(HEADS, device=device) // (HEADS // KV_HEADS)
    out = torch.empty_like(q)
    result = pattern.run(q, k, v, scale=scale, softcap=None, kv_head_index=kv_of_head, out=out)
    add("prefill_patterns", bench_ms(lambda: pattern.run(q, k, v, scale=scale, softcap=None,
                                                         kv_head_index=kv_of_head, out=out), device),
        float(result.computed_pairs.sum()) / causal)

    # follow_up_attention reads only these fields of the module and the patch state.
    cfg = DecodeRetrievalConfig(follow_up_chunks=True, budget_tokens=budget, min_context=0,
                                max_follow_up_tokens=max(chunk, 2), dense_layers=())
    state = SimpleNamespace(decode_configs={0: cfg}, config=SimpleNamespace(decode=cfg))
    module = SimpleNamespace(training=False)
    mask = SparsePrefillMask(q_length=chunk, kv_length=context, padding=None)
    stats = LayerStats(0)

    def retrieval():
        return follow_up_attention(module, state, 0, stats, q, k, v, mask, scale=scale, dropout=0.0, kwargs={})

    if retrieval() is None:
        raise RuntimeError("follow_up_attention declined the chunk; check the config above")
    stats = LayerStats(0)
    retrieval()
    density = stats.last_density
    add("retrieval", bench_ms(retrieval, device), density)
    return rows


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--contexts", type=int, nargs="+", default=[32768, 131072])
    parser.add_argument("--chunks", type=int, nargs="+", default=[64, 256])
    parser.add_argument("--budget", type=int, default=2048)
    parser.add_argument("--dry-run", action="store_true", help="CPU, tiny shapes, naive kernels")
    parser.add_argument("--out", default=None, help="folder for follow_up.csv")


def run_from_args(args: argparse.Namespace) -> int:
    if args.dry_run:
        device, dtype, contexts, chunks, budget = torch.device("cpu"), torch.float32, [1500], [40], 512
    else:
        if not torch.cuda.is_available():
            print("error: the follow-up benchmark needs a CUDA GPU; pass --dry-run without one", file=sys.stderr)
            return 1
        device, dtype, contexts, chunks, budget = (torch.device("cuda"), torch.bfloat16, args.contexts, args.chunks,
                                                   args.budget)
    gpu = gpu_name(device)
    commit = git_commit()
    rows = [r for context in contexts for chunk in chunks
            for r in rows_for(context, chunk, budget, device, dtype, gpu, commit)]
    if args.out:
        os.makedirs(args.out, exist_ok=True)
        append_csv(os.path.join(args.out, "follow_up.csv"), FIELDS, rows)
    return 0


def main(argv=None) -> int:
    from . import command_main

    return command_main(__doc__, add_arguments, run_from_args, argv)


if __name__ == "__main__":
    sys.exit(main())
