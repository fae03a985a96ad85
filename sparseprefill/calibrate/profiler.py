"""The offline profiler: each head's cheapest pattern and budget that keeps the target recall.

Dense prefills run on calibration prompts with the model patched to exact attention; a hook sees
every layer's post-RoPE ``q``/``k`` (``patchers.observe_prefill``). There, each candidate setting
estimates its index for all heads of the layer and ``recall.index_recall`` measures, per head, the
share of exact attention mass each index keeps (blockwise, no ``L x L`` matrix). Among the candidates
whose mean recall reaches the target at every calibration length, a head gets the one predicted
fastest at the longest calibration length: density over its kernel's rate relative to cuDNN
(``patterns.cost.kernel_time_ratio``), so a head that must keep more pairs than its kernel's
break-even runs dense. Density alone would pick vertical-slash at density 0.9 over dense, which on
the H200 runs such a head 1.2x (head_dim 64) to 2x (head_dim 128) slower. Dense when none qualifies.

Sliding-window layers never reach the hook (their exact window path is already cheap): they are
recorded as ``dense``, which for them means exact window attention.
"""

from __future__ import annotations

import datetime
import enum
import math
import time
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Sequence

import torch

from .._version import __version__
from ..config import PatternName, SparseConfig
from ..evals.passkey import build_passkey_prompt
from ..kernels.common import default_kv_head_index
from ..kernels.geometry import causal_pairs_total
from ..kernels.recall import index_recall
from ..patchers import observe_prefill
from ..patterns import build_pattern
from ..patterns.cost import kernel_time_ratio
from ..profiles.schema import (
    Calibration,
    HeadSetting,
    Profile,
    model_identity,
    save_profile,
)

# Candidate budgets, cheapest families first. Vertical-slash masses span the useful range (0.95 is
# the auto default; below 0.5 the kept lines rarely reach a 0.9+ recall target); A-shape windows are
# the cheapest pattern for purely local heads. Dense is the fallback every head can meet.
DEFAULT_VERTICAL_SLASH_MASSES = (0.5, 0.7, 0.8, 0.9, 0.95, 0.98, 0.995)
DEFAULT_A_SHAPE_WINDOWS = ((64, 256), (64, 512), (64, 1024), (128, 2048))
DEFAULT_TARGET_RECALL = 0.95
DEFAULT_LENGTHS = (2048, 4096)
DEFAULT_SAMPLES = 2
SYNTHETIC_SOURCE = "synthetic-retrieval"
RECALL_QUANTILE = 0.05  # the tail statistic: the 5th-percentile row of a head


class RecallObjective(str, enum.Enum):
    """Which statistic of a head's per-row recall must reach the target. ``mean``: over all rows. ``p5``:
    the 5th-percentile row (``RECALL_QUANTILE``), so a setting that loses a few rows' mass does not
    qualify: on Qwen2.5-Coder at 64K-128K the mean objective kept lean settings that lost the retrieval
    rows which move the answers (docs/benchmarks.md, stop 33)."""

    MEAN = "mean"
    P5 = "p5"

    @property
    def measurement(self) -> str:
        return {RecallObjective.MEAN: "recall", RecallObjective.P5: "recall_p5"}[self]

    @property
    def calibration_name(self) -> str:
        return f"attention_mass_recall_{self.value}"


OBJECTIVE = RecallObjective.MEAN.calibration_name


def default_candidates() -> tuple[HeadSetting, ...]:
    shapes = tuple(
        HeadSetting(PatternName.A_SHAPE, {"sink_tokens": sink, "local_tokens": local})
        for sink, local in DEFAULT_A_SHAPE_WINDOWS
    )
    vertical_slash = tuple(
        HeadSetting(PatternName.VERTICAL_SLASH, {"vertical_mass": m, "slash_mass": m})
        for m in DEFAULT_VERTICAL_SLASH_MASSES
    )
    return shapes + vertical_slash + (HeadSetting(PatternName.DENSE, {}),)


