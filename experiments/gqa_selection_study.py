"""GQA: should vertical-slash select its lines per query head or once per KV group?

In a GQA model several query heads share one KV head. The default estimator (``auto`` =
vertical-slash) selects columns and diagonals per query head. Sharing one selection across the
query heads of a KV group would let a kernel load each K/V tile once per group, but a head whose
lines differ from its siblings' may lose attention mass. This script measures that loss on real
SmolLM2-135M-Instruct q/k (9 query heads, 3 KV heads) with three variants, on the same layers and
input:

    per_head     ``VerticalSlashPattern(VerticalSlashConfig())`` as is (current behaviour).
    group_mean   line scores averaged over the group's heads, then one cumulative-mass selection
                 (sink columns / local diagonals forced), shared by every head of the group.
    group_union  each head selects as in ``per_head``; the group keeps the union of their lines.

Each variant runs at the default mass target (0.95, vertical and slash) and at 0.90 and 0.98, so
that besides equal-mass numbers the variants can be compared at matched recall or density.

Per head it reports the attention-mass recall (share of the exact softmax mass of each query row
that the selected keys hold) and density (computed pairs / causal pairs). The q/k capture and the
recall computation are those of ``experiments/estimator_study.py`` (repeated here).

Reproduce (about 16 min on 2 CPU cores: 4.5 min capture, then ~10 s per variant and layer):

    python experiments/gqa_selection_study.py --length 8192 \\
        --out benchmarks/results/gqa_selection_smollm2.json
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import pathlib
import time

import torch

import sparseprefill
from sparseprefill import SparseConfig, VerticalSlashConfig
from sparseprefill.evals.logits import reference_input_ids
from sparseprefill.kernels import build_vertical_slash_index, keep_by_cumulative_mass, vertical_slash_scores
from sparseprefill.kernels.common import compact, qk_scores
from sparseprefill.kernels.geometry import causal_pairs_total
from sparseprefill.kernels.indices import VerticalSlashIndex
from sparseprefill.evals.offline_models import load_smollm2
from sparseprefill.patchers import observe_prefill
from sparseprefill.patterns.vertical_slash import VerticalSlashPattern

DEFAULT_LAYERS = [0, 3, 7, 11, 15, 19, 23, 27, 29]
DEFAULT_OUT = "benchmarks/results/gqa_selection_smollm2.json"
# 0.95 is the default config; 0.90 and 0.98 trace each variant's recall/density trade-off, so the
# variants can also be compared at matched recall or matched density, not only at equal mass.
DEFAULT_MASSES = [0.90, 0.95, 0.98]


def capture(model, ids):
    """Post-RoPE (q, k, scale) of every layer, in layer order, from one dense-equivalent forward (the
    capture of ``experiments/estimator_study.py``)."""
    got = []

    def observer(layer, q, k, *, scale, softcap=None):
        got.append((q.detach().clone(), k.detach().clone(), scale))

    sparseprefill.patch(model, SparseConfig.keep_everything(pattern="dense"))
    try:
        with observe_prefill(model, observer), torch.no_grad():
            model(ids, logits_to_keep=1)
    finally:
        sparseprefill.unpatch(model)
    return got


def recall_of(mask_fn, q, k, scale, chunk=1024):
    """Per-row recall ``[H, L]`` of the selection ``mask_fn(row0, row1) -> bool [H, row1 - row0, Lk]``
    (the recall of ``experiments/estimator_study.py``): exact attention in query chunks of ``chunk``."""
    num_heads, length = q.shape[1], q.shape[2]
    kv_head_index = torch.arange(num_heads) // (num_heads // k.shape[1])
    recall = torch.empty(num_heads, length)
    for row0 in range(0, length, chunk):
        row1 = min(length, row0 + chunk)
        scores = qk_scores(q[:, :, row0:row1], k, kv_head_index, scale)[0]
        causal = torch.arange(length)[None, :] <= torch.arange(row0, row1)[:, None]
        probs = torch.softmax(scores.masked_fill(~causal, float("-inf")), -1)
        recall[:, row0:row1] = (probs * mask_fn(row0, row1)).sum(-1)
    return recall


class KVGroupVerticalSlashPattern(VerticalSlashPattern):
    """Vertical-slash with one line selection per KV group, shared by all query heads of the group.

    ``combine="mean_scores"``: average the heads' vertical and slash scores, then select once.
    ``combine="union"``: every head selects on its own scores, the group keeps the union.
    The returned index still has one entry per query head (the group's index repeated), so it is a
    drop-in replacement for the per-head index.
    """

    COMBINES = ("mean_scores", "union")

    def __init__(self, config: VerticalSlashConfig, combine: str):
        super().__init__(config)
        if combine not in self.COMBINES:
            raise ValueError(f"combine must be one of {self.COMBINES}, got {combine!r}")
        self.combine = combine

    def _keep_lines(self, scores, always_kept_lines, mass, max_count):
        """The selection rule of ``VerticalSlashPattern.estimate``: ``[B, H, Lk]`` -> bool keep mask."""
        lines = torch.arange(scores.shape[-1], device=scores.device)
        valid = torch.ones_like(scores, dtype=torch.bool)
        forced = (lines < always_kept_lines).expand_as(valid)
        return keep_by_cumulative_mass(scores, valid, forced, mass, max_count=max_count)

    def _group_keep(self, scores, kv_groups, kv_head_index, always_kept_lines, mass, max_count):
        """Per-head scores ``[B, Hq, Lk]`` -> per-group keep mask ``[B, Hkv, Lk]``."""
        members = [kv_head_index == group for group in kv_groups]
        if self.combine == "mean_scores":
            group_scores = torch.stack([scores[:, heads].mean(dim=1) for heads in members], dim=1)
            return self._keep_lines(group_scores, always_kept_lines, mass, max_count)
        head_keep = self._keep_lines(scores, always_kept_lines, mass, max_count)
        return torch.stack([head_keep[:, heads].any(dim=1) for heads in members], dim=1)

    def estimate(self, q, k, *, scale, softcap, kv_head_index) -> VerticalSlashIndex:
        cfg = self.config
        q_len, k_len = q.shape[2], k.shape[2]
        vertical, slash = vertical_slash_scores(
            q, k, scale=scale, last_queries=cfg.last_queries, softcap=softcap, kv_head_index=kv_head_index
        )
        kv_groups = torch.unique(kv_head_index)  # sorted
        keep_vertical = self._group_keep(
            vertical, kv_groups, kv_head_index, cfg.sink_tokens, cfg.vertical_mass, cfg.max_vertical
        )
        keep_slash = self._group_keep(
            slash, kv_groups, kv_head_index, cfg.local_tokens, cfg.slash_mass, cfg.max_slash
        )
        vertical_count, vertical_index = compact(keep_vertical)
        slash_count, slash_offset = compact(keep_slash)
        group_index = build_vertical_slash_index(
            vertical_index, vertical_count, slash_offset, slash_count,
            q_len=q_len, k_len=k_len, block_size_q=cfg.block_size,
        )
        return expand_to_query_heads(group_index, torch.searchsorted(kv_groups, kv_head_index))


def expand_to_query_heads(group_index: VerticalSlashIndex, group_of_head: torch.Tensor) -> VerticalSlashIndex:
    """Repeat a per-KV-group index along the head dim: query head h gets group ``group_of_head[h]``."""
    tensor_fields = {
        field.name: getattr(group_index, field.name).index_select(1, group_of_head)
        for field in dataclasses.fields(group_index)
        if isinstance(getattr(group_index, field.name), torch.Tensor)
    }
    return dataclasses.replace(group_index, **tensor_fields)


def variants(masses) -> dict[str, VerticalSlashPattern]:
    """Every variant at every mass target (vertical and slash alike), named e.g. ``group_mean_m95``."""
    patterns = {}
    for mass in masses:
        config = VerticalSlashConfig(vertical_mass=mass, slash_mass=mass)
        suffix = f"_m{round(mass * 100)}"
        patterns["per_head" + suffix] = VerticalSlashPattern(config)
        patterns["group_mean" + suffix] = KVGroupVerticalSlashPattern(config, combine="mean_scores")
        patterns["group_union" + suffix] = KVGroupVerticalSlashPattern(config, combine="union")
    return patterns


def measure_layer(pattern, q, k, scale, recall_of):
    """Per-head recall mean, recall p5 and density of one pattern on one layer's q/k."""
    num_heads, length = q.shape[1], q.shape[2]
    kv_head_index = torch.arange(num_heads) // (num_heads // k.shape[1])
    index = pattern.estimate(q, k, scale=scale, softcap=None, kv_head_index=kv_head_index)
    selected = index.to_dense_mask()[0]  # [H, L, L] bool
    recall = recall_of(lambda row0, row1: selected[:, row0:row1], q, k, scale)
    density = index.computed_pairs()[0].float() / causal_pairs_total(length, length)
    return {
        "recall_mean": recall.mean(-1).tolist(),
        "recall_p5": recall.quantile(0.05, dim=-1).tolist(),
        "density": density.tolist(),
    }


def summarize(rows):
    recall_mean = torch.tensor([row["recall_mean"] for row in rows])
    recall_p5 = torch.tensor([row["recall_p5"] for row in rows])
    density = torch.tensor([row["density"] for row in rows])
    return {
        "recall_mean": recall_mean.mean().item(),
        "recall_p5_mean": recall_p5.mean().item(),
        "recall_p5_min": recall_p5.min().item(),
        "density": density.mean().item(),
    }


def markdown_table(summary):
    lines = [
        "| variant | recall mean | per-head p5 recall (mean) | per-head p5 recall (min) | density |",
        "|---|---|---|---|---|",
    ]
    for name, stats in summary.items():
        lines.append(
            f"| {name} | {stats['recall_mean']:.4f} | {stats['recall_p5_mean']:.4f} "
            f"| {stats['recall_p5_min']:.4f} | {stats['density']:.4f} |"
        )
    return "\n".join(lines)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--length", type=int, default=8192)
    parser.add_argument("--layers", type=int, nargs="*", default=DEFAULT_LAYERS)
    parser.add_argument(
        "--masses", type=float, nargs="+", default=DEFAULT_MASSES,
        help="vertical/slash mass targets; the default config's is 0.95, the others compare at matched recall",
    )
    parser.add_argument("--out", default=DEFAULT_OUT)
    args = parser.parse_args()
    torch.set_num_threads(2)
    started = time.time()

    model, tokenizer = load_smollm2()
    input_ids = reference_input_ids(tokenizer, args.length)
    layer_qk = capture(model, input_ids)
    del model
    layer_qk = {layer: layer_qk[layer] for layer in args.layers}  # free the layers not studied
    print(f"captured q/k at length {args.length} in {time.time() - started:.0f}s", flush=True)

    patterns = variants(args.masses)
    per_layer = {name: [] for name in patterns}
    for layer in args.layers:
        q, k, scale = layer_qk.pop(layer)
        for name, pattern in patterns.items():
            layer_started = time.time()
            stats = measure_layer(pattern, q, k, scale, recall_of)
            per_layer[name].append({"layer": layer, **stats})
            print(
                f"layer {layer:2d} {name:16s} recall mean {sum(stats['recall_mean']) / len(stats['recall_mean']):.4f}"
                f"  p5 min over heads {min(stats['recall_p5']):.3f}"
                f"  density {sum(stats['density']) / len(stats['density']):.3f}"
                f"  ({time.time() - layer_started:.0f}s, {time.time() - started:.0f}s total)",
                flush=True,
            )

    summary = {name: summarize(rows) for name, rows in per_layer.items()}
    wall_s = time.time() - started
    out = pathlib.Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    result = {
        "model": "SmolLM2-135M-Instruct",
        "length": args.length,
        "layers": args.layers,
        "masses": args.masses,
        "config_other_than_mass": dataclasses.asdict(VerticalSlashConfig()),
        "wall_s": round(wall_s, 1),
        "summary": summary,
        "per_layer": per_layer,
    }
    out.write_text(json.dumps(result, indent=1) + "\n")
    print(f"\nlength {args.length}, layers {args.layers}, wall {wall_s:.0f}s; wrote {out}\n")
    print(markdown_table(summary))


if __name__ == "__main__":
    main()
