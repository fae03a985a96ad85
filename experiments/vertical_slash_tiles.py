"""Stage-by-stage GPU timing of the vertical-slash (``auto``) path on structured synthetic input, and
(``--sweep``) the attention kernel under several Triton tile sizes.

Prints one line per stage (line scores, selection, compaction, index conversion, attention) with
``triton.testing.do_bench`` medians, plus the kept line counts and the density, so the slowest stage
is visible. ``--sweep`` launches the vertical-slash kernel with each ``(BLOCK_M, RANGE_N, COLUMN_N,
warps, stages)`` of ``SWEEP_TILES`` (the sweep behind ``VERTICAL_SLASH_KEY_TILE`` in
``sparseprefill/kernels/vertical_slash/triton_attention.py``). On the GPU machine:

    python experiments/vertical_slash_tiles.py --lengths 32768 131072
    python experiments/vertical_slash_tiles.py --lengths 32768 131072 --block-sizes 64 --sweep
"""

from __future__ import annotations

import argparse

import torch
import triton

from sparseprefill.bench.kernels import structured_qkv
from sparseprefill.config import SparseConfig
from sparseprefill.kernels import build_vertical_slash_index, keep_by_cumulative_mass, vertical_slash_scores
from sparseprefill.kernels.common import compact
from sparseprefill.kernels.geometry import causal_pairs_total
from sparseprefill.kernels.vertical_slash.naive import build_vertical_slash_index_naive


def _only(index, keep: str):
    """The index with its columns (keep="range") or its ranges (keep="column") removed."""
    from dataclasses import replace

    if keep == "range":
        return replace(index, column_count=torch.zeros_like(index.column_count), block_pairs=None)
    return replace(index, range_count=torch.zeros_like(index.range_count), block_pairs=None)


def _first_head_of_group(index, group: int):
    from dataclasses import replace

    def pick(t):
        return t[:, ::group].repeat_interleave(group, dim=1).contiguous()

    return replace(index, range_count=pick(index.range_count), range_start=pick(index.range_start),
                   range_end=pick(index.range_end), column_count=pick(index.column_count),
                   column_index=pick(index.column_index), block_pairs=None)


# (BLOCK_M, RANGE_N, COLUMN_N, num_warps, num_stages) for head_dim 128, bf16, 64-row index blocks.
SWEEP_TILES = [(64, 64, 64, 4, 3), (64, 32, 64, 4, 3), (64, 32, 128, 4, 3), (64, 64, 128, 4, 2),
               (64, 32, 64, 4, 4), (64, 64, 64, 4, 4), (64, 32, 32, 4, 3), (64, 64, 64, 8, 3), (64, 128, 128, 8, 2)]