@dataclass(frozen=True)
class ProfilerOptions:
    """What to calibrate on and what to aim for.

    ``text_files`` replaces the built-in synthetic retrieval prompts (pass keys hidden at spread
    depths in filler text) with consecutive windows of the user's own text. ``objective``: which
    statistic of a head's per-row recall must reach ``target_recall`` (``RecallObjective``).
    """

    lengths: tuple[int, ...] = DEFAULT_LENGTHS
    samples: int = DEFAULT_SAMPLES
    target_recall: float = DEFAULT_TARGET_RECALL
    candidates: tuple[HeadSetting, ...] = field(default_factory=default_candidates)
    text_files: tuple[str, ...] = ()
    seed: int = 0
    objective: RecallObjective = RecallObjective.MEAN

    def __post_init__(self) -> None:
        try:
            object.__setattr__(self, "objective", RecallObjective(self.objective))
        except ValueError:
            raise ValueError(f"objective must be one of {[o.value for o in RecallObjective]}, "
                             f"got {self.objective!r}") from None
        if not self.lengths or any(not isinstance(n, int) or n < 1 for n in self.lengths):
            raise ValueError(f"lengths must be positive ints, got {self.lengths!r}")
        if not isinstance(self.samples, int) or self.samples < 1:
            raise ValueError(f"samples must be a positive int, got {self.samples!r}")
        if not 0.0 < self.target_recall <= 1.0:
            raise ValueError(f"target_recall must be in (0, 1], got {self.target_recall!r}")
        if not self.candidates:
            raise ValueError("candidates must not be empty")


@dataclass
class _Measurements:
    """Per (layer, candidate, length): per-head sums of recall, p5 recall and density over samples."""

    recall: dict = field(default_factory=lambda: defaultdict(float))
    recall_p5: dict = field(default_factory=lambda: defaultdict(float))
    density: dict = field(default_factory=lambda: defaultdict(float))
    count: dict = field(default_factory=lambda: defaultdict(int))
    layers_seen: set = field(default_factory=set)


def calibration_prompts(tokenizer: Any, options: ProfilerOptions, length: int, offset: int = 0) -> list[torch.Tensor]:
    """``samples`` prompts of ``length`` tokens, ``[1, L]`` each. ``offset`` shifts seeds and text
    windows, so held-out prompts (offset >= samples) never repeat calibration ones."""
    if options.text_files:
        text = "\n\n".join(Path(p).read_text(encoding="utf-8", errors="replace") for p in options.text_files)
        ids = tokenizer(text)["input_ids"]
        needed = (offset + options.samples) * length
        if len(ids) < needed:
            raise ValueError(
                f"the text files hold {len(ids)} tokens; {options.samples} samples of {length} "
                f"(from window {offset}) need {needed}"
            )
        return [torch.tensor([ids[(offset + s) * length : (offset + s + 1) * length]]) for s in range(options.samples)]

    prompts = []
    for s in range(options.samples):
        index = offset + s
        # Needles at spread depths (golden-ratio steps): retrieval heads see them anywhere.
        depth = (0.1 + index * 0.618034) % 1.0
        prompt = build_passkey_prompt(tokenizer, length, depth=depth, seed=options.seed + index)
        ids = tokenizer(prompt.text)["input_ids"]
        prompts.append(torch.tensor([ids]))
    return prompts


def _measure(plans_by_name: dict[str, Any], q, k, scale, softcap, measurements: _Measurements, layer: int,
             length: int) -> None:
    """Score every named plan on one layer's q/k: a plan is a list of (pattern, heads) groups."""
    hq, hkv = q.shape[1], k.shape[1]
    kv_of_head = default_kv_head_index(hq, hkv, q.device)
    causal = causal_pairs_total(q.shape[2], k.shape[2])
    names, groups, indices = [], [], []
    for name, plan in plans_by_name.items():
        for pattern, heads in plan:
            heads_t = torch.tensor(heads, device=q.device)
            index = pattern.estimate(q[:, heads_t], k, scale=scale, softcap=softcap, kv_head_index=kv_of_head[heads_t])
            names.append(name)
            groups.append(heads)
            indices.append(index)
    # One exact-attention pass per distinct head subset scores every index over it.
    by_heads: dict[tuple[int, ...], list[int]] = defaultdict(list)
    for i, heads in enumerate(groups):
        by_heads[tuple(heads)].append(i)
    for heads, members in by_heads.items():
        heads_t = torch.tensor(heads, device=q.device)
        recalls = index_recall([indices[i] for i in members], q[:, heads_t], k, scale=scale, softcap=softcap,
                               kv_head_index=kv_of_head[heads_t])
        for i, recall in zip(members, recalls):
            index = indices[i]
            if index is None:
                density = torch.ones(len(heads))
            else:
                density = (index.computed_pairs().sum(0).double() / (causal * q.shape[0])).float().cpu()
            row_recall = recall.float().transpose(0, 1).reshape(len(heads), -1)  # [heads, B * Lq]
            mean = row_recall.mean(-1).cpu()
            p5 = torch.quantile(row_recall, RECALL_QUANTILE, dim=-1).cpu()
            for j, head in enumerate(heads):
                key = (layer, names[i], length, head)
                measurements.recall[key] += float(mean[j])
                measurements.recall_p5[key] += float(p5[j])
                measurements.density[key] += float(density[j])
                measurements.count[key] += 1
    measurements.layers_seen.add(layer)


