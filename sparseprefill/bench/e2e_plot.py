"""PNG of end-to-end benchmark rows (``bench/e2e.py``; matplotlib, optional dependency).

    python -m sparseprefill.bench.e2e_plot results/e2e.csv --out results/e2e.png
"""

from __future__ import annotations

import csv
from collections import defaultdict
from pathlib import Path

from .plot import plot_command, pyplot, save_figure

BASELINE = "dense_cudnn"


def _float(text: str) -> float:
    try:
        return float(text)
    except (TypeError, ValueError):
        return float("nan")


def plot_e2e(csv_path: str | Path, png_path: str | Path) -> Path:
    """Left: prefill TTFT speedup over dense cuDNN vs length (line at 1.0), one line per (config,
    variant, density target), points labelled with the measured density. Middle: TTFT in ms.
    Right: peak memory of the prefill."""
    plt = pyplot()
    with open(csv_path, newline="") as f:
        rows = [r for r in csv.DictReader(f) if r["op"] == "e2e_ttft"]
    series: dict[tuple[str, str, str], list[tuple[int, float, float, float, float]]] = defaultdict(list)
    for r in rows:
        ms = _float(r["ms"])
        if ms != ms:
            continue
        key = (r["config"], r["variant"], r["density_target"])
        series[key].append((int(r["length"]), _float(r["speedup_vs_dense_cudnn"]), ms, _float(r["peak_gib"]),
                            _float(r["density"])))
    fig, (speed_axis, ms_axis, mem_axis) = plt.subplots(1, 3, figsize=(18, 4.8))
    styles = {"dense_cudnn": "-o", "dense_flash": "--s", "sparse": "-^"}
    for (config, variant, target), points in sorted(series.items()):
        points.sort()
        lengths = [p[0] for p in points]
        label = f"{config} {variant}" + (f" (target {target})" if target else "")
        style = styles.get(variant, "-x")
        speed_axis.plot(lengths, [p[1] for p in points], style, label=label)
        ms_axis.plot(lengths, [p[2] for p in points], style, label=label)
        mem_axis.plot(lengths, [p[3] for p in points], style, label=label)
        if variant == "sparse":
            for length, speedup, _, _, density in points:
                speed_axis.annotate(f"{density:.2f}", (length, speedup), fontsize=6, textcoords="offset points",
                                    xytext=(0, 4))
    speed_axis.axhline(1.0, color="gray", lw=0.8)
    speed_axis.set(xscale="log", xlabel="prompt length (tokens)", ylabel=f"TTFT speedup over {BASELINE}",
                   title="prefill TTFT speedup (labels: measured density)")
    ms_axis.set(xscale="log", yscale="log", xlabel="prompt length (tokens)", ylabel="TTFT (ms, median)",
                title="prefill time to first token")
    mem_axis.set(xscale="log", xlabel="prompt length (tokens)", ylabel="peak GiB", title="prefill peak memory")
    lengths = sorted({int(r["length"]) for r in rows})
    for axis in (speed_axis, ms_axis, mem_axis):
        if lengths:
            axis.set_xticks(lengths, [f"{n // 1024}K" if n % 1024 == 0 else str(n) for n in lengths])
            axis.minorticks_off()
    if series:
        speed_axis.legend(fontsize=7)
    first = rows[0] if rows else {}
    fig.suptitle(f"{first.get('gpu', '?')}, torch {first.get('torch', '?')}, transformers "
                 f"{first.get('transformers', '?')}, commit {first.get('commit', '?')}: end-to-end prefill, "
                 f"random weights, fixed sparse budget")
    return save_figure(fig, png_path)


def main(argv=None) -> None:
    plot_command(plot_e2e, "plot end-to-end benchmark CSV rows", argv)


if __name__ == "__main__":
    main()