def _attend_with_tiles(q, k, v, index, *, scale, kv_head_index, out, tiles):
    """``vertical_slash_attention_triton`` (no window, no soft-cap) launched with the given
    ``(BLOCK_M, RANGE_N, COLUMN_N, num_warps, num_stages)`` instead of the launcher's tile policy."""
    from sparseprefill.kernels.vertical_slash.triton_attention import (
        _vertical_slash_fwd_kernel,
        vertical_slash_tile_sizes,
    )

    block_m, range_n, column_n, num_warps, num_stages = tiles
    b, hq, q_len, head_dim = q.shape
    k_len = k.shape[2]
    block_d = vertical_slash_tile_sizes(head_dim, index.block_size_q, q.element_size())[5]
    grid = (index.range_count.shape[2] * (index.block_size_q // block_m), b * hq)
    _vertical_slash_fwd_kernel[grid](
        q, k, v, out, index.range_count, index.range_start, index.range_end, index.column_count,
        index.column_index, kv_head_index.to(torch.int32), k, v, index.column_count,  # unread: TMA descriptors, cover
        *q.stride(), *k.stride(), *v.stride(), *out.stride(),
        *index.range_count.stride(), *index.range_start.stride(),
        *index.column_count.stride(), *index.column_index.stride(),
        hq, q_len, k_len, k_len - q_len, index.range_start.shape[-1],
        float(scale), 1.0, 0,
        HEAD_DIM=head_dim, BLOCK_D=block_d, BLOCK_M=block_m, RANGE_N=range_n, COLUMN_N=column_n,
        BLOCK_Q=index.block_size_q, HAS_WINDOW=False, HAS_SOFTCAP=False, UPCAST=q.dtype == torch.float32,
        COLUMN_STAGES=num_stages, num_warps=num_warps, num_stages=num_stages,
    )
    return out


def _sweep_tiles(attend_with, flops: float) -> None:
    """Time ``attend_with(tiles)`` for every tile config of ``SWEEP_TILES``."""
    for block_m, range_n, column_n, warps, stages in SWEEP_TILES:
        try:
            ms = triton.testing.do_bench(lambda: attend_with((block_m, range_n, column_n, warps, stages)))
            print(f"  tiles M{block_m} range{range_n} col{column_n} w{warps} s{stages}: {ms:8.3f} ms "
                  f"{flops / ms / 1e9:5.0f} TFLOP/s", flush=True)
        except Exception as exc:  # an out-of-resources config is a result, not a failure
            print(f"  tiles M{block_m} range{range_n} col{column_n} w{warps} s{stages}: failed {type(exc).__name__}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--lengths", type=int, nargs="+", default=[32768, 131072])
    parser.add_argument("--block-sizes", type=int, nargs="+", default=[64, 128])
    parser.add_argument("--sweep", action="store_true", help="time the attention kernel under several tile configs")
    args = parser.parse_args()
    heads, kv_heads, head_dim = 32, 8, 128
    device = torch.device("cuda")
    kv_head_index = torch.arange(heads, device=device) // (heads // kv_heads)
    scale = head_dim**-0.5
    for length in args.lengths:
        q, k, v = structured_qkv(heads, kv_heads, length, head_dim, device)
        for block in args.block_sizes:
            config = SparseConfig()
            cfg = config.vertical_slash.__class__(**{**config.vertical_slash.__dict__, "block_size": block})
            t = {}
            scores = lambda: vertical_slash_scores(q, k, scale=scale, last_queries=cfg.last_queries,  # noqa: E731
                                                   softcap=None, kv_head_index=kv_head_index)
            vertical, slash = scores()
            t["line scores"] = triton.testing.do_bench(scores)
            lines = torch.arange(length, device=device)
            valid = torch.ones_like(vertical, dtype=torch.bool)
            sink = (lines < cfg.sink_tokens).expand_as(valid)
            local = (lines < cfg.local_tokens).expand_as(valid)
            sel_v = lambda: keep_by_cumulative_mass(vertical, valid, sink, cfg.vertical_mass)  # noqa: E731
            sel_s = lambda: keep_by_cumulative_mass(slash, valid, local, cfg.slash_mass)  # noqa: E731
            keep_v, keep_s = sel_v(), sel_s()
            t["select vertical"] = triton.testing.do_bench(sel_v)
            t["select slash"] = triton.testing.do_bench(sel_s)
            t["compact both"] = triton.testing.do_bench(lambda: (compact(keep_v), compact(keep_s)))
            (vc, vi), (sc, so) = compact(keep_v), compact(keep_s)
            conv = lambda: build_vertical_slash_index(vi, vc, so, sc, q_len=length, k_len=length,  # noqa: E731
                                                      block_size_q=block)
            index = conv()
            t["index conversion"] = triton.testing.do_bench(conv)
            if length <= 32768:  # the naive converter's [B, H, blocks, lines] buffers grow too big beyond
                expected = build_vertical_slash_index_naive(vi, vc, so, sc, q_len=length, k_len=length,
                                                            block_size_q=block)
                print(f"  index matches naive: {index.lists_same_entries(expected)}")
            from sparseprefill.patterns.vertical_slash import VerticalSlashPattern
            pattern = VerticalSlashPattern(cfg)
            out = torch.empty_like(q)
            t["attention"] = triton.testing.do_bench(lambda: pattern.attend(
                q, k, v, index, scale=scale, softcap=None, kv_head_index=kv_head_index, out=out))
            computed = index.computed_pairs().sum()
            for part, keep in (("ranges only", "range"), ("columns only", "column")):
                parted = _only(index, keep)
                share = float(parted.computed_pairs().sum() / computed)
                ms = triton.testing.do_bench(lambda: pattern.attend(
                    q, k, v, parted, scale=scale, softcap=None, kv_head_index=kv_head_index, out=out))
                t[f"attention {part}"] = ms
                print(f"  {part}: {share:.2f} of computed pairs, "
                      f"{4 * head_dim * float(parted.computed_pairs().sum()) / ms / 1e9:.0f} TFLOP/s")
            # GQA: the same index for every query head of a KV group (what per-group selection would give).
            group = heads // kv_heads
            shared = _first_head_of_group(index, group)
            t["attention, index shared per KV group"] = triton.testing.do_bench(lambda: pattern.attend(
                q, k, v, shared, scale=scale, softcap=None, kv_head_index=kv_head_index, out=out))
            print(f"  shared-index TFLOP/s "
                  f"{4 * head_dim * float(shared.computed_pairs().sum()) / t['attention, index shared per KV group'] / 1e9:.0f}")
            if args.sweep:
                _sweep_tiles(lambda tiles: _attend_with_tiles(q, k, v, index, scale=scale, kv_head_index=kv_head_index,
                                                              out=out, tiles=tiles),
                             4 * head_dim * float(computed))
            t["estimate() total"] = triton.testing.do_bench(lambda: pattern.estimate(
                q, k, scale=scale, softcap=None, kv_head_index=kv_head_index))
            density = int(index.computed_pairs().sum()) / (causal_pairs_total(length, length) * heads)
            print(f"L={length} block={block} density={density:.3f} verticals mean/max "
                  f"{vc.float().mean():.0f}/{int(vc.max())} slashes mean/max {sc.float().mean():.0f}/{int(sc.max())} "
                  f"ranges max {int(index.range_count.max())} columns max {int(index.column_count.max())}")
            for name, ms in t.items():
                print(f"  {name:<20}{ms:9.3f} ms")
            dense = triton.testing.do_bench(lambda: torch.nn.functional.scaled_dot_product_attention(
                q, k, v, is_causal=True, enable_gqa=True))
            print(f"  {'sdpa default':<20}{dense:9.3f} ms", flush=True)


if __name__ == "__main__":
    main()