def _run_prompts(model, prompts_by_length, plans_for_layer, measurements, progress: bool, description: str) -> float:
    """Dense prefills with the observer attached; returns seconds."""
    import sparseprefill


    total = sum(len(p) for p in prompts_by_length.values())
    bar = _progress_bar(total, description, progress)
    # The bar moves per measured layer (a long prompt takes minutes on the CPU): each layer advances
    # it by 1 / layers, and the prompt's end tops it up to the next whole prompt.
    layers = max(1, int(getattr(model.config.get_text_config(), "num_hidden_layers", 1)))
    start = time.perf_counter()
    exact = SparseConfig.keep_everything(pattern=PatternName.DENSE)
    sparseprefill.patch(model, exact)
    try:
        done = 0
        for length, prompts in prompts_by_length.items():
            for ids in prompts:
                def observer(layer, q, k, *, scale, softcap, _length=length):
                    _measure(plans_for_layer(layer, q.shape[1]), q, k, scale, softcap, measurements, layer, _length)
                    bar.set_postfix_str(f"{_length} tokens, layer {layer + 1}/{layers}", refresh=False)
                    bar.update(min(1 / layers, done + 1 - bar.n))

                with observe_prefill(model, observer), torch.inference_mode():
                    model(input_ids=ids.to(model.device), use_cache=False, logits_to_keep=1)
                done += 1
                bar.update(done - bar.n)
    finally:
        sparseprefill.unpatch(model)
        bar.close()
    return time.perf_counter() - start


def _progress_bar(total: int, description: str, enabled: bool):
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=description, unit="prompt", disable=not enabled)


@dataclass(frozen=True)
class ProfileResult:
    profile: Profile
    seconds: float
    summary: list[dict[str, Any]]  # one row per calibration length

    def summary_table(self) -> str:
        mix = ", ".join(f"{name} {count}" for name, count in sorted(self.profile.pattern_mix().items()))
        lines = [f"pattern mix (heads): {mix}", "",
                 "| length | recall mean | recall p5 (mean over heads) | worst head recall | density |",
                 "| --- | --- | --- | --- | --- |"]
        for row in self.summary:
            lines.append(f"| {row['length']} | {row['recall_mean']:.4f} | {row['recall_p5_mean']:.4f} | "
                         f"{row['recall_min_head']:.4f} | {row['density']:.4f} |")
        return "\n".join(lines)


