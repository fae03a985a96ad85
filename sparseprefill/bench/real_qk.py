"""Estimation + sparse attention on a real model's q/k/v (``sparseprefill bench kernels --qk-from MODEL``).

Synthetic inputs tune kernels; what the default keeps, and how fast, depends on real attention. This
captures the post-RoPE q/k/v of a few layers from one exact forward of ``MODEL`` over natural long text
(``evals.logits.reference_input_ids``), then times, per layer and length, in the same process and warm:
SDPA with the cuDNN and flash backends (dense baselines), and for each named configuration the whole
sparse layer (``pattern.run``: estimate, index, attention, host included; every head sparse), the
layer as ``patch()`` runs it (``patched_layer``: on the GPU, heads whose estimate keeps past their kernel's
break-even density, or that fail the pattern's own check, run dense, as ``SparseConfig.route_dense_heads``
routes them) and its estimate alone, each with the density it kept. Rows are tidy (op, length, layer, density, ms, speedup against cuDNN, GPU, commit);
a PNG shows each configuration's speedup per layer and length.

``MODEL`` is a Hugging Face path or id, or one of the offline models (``qwen2.5-coder``, ``smollm2``,
``gemma3``; YaRN for Qwen past its native 32K).
"""

from __future__ import annotations

from collections import defaultdict
from pathlib import Path
from typing import Any

import torch

from ..config import AntidiagonalConfig, SparseConfig
from ..evals import offline_models
from ..evals.logits import reference_input_ids
from ..kernels.common import default_kv_head_index
from ..kernels.geometry import causal_pairs_total
from ..patterns import build_pattern
from ..patterns.cost import dense_break_even
from .common import bench_ms, git_commit, gpu_name, prefill_sdpa_backend, write_csv
from .real_model import capture_layers, log

__all__ = ["QK_CONFIGS", "load_model", "plot_real_qk", "run_real_qk"]

# The configurations compared on real q/k: the default, and the antidiagonal estimate at the settings the
# real-model studies measured best (docs/benchmarks.md, stops 30-32). Forced sparse: the rows say what
# each costs; whether the default runs sparse at a length is the cost model's call.
QK_CONFIGS: dict[str, SparseConfig] = {
    "default": SparseConfig(min_sparse_len=0),
    "antidiagonal_m98": SparseConfig(pattern="antidiagonal", min_sparse_len=0,
                                     antidiagonal=AntidiagonalConfig(mass=0.98)),
    "antidiagonal_m98_columns": SparseConfig(pattern="antidiagonal", min_sparse_len=0,
                                             antidiagonal=AntidiagonalConfig(mass=0.98, vertical_share=0.01)),
}
# Layers captured when none are named: the first, three inside and the last (by share of the depth).
DEFAULT_QK_LAYER_SHARES = (0.0, 0.25, 0.5, 0.75, 1.0)
FIELDS = ["op", "config", "length", "layer", "density", "ms", "vs_cudnn", "gpu", "commit"]
DENSE_OPS = ("dense_cudnn", "dense_flash")


def load_model(name: str, length: int, *, device: str, dtype: torch.dtype) -> tuple[Any, Any]:
    """``(model, tokenizer)`` for ``name`` on ``device``: an offline model (Qwen with YaRN past its native
    context when ``length`` needs it) or a Hugging Face path or id."""
    if name == "qwen2.5-coder":
        model, tokenizer = offline_models.load_qwen_coder(
            dtype=dtype, long_context=length > offline_models.QWEN_NATIVE_CONTEXT)
    elif name in offline_models.SPECS:
        model, tokenizer = {"smollm2": offline_models.load_smollm2,
                            "gemma3": offline_models.load_gemma3}[name](dtype=dtype)
    else:
        from transformers import AutoModelForCausalLM, AutoTokenizer

        model = AutoModelForCausalLM.from_pretrained(name, dtype=dtype).eval()
        tokenizer = AutoTokenizer.from_pretrained(name)
    return model.to(device), tokenizer


def _layers(model: Any, layers: list[int] | None) -> list[int]:
    count = model.config.num_hidden_layers
    if layers is None:
        return sorted({round(share * (count - 1)) for share in DEFAULT_QK_LAYER_SHARES})
    bad = [layer for layer in layers if not 0 <= layer < count]
    if bad:
        raise ValueError(f"--qk-layers {bad} outside the model's {count} layers")
    return layers


def patched_dense_above(config: SparseConfig, pattern, head_dim: int, device_type: str) -> float | None:
    """The ``dense_above`` a patched layer passes to ``pattern.run`` (``patchers.attention``): the kernel's
    break-even density where heads are routed (``route_dense_heads``, on the GPU only), else None."""
    if not (config.route_dense_heads and device_type == "cuda"):
        return None
    return dense_break_even(pattern.name, head_dim)


