"""PNG plots from benchmark CSV rows (matplotlib, optional dependency).

    python -m sparseprefill.bench.plot benchmarks/results/kernels_h200.csv --out benchmarks/results/kernels_h200.png
"""

from __future__ import annotations

import argparse
import csv
from collections import defaultdict
from pathlib import Path

DENSE_BASELINE = "sdpa_cudnn"


def plot_kernel_speedups(csv_path: str | Path, png_path: str | Path) -> Path:
    """Left: speedup over cuDNN dense vs density, one line per (provider, length), random indices.
    Middle: TFLOP/s on computed pairs vs density, with the dense backends as horizontal references.
    Right: the ``auto`` pattern end to end (estimation + attention) on structured input, speedup over
    cuDNN vs length, one line per mass target, each point labelled with its density."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as error:
        raise RuntimeError("plotting needs matplotlib: pip install matplotlib") from error
    with open(csv_path, newline="") as f:
        rows = list(csv.DictReader(f))
    dense_ms = {int(r["length"]): float(r["ms"]) for r in rows if r["provider"] == DENSE_BASELINE}
    series = defaultdict(list)
    dense_tflops = defaultdict(dict)
    end_to_end = defaultdict(list)
    for r in rows:
        length, provider = int(r["length"]), r["provider"]
        if r["op"] == "attention" and provider.startswith("sdpa"):
            dense_tflops[provider][length] = float(r["tflops"])
        elif r["op"] == "attention" and length in dense_ms and not provider.startswith("triton_vertical_slash"):
            series[(provider, length)].append((float(r["density"]), dense_ms[length] / float(r["ms"]),
                                               float(r["tflops"])))
        elif r["op"] == "estimation+attention" and provider.startswith("auto") and length in dense_ms:
            end_to_end[provider].append((length, dense_ms[length] / float(r["ms"]), float(r["density"])))
    fig, (left, right, auto_axis) = plt.subplots(1, 3, figsize=(18, 4.5))
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
    gpu = rows[0]["gpu"] if rows else "?"
    commit = rows[0]["commit"] if rows else "?"
    fig.suptitle(f"{gpu}, commit {commit}: 32 q / 8 kv heads, head_dim 128, bf16, causal")
    left.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    png_path = Path(png_path)
    fig.savefig(png_path, dpi=110)
    plt.close(fig)
    return png_path


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description="plot kernel benchmark CSV rows")
    parser.add_argument("csv")
    parser.add_argument("--out", required=True)
    args = parser.parse_args(argv)
    print(plot_kernel_speedups(args.csv, args.out))


if __name__ == "__main__":
    main()