def profile_model(model: Any, tokenizer: Any, options: ProfilerOptions | None = None, *,
                  progress: bool = True) -> ProfileResult:
    """Profile ``model`` (an unpatched transformers causal LM of a supported family).

    Returns the profile (per layer, per query head: pattern, budget and the measured recall and
    density at each calibration length) and a per-length summary of the chosen settings.
    """
    options = options or ProfilerOptions()
    config = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
    identity = model_identity(config)
    candidates = options.candidates
    names = [f"c{i}" for i in range(len(candidates))]
    base = SparseConfig()
    patterns = [build_pattern(c.to_config(base).pattern, c.to_config(base)) for c in candidates]

    def plans_for_layer(layer: int, num_heads: int):
        heads = list(range(num_heads))
        return {name: [(pattern, heads)] for name, pattern in zip(names, patterns)}

    prompts = {n: calibration_prompts(tokenizer, options, n) for n in options.lengths}
    measurements = _Measurements()
    seconds = _run_prompts(model, prompts, plans_for_layer, measurements, progress, "profiling")

    lengths = sorted(options.lengths)
    layers = []
    for layer in range(identity.num_layers):
        settings = []
        for head in range(identity.num_query_heads):
            if layer not in measurements.layers_seen:
                settings.append(HeadSetting(PatternName.DENSE, {}, None))
                continue
            measured_by_name = {
                name: ({n: _mean(measurements, options.objective.measurement, (layer, name, n, head)) for n in lengths},
                       _mean(measurements, "density", (layer, name, lengths[-1], head)))
                for name in names
            }
            chosen = choose_candidate(names, candidates, measured_by_name, options.target_recall, identity.head_dim)
            if chosen is None:  # dense is not among the candidates and none reached the target
                settings.append(HeadSetting(PatternName.DENSE, {}, None))
                continue
            name, candidate = chosen
            measured = {
                what: {str(n): round(_mean(measurements, what, (layer, name, n, head)), 6) for n in lengths}
                for what in ("recall", "recall_p5", "density")
            }
            settings.append(HeadSetting(candidate.pattern, dict(candidate.params), measured))
        layers.append(tuple(settings))


    calibration = Calibration(
        source=SYNTHETIC_SOURCE if not options.text_files else "text:" + ",".join(Path(p).name for p in options.text_files),
        lengths=tuple(lengths), samples=options.samples, objective=options.objective.calibration_name,
        target=options.target_recall,
        tool_version=__version__, date=datetime.date.today().isoformat(),
    )
    profile = Profile(model=identity, calibration=calibration, layers=tuple(layers))
    summary = _summarise(profile, measurements, names, candidates, lengths)
    return ProfileResult(profile=profile, seconds=seconds, summary=summary)


def choose_candidate(
    names: Sequence[str],
    candidates: Sequence[HeadSetting],
    measured: dict[str, tuple[dict[int, float], float]],
    target_recall: float,
    head_dim: int,
) -> tuple[str, HeadSetting] | None:
    """One head's setting: among candidates whose recall (``measured[name][0]``, per length) reaches
    ``target_recall`` at every length, the lowest predicted kernel time at the density
    ``measured[name][1]``; ties go to dense (exact), then to the lower density. ``None`` when none
    qualifies."""
    best = None
    for name, candidate in zip(names, candidates):
        recall, density = measured[name]
        if any(r < target_recall for r in recall.values()):
            continue
        key = (kernel_time_ratio(candidate.pattern, density, head_dim), candidate.pattern != PatternName.DENSE, density)
        if best is None or key < best[0]:
            best = (key, name, candidate)
    return None if best is None else (best[1], best[2])


def _mean(measurements: _Measurements, what: str, key) -> float:
    count = measurements.count.get(key, 0)
    if not count:
        raise KeyError(f"no measurement for {key}")
    return getattr(measurements, what)[key] / count


def _summarise(profile, measurements, names, candidates, lengths) -> list[dict[str, Any]]:
    """Recall and density of the chosen settings, over the heads of the layers that were measured."""
    name_of = {c.key(): n for n, c in zip(names, candidates)}
    rows = []
    for n in lengths:
        recall, p5, density = [], [], []
        for layer, settings in enumerate(profile.layers):
            if layer not in measurements.layers_seen:
                continue
            for head, setting in enumerate(settings):
                name = name_of.get(setting.key())
                if name is None:
                    recall.append(1.0), p5.append(1.0), density.append(1.0)
                    continue
                key = (layer, name, n, head)
                recall.append(_mean(measurements, "recall", key))
                p5.append(_mean(measurements, "recall_p5", key))
                density.append(_mean(measurements, "density", key))
        rows.append({
            "length": n, "heads": len(recall),
            "recall_mean": _avg(recall), "recall_p5_mean": _avg(p5),
            "recall_min_head": min(recall) if recall else math.nan, "density": _avg(density),
        })
    return rows


def _avg(values: Sequence[float]) -> float:
    return sum(values) / len(values) if values else math.nan


