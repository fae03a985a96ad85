"""Fidelity of the sparse path, per layer and head, and of the whole model's next-token logits.

For every sparse-routed attention call (``patchers.inspect_prefill``):

- **recall**: the share of each query row's exact softmax mass on the keys the sparse index kept
  (``kernels.recall.index_recall``, blockwise; never an ``L x L`` matrix), averaged over rows;
- **output relative error**: ``||out_sparse - out_exact|| / ||out_exact||`` per head, with the exact
  output computed in fp32. Beside it, the **floor**: the same error of the unpatched model's
  attention (SDPA in the model's dtype), i.e. what dense itself is off by. A sparse error at the floor is as good as dense.

And for the model: KL(dense || sparse) and top-1 agreement of the next-token distributions over the
window's last positions, against the unpatched model on the same tokens.
"""

from __future__ import annotations

import math
import time
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import torch

from ..kernels import dense_attention
from ..kernels.common import default_kv_head_index
from .logits import DEFAULT_SCORED_POSITIONS, compare_logits, last_position_logits
from .perplexity import BUILTIN_TEXT, load_text, text_windows
from .report import Variant, applied, run_metadata, write_report_files

__all__ = ["FidelityOptions", "FidelityReport", "run_fidelity"]

DEFAULT_WINDOWS = 2
RECALL_QUANTILE = 0.05  # the report's "p5": the recall of the worst 5% of heads


@dataclass(frozen=True)
class FidelityOptions:
    """Attributes:
        lengths: window lengths in tokens.
        windows: windows per length (consecutive, from the start of the text).
        text: as for perplexity: ``builtin``, a prepared source, or a file.
        positions: last positions whose next-token distributions are compared.
    """

    lengths: tuple[int, ...] = (4096,)
    windows: int = DEFAULT_WINDOWS
    text: str = BUILTIN_TEXT
    positions: int = DEFAULT_SCORED_POSITIONS


def _dense_in_model_dtype(q, k, v, *, scale, softcap) -> torch.Tensor:
    """What the unpatched model computes: SDPA in the model's dtype. SDPA has no soft-cap, so capped
    layers fall back to fp32 exact attention rounded to the model's dtype (a lower floor)."""
    if softcap is None and q.shape[2] == k.shape[2]:
        return torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scale,
                                                                enable_gqa=q.shape[1] != k.shape[1])
    return dense_attention(q, k, v, scale=scale, softcap=softcap)[0]


class _HeadAccumulator:
    """Sums of per-(layer, head) recall and error over the calls of one (variant, length)."""

    def __init__(self) -> None:
        self.recall: dict[tuple[int, int], list[float]] = defaultdict(list)
        self.error: dict[tuple[int, int], list[float]] = defaultdict(list)
        self.floor: dict[tuple[int, int], list[float]] = defaultdict(list)

    def __call__(self, layer, q, k, v, out, selections, *, scale, softcap) -> None:
        from ..kernels.recall import index_recall

        hq, hkv = q.shape[1], k.shape[1]
        kv_of_head = default_kv_head_index(hq, hkv, q.device)
        exact, _ = dense_attention(q.float(), k.float(), v.float(), scale=scale, softcap=softcap)
        rounded = _dense_in_model_dtype(q, k, v, scale=scale, softcap=softcap)

        def relative(a: torch.Tensor) -> torch.Tensor:  # [H]: over batch, rows and channels
            diff = (a.float() - exact).pow(2).sum(dim=(0, 2, 3))
            return (diff / exact.pow(2).sum(dim=(0, 2, 3)).clamp_min(1e-30)).sqrt()

        error, floor = relative(out), relative(rounded)
        for heads, index in selections:
            head_ids = torch.tensor(heads, device=q.device)
            if index is None:
                recall = torch.ones(len(heads))
            else:
                (rows,) = index_recall([index], q[:, head_ids], k, scale=scale, softcap=softcap,
                                       kv_head_index=kv_of_head[head_ids])
                recall = rows.mean(dim=(0, 2)).cpu()
            for j, head in enumerate(heads):
                self.recall[layer, head].append(float(recall[j]))
                self.error[layer, head].append(float(error[head]))
                self.floor[layer, head].append(float(floor[head]))

    def means(self) -> dict[str, dict[tuple[int, int], float]]:
        return {name: {key: sum(vals) / len(vals) for key, vals in table.items()}
                for name, table in (("recall", self.recall), ("error", self.error), ("floor", self.floor))}


