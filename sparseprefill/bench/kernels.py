"""Kernel benchmark: sparse attention vs SDPA (cuDNN, flash) and FlexAttention, on the GPU.

    sparseprefill bench kernels --lengths 8192 32768 131072 --densities 0.02 0.05 0.1 0.2 0.5 --out results/
    python -m sparseprefill.bench.kernels ...     # the same options
    sparseprefill bench kernels --qk-from qwen2.5-coder --lengths 32768 131072 --out results/   # real q/k

Llama-3.1-8B attention shapes by default (32 query heads, 8 KV heads, head_dim 128, bf16). Every
provider runs in the same process, warm, timed with ``triton.testing.do_bench`` medians. Sparse
indices are random at the requested density (sink and diagonal blocks always kept), so the timing
measures the kernel, not an estimator. Writes tidy CSV rows (op, provider, length, density, gpu,
commit, ms, tflops) and prints a table. ``--qk-from MODEL`` times estimation + attention on a real
model's captured q/k/v instead (``bench/real_qk.py``).
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass
from pathlib import Path

import torch

from ..kernels import (
    BlockSparseIndex,
    antidiagonal_block_mass,
    library,
    block_sparse_attention,
    pooled_block_probs,
    select_blocks,
)
from ..kernels.geometry import causal_pairs_total
from .common import HEAD_DIM, HEADS, KV_HEADS, bench_ms, git_commit, write_csv

CSV_FIELDS = ("op", "provider", "length", "density", "gpu", "commit", "ms", "tflops")


@dataclass(frozen=True)
class Row:
    op: str
    provider: str
    length: int
    density: float
    gpu: str
    commit: str
    ms: float
    tflops: float


# do_bench budgets (ms) of the kernel rows: longer than the default, the kernels are short.
BENCH_WARMUP_MS = 100
BENCH_REP_MS = 400


def _bench(fn) -> float:
    return bench_ms(fn, "cuda", warmup=BENCH_WARMUP_MS, rep=BENCH_REP_MS)


def random_block_index(batch: int, heads: int, length: int, block: int, density: float, device) -> BlockSparseIndex:
    """Each query-block row keeps sink + diagonal and a random ``density`` share of its other blocks."""
    n = -(-length // block)
    scores = torch.rand(batch, heads, n, n, device=device)
    return select_blocks(scores, q_len=length, k_len=length, block_size_q=block, block_size_k=block,
                         mass=density, sink_blocks=1)


# Logit targets of the synthetic structures (in units of the softmax scale's output): real LM heads
# put most of their mass on a few sink tokens and a local band, and some on a handful of stripes.
SYNTHETIC_SINK_LOGIT = 14.0
SYNTHETIC_STRIPE_LOGIT = 9.0
SYNTHETIC_LOCAL_LOGIT = 10.0
SYNTHETIC_NOISE_STD = 0.7  # per q and k element: q.k noise of ~0.5 logit std
SYNTHETIC_STRIPES = 32
SYNTHETIC_FREQUENCIES = 8


def structured_qkv(heads: int, kv_heads: int, length: int, head_dim: int, device, seed: int = 0):
    """Synthetic q/k/v with the structures estimators look for, as a stand-in for real activations at
    lengths no available real model reaches: an attention sink (first 4 keys), vertical stripes at
    random positions, a local band whose logit decays with distance (cosines at geometric
    frequencies, like RoPE), and noise. The density ``auto`` picks on it says how the estimator and
    kernels behave on such structure, not what it picks on a given real model.

    Returns bf16 q ``[1, H, L, D]`` and k, v ``[1, Hkv, L, D]``."""
    g = torch.Generator(device=device).manual_seed(seed)
    scale = head_dim**-0.5
    q = SYNTHETIC_NOISE_STD * torch.randn(1, heads, length, head_dim, generator=g, device=device)
    k = SYNTHETIC_NOISE_STD * torch.randn(1, kv_heads, length, head_dim, generator=g, device=device)
    v = torch.randn(1, kv_heads, length, head_dim, generator=g, device=device)
    sink_dim, stripe_dim = 0, 1
    q[..., sink_dim] = 1.0
    k[..., sink_dim] = 0.0
    k[:, :, :4, sink_dim] = SYNTHETIC_SINK_LOGIT / scale
    stripes = torch.randint(0, length, (SYNTHETIC_STRIPES,), generator=g, device=device)
    q[..., stripe_dim] = 1.0
    k[..., stripe_dim] = 0.0
    k[:, :, stripes, stripe_dim] = SYNTHETIC_STRIPE_LOGIT / scale
    positions = torch.arange(length, device=device, dtype=torch.float32)
    amplitude = (SYNTHETIC_LOCAL_LOGIT / (SYNTHETIC_FREQUENCIES * scale)) ** 0.5
    for f in range(SYNTHETIC_FREQUENCIES):
        omega = 1.0 / (4.0 * 2.0**f)
        for dim, fn in ((2 + 2 * f, torch.cos), (3 + 2 * f, torch.sin)):
            q[..., dim] = amplitude * fn(omega * positions)
            k[..., dim] = amplitude * fn(omega * positions)
    return q.bfloat16(), k.bfloat16(), v.bfloat16()


def flex_block_mask(index: BlockSparseIndex, length: int):
    from torch.nn.attention.flex_attention import BlockMask

    if index.column_index is not None:
        raise ValueError("a FlexAttention BlockMask lists whole blocks; this index also lists single key columns")

    def causal(b, h, q_idx, kv_idx):
        return q_idx >= kv_idx

    n = index.num_kv_blocks
    kv_indices = torch.where(index.slot_valid(), index.block_index, 0).to(torch.int32)
    pad = n - kv_indices.shape[-1]
    if pad > 0:
        kv_indices = torch.nn.functional.pad(kv_indices, (0, pad))
    return BlockMask.from_kv_blocks(
        index.block_count.to(torch.int32), kv_indices.contiguous(), BLOCK_SIZE=index.block_size_q, mask_mod=causal,
        seq_lengths=(length, length),
    )


def run(lengths, densities, heads=HEADS, kv_heads=KV_HEADS, head_dim=HEAD_DIM, block=128, out_dir=None, check=True,
        auto_lengths=None, minference_src=None):
    from torch.nn.attention import SDPBackend, sdpa_kernel

    device = torch.device("cuda")
    gpu = torch.cuda.get_device_name(device)
    commit = git_commit()
    rows: list[Row] = []
    flex = None
    try:
        from torch.nn.attention.flex_attention import flex_attention

        flex = torch.compile(flex_attention, dynamic=False)
    except Exception as exc:  # noqa: BLE001 - report and continue without the baseline
        print(f"FlexAttention unavailable: {exc!r}", file=sys.stderr)
    scale = head_dim**-0.5
    for length in lengths:
        torch.manual_seed(length)
        q = torch.randn(1, heads, length, head_dim, device=device, dtype=torch.bfloat16)
        k = torch.randn(1, kv_heads, length, head_dim, device=device, dtype=torch.bfloat16)
        v = torch.randn(1, kv_heads, length, head_dim, device=device, dtype=torch.bfloat16)
        k_rep = k.repeat_interleave(heads // kv_heads, 1)
        v_rep = v.repeat_interleave(heads // kv_heads, 1)
        dense_flops = 4 * causal_pairs_total(length, length) * heads * head_dim
        for name, backend in (("sdpa_cudnn", SDPBackend.CUDNN_ATTENTION), ("sdpa_flash", SDPBackend.FLASH_ATTENTION)):
            try:
                with sdpa_kernel(backend):
                    fn = lambda: torch.nn.functional.scaled_dot_product_attention(q, k_rep, v_rep, is_causal=True)  # noqa: E731
                    ms = _bench(fn)
                rows.append(Row("attention", name, length, 1.0, gpu, commit, ms, dense_flops / ms / 1e9))
            except RuntimeError as exc:
                print(f"{name} failed at {length}: {exc}", file=sys.stderr)
        for density in densities:
            index = random_block_index(1, heads, length, block, density, device)
            computed = int(index.computed_pairs().sum())
            real_density = computed / (causal_pairs_total(length, length) * heads)
            flops = 4 * computed * head_dim
            out = torch.empty_like(q)
            fn = lambda: block_sparse_attention(q, k, v, index, scale=scale, out=out)  # noqa: E731
            ms = _bench(fn)
            rows.append(Row("attention", "triton_block_sparse", length, real_density, gpu, commit, ms, flops / ms / 1e9))
            if flex is not None:
                try:
                    mask = flex_block_mask(index, length)
                    fn = lambda: flex(q, k, v, block_mask=mask, enable_gqa=True)  # noqa: E731
                    ms = _bench(fn)
                    rows.append(Row("attention", "flex_attention", length, real_density, gpu, commit, ms, flops / ms / 1e9))
                except Exception as exc:  # noqa: BLE001
                    print(f"flex failed at {length}/{density}: {exc!r}", file=sys.stderr)
            print(rows[-1] if rows else "", flush=True)
        if out_dir is not None:
            write_csv(Path(out_dir) / "kernels.csv", CSV_FIELDS, rows)
    try:
        from .peers import PeerUnavailable, load_minference

        minference = load_minference(minference_src)
        print(f"MInference: {minference.source}", flush=True)
        rows.extend(run_peers(lengths, minference, heads, kv_heads, head_dim, gpu, commit))
        if out_dir is not None:  # written as each part ends: a run cut short keeps what it measured
            write_csv(Path(out_dir) / "kernels.csv", CSV_FIELDS, rows)
    except PeerUnavailable as exc:
        print(f"MInference rows skipped: {exc}", file=sys.stderr)
    try:
        rows.extend(run_auto(auto_lengths or lengths, heads, kv_heads, head_dim, gpu, commit))
    except Exception as exc:  # noqa: BLE001 - keep the attention rows if the end-to-end part fails
        print(f"auto estimation+attention failed: {exc!r}", file=sys.stderr)
    if out_dir is not None:
        write_csv(Path(out_dir) / "kernels.csv", CSV_FIELDS, rows)
    print(f"{'op':<22}{'provider':<22}{'length':>8}{'density':>9}{'ms':>10}{'TFLOP/s':>9}")
    for row in rows:
        print(f"{row.op:<22}{row.provider:<22}{row.length:>8}{row.density:>9.3f}{row.ms:>10.3f}{row.tflops:>9.1f}")
    return rows


# Mass targets for the auto rows: the default first, then sparser budgets, to show how speed follows
# the density an estimator (or a real model's attention) leads to.
AUTO_MASSES = (0.95, 0.9, 0.8)


def run_auto(lengths, heads, kv_heads, head_dim, gpu, commit, masses=AUTO_MASSES) -> list[Row]:
    """The ``auto`` pattern end to end (estimation, then attention) on structured synthetic input,
    against SDPA cuDNN and flash on the same input: the rows the dense threshold is chosen from.
    Provider ``auto`` is the default config; ``auto_m0.90`` etc. set both vertical and slash mass."""
    from dataclasses import replace

    from torch.nn.attention import SDPBackend, sdpa_kernel

    from ..config import SparseConfig
    from ..patterns import build_pattern

    rows = []
    device = torch.device("cuda")
    default = SparseConfig()
    scale = head_dim**-0.5
    kv_head_index = torch.arange(heads, device=device) // (heads // kv_heads)
    for length in lengths:
        q, k, v = structured_qkv(heads, kv_heads, length, head_dim, device)
        dense_flops = 4 * causal_pairs_total(length, length) * heads * head_dim
        # Repeated K/V as in the kernel rows: not every SDPA backend takes enable_gqa.
        k_rep = k.repeat_interleave(heads // kv_heads, 1)
        v_rep = v.repeat_interleave(heads // kv_heads, 1)
        for name, backend in (("sdpa_cudnn", SDPBackend.CUDNN_ATTENTION), ("sdpa_flash", SDPBackend.FLASH_ATTENTION)):
            with sdpa_kernel(backend):
                ms = _bench(lambda: torch.nn.functional.scaled_dot_product_attention(q, k_rep, v_rep, is_causal=True))
            rows.append(Row("estimation+attention", name, length, 1.0, gpu, commit, ms, dense_flops / ms / 1e9))
        # The other patterns' estimates (not used by auto), for comparison: XAttention's antidiagonal
        # scoring costs about 1/S of dense Q K^T twice over (two passes), pooling almost nothing.
        ad = default.antidiagonal
        ms = _bench(lambda: antidiagonal_block_mass(q, k, scale=scale, stride=ad.stride, block_size=ad.block_size,
                                                    kv_head_index=kv_head_index))
        rows.append(Row("estimation", f"antidiagonal_s{ad.stride}_b{ad.block_size}", length, 0.0, gpu, commit, ms, 0.0))
        bs = default.block_sparse
        ms = _bench(lambda: pooled_block_probs(q, k, scale=scale, block_size=bs.block_size, kv_head_index=kv_head_index))
        rows.append(Row("estimation", f"pooled_b{bs.block_size}", length, 0.0, gpu, commit, ms, 0.0))
        for mass in masses:
            vs = replace(default.vertical_slash, vertical_mass=mass, slash_mass=mass)
            provider = "auto" if vs == default.vertical_slash else f"auto_m{mass:.2f}"
            pattern = build_pattern("auto", replace(default, vertical_slash=vs))
            out = torch.empty_like(q)
            estimate = lambda: pattern.estimate(q, k, scale=scale, softcap=None, kv_head_index=kv_head_index)  # noqa: E731
            index = estimate()
            computed = int(index.computed_pairs().sum())
            density = computed / (causal_pairs_total(length, length) * heads)
            flops = 4 * computed * head_dim
            est_ms = _bench(estimate)
            att_ms = _bench(lambda: pattern.attend(q, k, v, index, scale=scale, softcap=None,
                                                   kv_head_index=kv_head_index, out=out))
            rows.append(Row("estimation", provider, length, density, gpu, commit, est_ms, 0.0))
            if vs.heldout_recall is not None:  # the held-out recall check run() adds where heads are routed
                check_ms = _bench(lambda: pattern.unpredictable_heads(q, k, index, scale=scale, softcap=None,
                                                                      kv_head_index=kv_head_index))
                rows.append(Row("estimation", provider + "_heldout_check", length, density, gpu, commit, check_ms,
                                0.0))
            rows.append(Row("attention", "triton_vertical_slash" + provider[4:], length, density, gpu, commit, att_ms,
                            flops / att_ms / 1e9))
            rows.append(Row("estimation+attention", provider, length, density, gpu, commit, est_ms + att_ms,
                            flops / (est_ms + att_ms) / 1e9))
            print(rows[-1], flush=True)
            # The fused kernel on the same lines (no per-block index, no host read; the attention alone),
            # and the whole pattern.run as patch() runs it (estimate, index, index kernel by default).
            common = dict(scale=scale, softcap=None, kv_head_index=kv_head_index)
            lines = pattern.estimate_lines(q, k, **common)
            fused_ms = _bench(lambda: library.call_vertical_slash_lines(q, k, v, lines, window=None, out=out,
                                                                        lines_sorted=True, **common))
            run_ms = _bench(lambda: pattern.run(q, k, v, out=out, **common))
            rows.append(Row("attention", "triton_vertical_slash_lines" + provider[4:], length, density, gpu, commit,
                            fused_ms, flops / fused_ms / 1e9))
            rows.append(Row("estimation+attention", provider + "_run", length, density, gpu, commit, run_ms,
                            flops / run_ms / 1e9))
            print(rows[-1], flush=True)
    return rows


# The peers' rows. Line sets: what ``auto`` keeps on the structured input, and MInference's own fixed
# budget for its Llama-3 configs (1000 columns + 6096 diagonals, the best by the same estimate).
MINFERENCE_BUDGET = (1000, 6096)
# Query blocks checked against the fp32 reference before timing: first, middle, last full and the last.
PEER_CHECK_BLOCKS = 4
# bf16 outputs against an fp32 reference (the kernel tests' bf16 tolerance).
PEER_CHECK_ATOL = 1.6e-2


def _peer_line_sets(default) -> dict:
    from dataclasses import replace

    from ..kernels.mass_select.naive import KEEP_ALL_MASS

    vertical, slash = MINFERENCE_BUDGET
    budget = replace(default.vertical_slash, vertical_mass=KEEP_ALL_MASS, slash_mass=KEEP_ALL_MASS,
                     max_vertical=vertical, max_slash=slash)
    return {"auto": default.vertical_slash, f"budget{vertical}+{slash}": budget}


def run_peers(lengths, minference, heads=HEADS, kv_heads=KV_HEADS, head_dim=HEAD_DIM, gpu="", commit="",
              device="cuda") -> list[Row]:
    """Vertical-slash index conversion and attention, ours beside MInference's, on the same lines
    (``peers.minference_lines``) of the structured input. Each output is first checked against an fp32
    reference over the keys its own index lists (``PEER_CHECK_BLOCKS`` query blocks); a provider that
    fails the check is reported and not timed. Densities are each index's own computed pairs (the
    converters round diagonals to different key tiles). Lengths must be multiples of 64 (MInference)."""
    from ..config import SparseConfig
    from ..kernels import build_vertical_slash_index, library
    from ..patterns import VerticalSlashPattern
    from . import peers

    device = torch.device(device)
    scale = head_dim**-0.5
    kv_head_index = torch.arange(heads, device=device) // (heads // kv_heads)
    rows: list[Row] = []
    for length in lengths:
        if length % peers.MINFERENCE_BLOCK:
            raise ValueError(f"peer rows need lengths that are multiples of {peers.MINFERENCE_BLOCK}, got {length}")
        q, k, v = structured_qkv(heads, kv_heads, length, head_dim, device)
        k_rep, v_rep = (t.repeat_interleave(heads // kv_heads, 1).contiguous() for t in (k, v))
        total = causal_pairs_total(length, length) * heads
        n_blocks = length // peers.MINFERENCE_BLOCK
        blocks = torch.tensor(sorted({0, n_blocks // 2, n_blocks - 2, n_blocks - 1}), device=device)
        seqlens = torch.tensor([length], dtype=torch.int32, device=device)
        for name, vs_config in _peer_line_sets(SparseConfig()).items():
            pattern = VerticalSlashPattern(vs_config)
            lines = pattern.estimate_lines(q, k, scale=scale, softcap=None, kv_head_index=kv_head_index)
            args = (lines.vertical_index, lines.vertical_count, lines.slash_offset, lines.slash_count)
            build = lambda: build_vertical_slash_index(*args, q_len=length, k_len=length,  # noqa: E731
                                                       block_size_q=lines.block_size_q, slashes_sorted=True)
            index = build()
            out = torch.full_like(q, float("nan"))
            attend = lambda: library.call_vertical_slash(q, k, v, index, scale=scale, window=None,  # noqa: E731
                                                          softcap=None, kv_head_index=kv_head_index, out=out)
            v_idx, s_idx = peers.minference_lines(lines)
            convert = lambda: minference.convert(seqlens, v_idx, s_idx, length,  # noqa: E731
                                                 peers.MINFERENCE_BLOCK, peers.MINFERENCE_BLOCK)
            theirs = convert()
            their_attend = lambda: minference.attend(q, k_rep, v_rep, seqlens, *theirs, scale,  # noqa: E731
                                                     peers.MINFERENCE_BLOCK, peers.MINFERENCE_BLOCK)
            cases = (
                ("sparseprefill", index.block_size_q, build, attend, False,
                 peers.index_block_keys(index, blocks), int(index.computed_pairs().sum())),
                ("minference", peers.MINFERENCE_BLOCK, convert, their_attend, True,
                 peers.minference_block_keys(*theirs, blocks, length), int(peers.minference_pairs(*theirs, length).sum())),
            )
            for provider, block_q, index_fn, attend_fn, rounds_queries, keys, pairs in cases:
                produced = attend_fn()
                reference = peers.block_rows_reference(q, k, v, keys, blocks, block_q, scale, kv_head_index,
                                                       round_scaled_queries=rounds_queries)
                error = float((peers.gather_block_rows(produced, blocks, block_q) - reference).abs().max())
                label, density = f"{provider}:{name}", pairs / total
                if not error <= PEER_CHECK_ATOL:  # NaN fails too
                    print(f"{label} at {length}: max error {error:.3g} against the fp32 reference "
                          f"(tolerance {PEER_CHECK_ATOL}); not timed", file=sys.stderr)
                    continue
                index_ms, attend_ms = (bench_ms(fn, device, warmup=BENCH_WARMUP_MS, rep=BENCH_REP_MS)
                                       for fn in (index_fn, attend_fn))
                flops = 4 * pairs * head_dim
                rows.append(Row("vertical_slash_index", label, length, density, gpu, commit, index_ms, 0.0))
                rows.append(Row("vertical_slash_attention", label, length, density, gpu, commit, attend_ms,
                                flops / attend_ms / 1e9))
                print(f"{label:<34}{length:>8} density {density:.3f} max err {error:.2e} index {index_ms:.2f} ms "
                      f"attention {attend_ms:.2f} ms ({flops / attend_ms / 1e9:.0f} TFLOP/s)", flush=True)
    return rows


DEFAULT_AUTO_LENGTHS = [8192, 16384, 24576, 32768, 49152, 65536, 98304, 131072]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--lengths", type=int, nargs="+", default=[8192, 32768, 131072])
    parser.add_argument("--densities", type=float, nargs="+", default=[0.02, 0.05, 0.1, 0.2, 0.5])
    parser.add_argument("--auto-lengths", type=int, nargs="+", default=DEFAULT_AUTO_LENGTHS,
                        help="lengths of the auto (estimation + attention) vs dense rows: the crossover search")
    parser.add_argument("--minference-src", default=None, metavar="DIR",
                        help="unpacked minference sdist whose CUDA converter is compiled here (else an installed "
                             "minference is used if there is one)")
    parser.add_argument("--qk-from", default=None, metavar="MODEL",
                        help="time estimation + attention on this model's real post-RoPE q/k/v instead of synthetic "
                             "inputs (a Hugging Face path or id, or qwen2.5-coder / smollm2 / gemma3 offline), at "
                             "--lengths; writes real_qk.csv and real_qk.png")
    parser.add_argument("--qk-layers", type=int, nargs="+", default=None,
                        help="with --qk-from: the layers to capture (default: first, quarter, half, three "
                             "quarters, last)")
    parser.add_argument("--qk-configs", nargs="+", default=None, metavar="NAME",
                        help="with --qk-from: configurations to time (default: all of "
                             "sparseprefill.bench.real_qk.QK_CONFIGS)")
    parser.add_argument("--out", default=None, help="directory for kernels.csv and kernels.png")


def _run_real_qk(args: argparse.Namespace) -> int:
    from .plot import plot_beside_csv
    from .real_qk import QK_CONFIGS, plot_real_qk, run_real_qk

    configs = {name: QK_CONFIGS[name] for name in args.qk_configs} if args.qk_configs else None
    run_real_qk(args.qk_from, args.lengths, configs=configs, layers=args.qk_layers, out_dir=args.out)
    if args.out is not None:
        plot_beside_csv(plot_real_qk, args.out, "real_qk")
    return 0


def run_from_args(args: argparse.Namespace) -> int:
    if args.qk_from is None and (args.qk_layers or args.qk_configs):
        print("error: --qk-layers and --qk-configs need --qk-from MODEL", file=sys.stderr)
        return 2
    from .real_qk import QK_CONFIGS

    unknown = sorted(set(args.qk_configs or ()) - set(QK_CONFIGS))
    if unknown:
        print(f"error: --qk-configs {unknown} unknown; known: {sorted(QK_CONFIGS)}", file=sys.stderr)
        return 2
    if not torch.cuda.is_available():
        print("error: the kernel benchmark needs a CUDA GPU", file=sys.stderr)
        return 1
    if args.qk_from is not None:
        return _run_real_qk(args)
    if args.minference_src is not None and not Path(args.minference_src, "csrc").is_dir():
        print(f"error: --minference-src {args.minference_src} has no csrc/ (expected an unpacked minference sdist)",
              file=sys.stderr)
        return 2
    run(args.lengths, args.densities, out_dir=args.out, auto_lengths=args.auto_lengths,
        minference_src=args.minference_src)
    if args.out is not None:
        from .plot import plot_beside_csv, plot_kernel_speedups

        plot_beside_csv(plot_kernel_speedups, args.out, "kernels")
    return 0


def main(argv=None) -> int:
    from . import command_main

    return command_main(__doc__, add_arguments, run_from_args, argv)


if __name__ == "__main__":
    sys.exit(main())

