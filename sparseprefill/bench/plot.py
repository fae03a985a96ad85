"""PNG plots from benchmark CSV rows (matplotlib, optional dependency).

    python -m sparseprefill.bench.plot benchmarks/results/kernels_h200.csv --out benchmarks/results/kernels_h200.png
"""

from __future__ import annotations

import argparse
import csv
import sys
from collections import defaultdict
from pathlib import Path
from typing import Callable

DENSE_BASELINE = "sdpa_cudnn"


class MissingPlotterError(RuntimeError):
    """matplotlib is not installed: commands that have already written their results skip the PNG."""


def pyplot():
    """matplotlib's pyplot on the file-only Agg backend, or a RuntimeError saying how to install it."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as error:
        raise MissingPlotterError("plotting needs matplotlib: pip install matplotlib") from error
    return plt


def save_figure(fig, png_path: str | Path, dpi: int = 110) -> Path:
    """Lay out, write (creating the folder) and close ``fig``; returns the PNG path."""
    fig.tight_layout()
    png_path = Path(png_path)
    png_path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(png_path, dpi=dpi)
    pyplot().close(fig)
    return png_path


def plot_beside_csv(plot: Callable[[Path, Path], Path], out_dir: str | Path, stem: str) -> None:
    """After a benchmark wrote ``<out_dir>/<stem>.csv``: print it and its PNG. Without matplotlib the CSV
    is the result and the plot is skipped with a note (benchmarks run where plotting may be missing)."""
    csv_path = Path(out_dir) / f"{stem}.csv"
    print(csv_path)
    try:
        print(plot(csv_path, Path(out_dir) / f"{stem}.png"))
    except RuntimeError as error:
        print(f"no plot: {error}", file=sys.stderr)


def plot_command(plot: Callable[[str, str], Path], description: str, argv=None) -> None:
    """``python -m ...plot CSV --out PNG``: the command line of every benchmark plot."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("csv")
    parser.add_argument("--out", required=True)
    args = parser.parse_args(argv)
    print(plot(args.csv, args.out))


def plot_kernel_speedups(csv_path: str | Path, png_path: str | Path) -> Path:
    """Left: speedup over cuDNN dense vs density, one line per (provider, length), random indices.
    Middle: TFLOP/s on computed pairs vs density, with the dense backends as horizontal references.
    Third: the ``auto`` pattern end to end (estimation + attention) on structured input, speedup over
    cuDNN vs length, one line per mass target, each point labelled with its density.
    Right (when the run had a peer): vertical-slash index conversion and attention, ours beside
    MInference's on the same lines, ms per (length, line set)."""
    plt = pyplot()
    with open(csv_path, newline="") as f:
        rows = list(csv.DictReader(f))
    dense_ms = {int(r["length"]): float(r["ms"]) for r in rows if r["provider"] == DENSE_BASELINE}
    series = defaultdict(list)
    dense_tflops = defaultdict(dict)
    end_to_end = defaultdict(list)
    peer_ms = defaultdict(dict)
    for r in rows:
        if r["op"].startswith("vertical_slash_"):
            provider, _, lines = r["provider"].partition(":")
            peer_ms[(int(r["length"]), lines)][f"{provider} {r['op'][len('vertical_slash_'):]}"] = float(r["ms"])
            continue
        length, provider = int(r["length"]), r["provider"]
        if r["op"] == "attention" and provider.startswith("sdpa"):
            dense_tflops[provider][length] = float(r["tflops"])
        elif r["op"] == "attention" and length in dense_ms and not provider.startswith("triton_vertical_slash"):
            series[(provider, length)].append((float(r["density"]), dense_ms[length] / float(r["ms"]),
                                               float(r["tflops"])))
        elif r["op"] == "estimation+attention" and provider.startswith("auto") and length in dense_ms:
            end_to_end[provider].append((length, dense_ms[length] / float(r["ms"]), float(r["density"])))
    panels = 4 if peer_ms else 3
    fig, axes = plt.subplots(1, panels, figsize=(6 * panels, 4.5))
    left, right, auto_axis = axes[:3]
    styles = {"triton_block_sparse": "-o", "flex_attention": "--s", "triton_vertical_slash": ":^"}
    for (provider, length), points in sorted(series.items()):
        points.sort()
        density, speedup, tflops = zip(*points)
        label = f"{provider} {length // 1024}K"
        left.plot(density, speedup, styles.get(provider, "-x"), label=label)
        right.plot(density, tflops, styles.get(provider, "-x"), label=label)
    left.axhline(1.0, color="gray", lw=0.8)
    left.set(xscale="log", yscale="log", xlabel="density (computed / causal pairs)",
             ylabel=f"speedup over {DENSE_BASELINE}", title="attention time vs cuDNN dense")
    for provider, by_length in dense_tflops.items():
        for length, value in by_length.items():
            right.axhline(value, lw=0.6, color="black" if provider == DENSE_BASELINE else "gray", ls=":")
    right.set(xscale="log", xlabel="density", ylabel="TFLOP/s on computed pairs",
              title="throughput (dotted: dense SDPA cuDNN / flash)")
    density_ticks = [0.01, 0.02, 0.05, 0.1, 0.2, 0.5]
    for axis in (left, right):
        axis.set_xticks(density_ticks, [f"{t:g}" for t in density_ticks])
        axis.minorticks_off()
    speed_ticks = [1, 2, 5, 10, 20, 50]
    left.set_yticks(speed_ticks, [f"{t:g}x" for t in speed_ticks])
    for provider, points in sorted(end_to_end.items()):
        points.sort()
        lengths, speedup, density = zip(*points)
        auto_axis.plot(lengths, speedup, "-o", label=provider)
        for x, y, d in points:
            auto_axis.annotate(f"{d:.2f}", (x, y), fontsize=6, textcoords="offset points", xytext=(0, 4))
    auto_axis.axhline(1.0, color="gray", lw=0.8)
    auto_axis.set(xscale="log", xlabel="length (tokens)", ylabel=f"speedup over {DENSE_BASELINE}",
                  title="auto: estimation + attention (labels: density)")
    if end_to_end:
        auto_axis.legend(fontsize=7)
    if peer_ms:
        _plot_peer_bars(axes[3], peer_ms)
    gpu = rows[0]["gpu"] if rows else "?"
    commit = rows[0]["commit"] if rows else "?"
    fig.suptitle(f"{gpu}, commit {commit}: 32 q / 8 kv heads, head_dim 128, bf16, causal")
    left.legend(fontsize=7, ncol=2)
    return save_figure(fig, png_path)


def _plot_peer_bars(axis, peer_ms: dict) -> None:
    cases = sorted(peer_ms)
    series = sorted({name for by_name in peer_ms.values() for name in by_name})
    width = 0.8 / max(len(series), 1)
    for i, name in enumerate(series):
        values = [peer_ms[case].get(name, 0.0) for case in cases]
        axis.bar([c + i * width for c in range(len(cases))], values, width, label=name)
    axis.set_xticks([c + 0.4 - width / 2 for c in range(len(cases))],
                    [f"{length // 1024}K\n{lines}" for length, lines in cases], fontsize=7)
    axis.set(yscale="log", ylabel="ms (do_bench median)", title="vertical-slash: ours vs MInference, same lines")
    axis.legend(fontsize=7)


def main(argv=None) -> None:
    plot_command(plot_kernel_speedups, "plot kernel benchmark CSV rows", argv)


if __name__ == "__main__":
    main()