@dataclass
class FidelityReport:
    """Per (variant, length): per-head recall/error/floor and logit agreement per window."""

    model: str
    variants: list[Variant]
    rows: list[dict[str, Any]] = field(default_factory=list)
    meta: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {"format": "sparseprefill-eval", "version": 1, "kind": "fidelity", "model": self.model,
                "variants": [v.describe() for v in self.variants], "meta": self.meta, "rows": self.rows}

    def markdown(self) -> str:
        lines = [
            f"### fidelity: {self.model}",
            "",
            "recall = exact attention mass kept, mean over rows, then over sparse heads (p5: 5th percentile over "
            "heads); error = output relative error vs fp32 exact attention (floor: exact attention in the model's "
            "dtype); KL(dense || sparse) and top-1 agreement over the last positions' next-token distributions.",
            "",
            "| variant | length | density | recall mean | recall p5 | worst head (layer.head) | error mean | "
            "error max | floor mean | KL mean | KL max | top-1 |",
            "|---|---|---|---|---|---|---|---|---|---|---|---|",
        ]
        for r in self.rows:
            density = "-" if r["density"] is None else f"{r['density']:.3f}"
            lines.append(
                f"| {r['variant']} | {r['length']} | {density} | {r['recall_mean']:.4f} | {r['recall_p5']:.4f} | "
                f"{r['worst_head']} ({r['worst_recall']:.3f}) | {r['error_mean']:.4f} | {r['error_max']:.4f} | "
                f"{r['floor_mean']:.4f} | {r['kl_mean']:.2e} | {r['kl_max']:.2e} | {r['top1']:.4f} |")
        if self.meta.get("command"):
            lines += ["", f"Command: `{self.meta['command']}` (commit {self.meta.get('commit')}, "
                          f"{self.meta.get('device')}, {self.meta.get('dtype')})"]
        return "\n".join(lines) + "\n"

    def plot(self, path: str | Path) -> Path | None:
        """Layer x head maps of recall and output error at the longest length, one row per variant."""
        if not self.rows:
            return None
        from ..bench.plot import pyplot, save_figure

        plt = pyplot()

        longest = max(r["length"] for r in self.rows)
        picked = [r for r in self.rows if r["length"] == longest]
        fig, axes = plt.subplots(len(picked), 2, figsize=(10, 3.2 * len(picked)), squeeze=False)
        for (ax_recall, ax_error), row in zip(axes, picked):
            for ax, key, cmap, title in ((ax_recall, "recall", "viridis", "recall"),
                                         (ax_error, "error", "magma", "output relative error")):
                grid = torch.full((row["layers"], row["heads"]), math.nan)
                for (layer, head), value in ((tuple(map(int, k.split("."))), v) for k, v in row[key].items()):
                    grid[layer, head] = value
                image = ax.imshow(grid.numpy(), aspect="auto", cmap=cmap, interpolation="nearest")
                fig.colorbar(image, ax=ax)
                ax.set_title(f"{row['variant']} @ {longest}: {title}")
                ax.set_xlabel("query head")
                ax.set_ylabel("layer")
        return save_figure(fig, path, dpi=110)

    def write(self, out_dir: str | Path, stem: str = "fidelity", plot: bool = True) -> list[Path]:
        """Write ``<stem>.json``, ``<stem>.md`` and (with ``plot``) ``<stem>.png``; returns the paths."""
        return write_report_files(self, out_dir, stem, plot=plot)


def _summary(variant: str, length: int, means, density, comparisons, layers: int, heads: int) -> dict[str, Any]:
    recall = means["recall"]
    if not recall:
        raise RuntimeError(f"{variant} at {length}: no attention call ran sparse; lower min_sparse_len or use a "
                           "longer window")
    values = torch.tensor(list(recall.values()))
    worst = min(recall, key=recall.get)
    return {
        "variant": variant, "length": length, "density": density, "layers": layers, "heads": heads,
        "recall_mean": float(values.mean()), "recall_p5": float(torch.quantile(values, RECALL_QUANTILE)),
        "worst_head": f"{worst[0]}.{worst[1]}", "worst_recall": recall[worst],
        "error_mean": sum(means["error"].values()) / len(means["error"]), "error_max": max(means["error"].values()),
        "floor_mean": sum(means["floor"].values()) / len(means["floor"]),
        "kl_mean": sum(c.kl_mean for c in comparisons) / len(comparisons),
        "kl_max": max(c.kl_max for c in comparisons),
        "top1": sum(c.top1_agreement for c in comparisons) / len(comparisons),
        "windows": [c.to_dict() for c in comparisons],
        **{name: {f"{l}.{h}": v for (l, h), v in table.items()} for name, table in means.items()},
    }


def run_fidelity(
    model: Any,
    tokenizer: Any,
    variants: Sequence[Variant],
    options: FidelityOptions = FidelityOptions(),
    *,
    model_name: str = "model",
    progress: bool = True,
) -> FidelityReport:
    """Measure every sparse variant against exact attention and the dense model on the same windows."""
    from tqdm.auto import tqdm

    from ..patchers import inspect_prefill

    sparse_variants = [v for v in variants if not v.is_dense]
    if not sparse_variants:
        raise ValueError("fidelity needs at least one sparse variant")
    start = time.perf_counter()
    text = load_text(options.text)
    windows = {length: text_windows(tokenizer, text, length, options.windows) for length in options.lengths}
    dense_logits = {}
    total = (1 + len(sparse_variants)) * options.windows * len(options.lengths)
    report = FidelityReport(model=model_name, variants=[Variant("dense"), *sparse_variants])
    config = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
    layers, heads = config.num_hidden_layers, config.num_attention_heads
    with tqdm(total=total, desc="fidelity", unit="window", disable=not progress) as bar:
        for length, items in windows.items():
            for index, ids in enumerate(items):
                dense_logits[length, index] = last_position_logits(model, ids, options.positions)[0].cpu()
                bar.update(1)
        for variant in sparse_variants:
            with applied(model, variant) as meter:
                for length, items in windows.items():
                    accumulator = _HeadAccumulator()
                    comparisons = []
                    meter.reset()
                    for index, ids in enumerate(items):
                        with inspect_prefill(model, accumulator), torch.inference_mode():
                            sparse = last_position_logits(model, ids, options.positions)[0].cpu()
                        comparisons.append(compare_logits(dense_logits[length, index], sparse))
                        bar.update(1)
                    density, _ = meter.read()
                    report.rows.append(_summary(variant.name, length, accumulator.means(), density, comparisons,
                                                layers, heads))
    report.meta = run_metadata(model) | {
        "seconds": round(time.perf_counter() - start, 1),
        "fidelity": {"text": options.text, "lengths": list(options.lengths), "windows": options.windows,
                     "positions": options.positions},
    }
    return report