def _time_layer(q, k, v, scale, configs: dict[str, SparseConfig], device: str) -> list[dict]:
    hq, hkv, length = q.shape[1], k.shape[1], q.shape[2]
    kv_head_index = default_kv_head_index(hq, hkv, q.device)
    k_full, v_full = k.repeat_interleave(hq // hkv, 1), v.repeat_interleave(hq // hkv, 1)
    rows = []
    for variant in DENSE_OPS:
        with prefill_sdpa_backend(q.device, variant):
            ms = bench_ms(lambda: torch.nn.functional.scaled_dot_product_attention(
                q, k_full, v_full, is_causal=True, scale=scale), device)
        rows.append(dict(op=variant, config="", density=1.0, ms=ms))
    causal = causal_pairs_total(length, length) * q.shape[0] * hq
    out = torch.empty_like(q)
    for name, config in configs.items():
        pattern = build_pattern(config.pattern, config)
        kwargs = dict(scale=scale, softcap=None, kv_head_index=kv_head_index)
        density = float(pattern.run(q, k, v, out=out, **kwargs).computed_pairs.sum()) / causal
        run_ms = bench_ms(lambda: pattern.run(q, k, v, out=out, **kwargs), device)
        routed = dict(kwargs, dense_above=patched_dense_above(config, pattern, q.shape[-1], q.device.type))
        patched_density = float(pattern.run(q, k, v, out=out, **routed).computed_pairs.sum()) / causal
        patched_ms = bench_ms(lambda: pattern.run(q, k, v, out=out, **routed), device)
        estimate_ms = bench_ms(lambda: pattern.estimate(q, k, **kwargs), device)
        rows += [dict(op="sparse_layer", config=name, density=density, ms=run_ms),
                 dict(op="patched_layer", config=name, density=patched_density, ms=patched_ms),
                 dict(op="estimate", config=name, density=density, ms=estimate_ms)]
    cudnn = rows[0]["ms"]
    for row in rows:
        row["vs_cudnn"] = cudnn / row["ms"]
    return rows


def run_real_qk(model_name: str, lengths: list[int], *, configs: dict[str, SparseConfig] | None = None,
                layers: list[int] | None = None, device: str = "cuda", dtype: torch.dtype = torch.bfloat16,
                out_dir: str | Path | None = None) -> list[dict]:
    """Rows (``FIELDS``) for every length, captured layer and configuration (module docstring); ``layers``
    None: ``DEFAULT_QK_LAYER_SHARES`` of the depth. With ``out_dir``, written to ``real_qk.csv`` after
    each length."""
    configs = QK_CONFIGS if configs is None else configs
    gpu = gpu_name(device) if device == "cuda" else "cpu"
    commit = git_commit()
    rows: list[dict] = []
    for length in lengths:
        log(f"{model_name} at {length}: loading and capturing q/k/v")
        model, tokenizer = load_model(model_name, length, device=device, dtype=dtype)
        ids = reference_input_ids(tokenizer, length).to(device)
        captured = capture_layers(model, ids, _layers(model, layers))
        del model
        for layer, (q, k, v, scale) in captured.items():
            for row in _time_layer(q, k, v, scale, configs, device):
                rows.append(dict(row, length=length, layer=layer, gpu=gpu, commit=commit))
                if row["op"] != "estimate":
                    log(f"{length} layer {layer} {row['op']} {row['config']}: density {row['density']:.3f}, "
                        f"{row['ms']:.2f} ms, {row['vs_cudnn']:.2f}x of cuDNN")
        del captured
        if device == "cuda":
            torch.cuda.empty_cache()
        if out_dir is not None:
            write_csv(Path(out_dir) / "real_qk.csv", FIELDS, rows)
    return rows


def plot_real_qk(csv_path: str | Path, png_path: str | Path) -> Path:
    """One panel per length: each configuration's layer as ``patch()`` runs it (``patched_layer``; the
    all-sparse layer for CSVs written before that row existed) against cuDNN, per captured layer."""
    import csv

    from .plot import pyplot, save_figure

    series: dict[int, dict[str, list[tuple[int, float]]]] = defaultdict(lambda: defaultdict(list))
    with open(csv_path) as handle:
        rows = list(csv.DictReader(handle))
    layer_op = "patched_layer" if any(row["op"] == "patched_layer" for row in rows) else "sparse_layer"
    for row in rows:
        if row["op"] in (layer_op, "dense_flash"):
            label = row["config"] or row["op"]
            series[int(row["length"])][label].append((int(row["layer"]), float(row["vs_cudnn"])))
    plt = pyplot()
    fig, axes = plt.subplots(1, max(len(series), 1), figsize=(4.5 * max(len(series), 1), 3.6), squeeze=False)
    for axis, (length, by_config) in zip(axes[0], sorted(series.items())):
        for label, points in sorted(by_config.items()):
            points.sort()
            axis.plot([p[0] for p in points], [p[1] for p in points], marker="o", label=label)
        axis.axhline(1.0, color="grey", linewidth=0.8)
        axis.set(title=f"real q/k, {length // 1024}K", xlabel="layer", ylabel="speedup vs SDPA cuDNN")
        axis.legend(fontsize=7)
    return save_figure(fig, png_path)