def evaluate_settings(model: Any, tokenizer: Any, plans: dict[str, Any], options: ProfilerOptions, *,
                      offset: int, progress: bool = True) -> dict[str, list[dict[str, Any]]]:
    """Recall and density of named per-layer plans on prompts ``offset ..`` (held out from calibration).

    ``plans[name]`` is a function ``(layer, num_heads) -> [(pattern, heads), ...]``. Returns, per
    name, one summary row per length (mean recall, mean per-head p5, worst head, density), over the
    heads of the layers that run sparse.
    """
    measurements = _Measurements()
    prompts = {n: calibration_prompts(tokenizer, options, n, offset=offset) for n in options.lengths}

    def plans_for_layer(layer, num_heads):
        return {name: plan(layer, num_heads) for name, plan in plans.items()}

    _run_prompts(model, prompts, plans_for_layer, measurements, progress, "evaluating")
    out = {}
    for name in plans:
        rows = []
        for n in sorted(options.lengths):
            keys = [key for key in measurements.count if key[1] == name and key[2] == n]
            recall = [_mean(measurements, "recall", key) for key in keys]
            rows.append({
                "length": n, "heads": len(keys),
                "recall_mean": _avg(recall),
                "recall_p5_mean": _avg([_mean(measurements, "recall_p5", key) for key in keys]),
                "recall_min_head": min(recall) if recall else math.nan,
                "density": _avg([_mean(measurements, "density", key) for key in keys]),
            })
        out[name] = rows
    return out


def profile_plan(profile: Profile, base: SparseConfig | None = None):
    """``(layer, num_heads) -> [(pattern, heads), ...]`` for ``evaluate_settings`` from a profile."""
    base = base or SparseConfig()
    cache: dict[Any, Any] = {}

    def plan(layer: int, num_heads: int):
        groups: dict[Any, list[int]] = {}
        for head, setting in enumerate(profile.layers[layer]):
            groups.setdefault(setting.key(), []).append(head)
        out = []
        for key, heads in groups.items():
            if key not in cache:
                cfg = profile.layers[layer][heads[0]].to_config(base)
                cache[key] = build_pattern(cfg.pattern, cfg)
            out.append((cache[key], heads))
        return out

    return plan


def uniform_plan(config: SparseConfig):
    """Every head of every layer with ``config``'s pattern (e.g. the ``auto`` default)."""
    pattern = build_pattern(config.pattern, config)
    return lambda layer, num_heads: [(pattern, list(range(num_heads)))]


def pattern_counts(profile: Profile) -> Counter:
    return Counter(s.pattern.value for layer in profile.layers for s in layer)


def plot_profile(profile: Profile, path: str | Path, length: int | None = None) -> Path:
    """PNG: a layer x head map of the chosen patterns and one of the measured density."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        from matplotlib.colors import ListedColormap
    except ImportError as error:
        raise RuntimeError("plotting needs matplotlib: pip install matplotlib") from error
    import numpy as np

    kinds = sorted({s.pattern.value for layer in profile.layers for s in layer})
    length = length or max(profile.calibration.lengths)
    grid = np.array([[kinds.index(s.pattern.value) for s in layer] for layer in profile.layers], dtype=float)
    density = np.array([[float((s.measured or {}).get("density", {}).get(str(length), 1.0)) for s in layer]
                        for layer in profile.layers])
    fig, (left, right) = plt.subplots(1, 2, figsize=(10, max(3.0, 0.22 * len(profile.layers) + 1.5)))
    cmap = ListedColormap(plt.get_cmap("tab10").colors[: len(kinds)])
    image = left.imshow(grid, aspect="auto", cmap=cmap, vmin=-0.5, vmax=len(kinds) - 0.5, interpolation="nearest")
    bar = fig.colorbar(image, ax=left, ticks=range(len(kinds)))
    bar.ax.set_yticklabels(kinds)
    left.set(xlabel="query head", ylabel="layer", title="chosen pattern")
    heat = right.imshow(density, aspect="auto", cmap="viridis", vmin=0, vmax=1, interpolation="nearest")
    fig.colorbar(heat, ax=right, label=f"density at {length}")
    right.set(xlabel="query head", ylabel="layer", title=f"measured density at {length} tokens")
    fig.suptitle(f"{profile.model.architecture} ({profile.model.model_type}): target recall "
                 f"{profile.calibration.target}, lengths {list(profile.calibration.lengths)}")
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def write_outputs(result: ProfileResult, out: str | Path, plot: str | Path | None = None) -> Iterable[Path]:

    written = [Path(out)]
    save_profile(result.profile, out)
    if plot is not None:
        written.append(plot_profile(result.profile, plot))
    return written


__all__ = [
    "ProfilerOptions", "ProfileResult", "default_candidates", "calibration_prompts", "profile_model",
    "evaluate_settings", "profile_plan", "uniform_plan", "plot_profile", "write_outputs", "pattern_counts",
]
