"""Dense-vs-sparse eval variants, per-task paired rows, and the report files (JSON, markdown, PNG).

Every eval in ``sparseprefill.evals`` runs the same samples under each :class:`Variant` (dense
first), scores every sample, and hands the per-sample scores to :class:`EvalReport`, which pairs
each sparse variant with dense sample by sample (:func:`paired_bootstrap`) and writes
``<stem>.json`` (everything, per-sample records included), ``<stem>.md`` (the table) and, where a
plot helps, ``<stem>.png``.
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import json
import math
import platform
import sys
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

from ..bench.plot import MissingPlotterError
from .._version import __version__
from ..bench.common import git_commit
from ..config import SparseConfig
from .paired import DEFAULT_CONFIDENCE, paired_bootstrap

__all__ = [
    "AVERAGE_TASK",
    "DENSE",
    "DensityMeter",
    "EvalReport",
    "SampleScore",
    "Variant",
    "applied",
    "config_to_dict",
    "run_metadata",
]

AVERAGE_TASK = "average"  # the row that pools every task's samples at one length


def config_to_dict(config: SparseConfig) -> dict[str, Any]:
    """A ``SparseConfig`` as plain JSON values (enums by value)."""
    from dataclasses import asdict

    def plain(value: Any) -> Any:
        if isinstance(value, dict):
            return {k: plain(v) for k, v in value.items()}
        if isinstance(value, (list, tuple)):
            return [plain(v) for v in value]
        return getattr(value, "value", value)

    return plain(asdict(config))


@dataclass(frozen=True)
class Variant:
    """One way of running the model: dense (unpatched), or patched with a config and/or a profile.

    Attributes:
        name: the label in tables and files ("dense", "auto", "profile", ...).
        config: the ``SparseConfig`` to patch with (``None`` and no profile: dense).
        profile: a profile file path or shipped profile name (``sparseprefill.shipped_profile``).
    """

    name: str
    config: SparseConfig | None = None
    profile: str | None = None

    @property
    def is_dense(self) -> bool:
        return self.config is None and self.profile is None

    def describe(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "config": None if self.config is None else config_to_dict(self.config),
            "profile": self.profile,
        }

    def load_profile(self):
        from ..profiles import load_profile, shipped_profile
        from ..profiles.schema import ProfileError

        if self.profile is None:
            return None
        if Path(self.profile).expanduser().exists():
            return load_profile(Path(self.profile).expanduser())
        try:
            return shipped_profile(self.profile)
        except (KeyError, ValueError, FileNotFoundError, ProfileError) as exc:
            raise ValueError(f"variant {self.name!r}: {self.profile!r} is neither a profile file nor a shipped "
                             f"profile ({exc})") from exc


DENSE = Variant("dense")


class DensityMeter:
    """Reads the share of causal pairs the sparse path computed since the last ``reset``.

    Only layers that ran a sparse pattern count: exact sliding-window layers (Gemma 3's local
    layers) compute their whole window by design, and dense fallbacks compute everything, so
    including them would report the model's cost, not what the sparse patterns kept.
    """

    def __init__(self, model: Any | None):
        self._model = model

    def reset(self) -> None:
        if self._model is not None:
            from .. import reset_stats

            reset_stats(self._model)

    def read(self) -> tuple[float | None, int]:
        """(density of the sparse layers or ``None`` when none ran sparse, sparse calls)."""
        if self._model is None:
            return None, 0
        from .. import stats
        from ..patchers import Phase

        sparse_phases = (Phase.SPARSE_PREFILL.value, Phase.SPARSE_CHUNK.value)
        computed = causal = calls = 0
        for layer in stats(self._model).layers:
            layer_calls = sum(layer.phases[p] for p in sparse_phases)
            if layer_calls and not layer.phases[Phase.WINDOW.value]:
                computed += layer.computed_pairs
                causal += layer.causal_pairs
                calls += layer_calls
        return (computed / causal if causal else None), calls


@contextlib.contextmanager
def applied(model: Any, variant: Variant) -> Iterator[DensityMeter]:
    """Run the block with ``model`` as ``variant`` (patched unless dense); unpatches afterwards."""
    import sparseprefill

    if variant.is_dense:
        if sparseprefill.is_patched(model):
            raise RuntimeError("the dense variant needs an unpatched model; unpatch it first")
        yield DensityMeter(None)
        return
    sparseprefill.patch(model, variant.config or SparseConfig(), profile=variant.load_profile())
    try:
        yield DensityMeter(model)
    finally:
        sparseprefill.unpatch(model)


@dataclass(frozen=True)
class SampleScore:
    """One sample's score under one variant (the unit the paired bootstrap resamples)."""

    task: str
    length: int
    index: int
    variant: str
    score: float
    density: float | None = None
    prediction: str | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        out = {"task": self.task, "length": self.length, "index": self.index, "variant": self.variant,
               "score": self.score, "density": self.density}
        if self.prediction is not None:
            out["prediction"] = self.prediction
        out.update(self.extra)
        return out


def run_metadata(model: Any | None = None) -> dict[str, Any]:
    """Where and with what a report was produced."""
    import torch
    import transformers


    device = "cpu"
    if model is not None:
        device = str(next(model.parameters()).device)
        if device.startswith("cuda"):
            device = f"{device} ({torch.cuda.get_device_name(torch.device(device))})"
    return {
        "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "command": " ".join([Path(sys.argv[0]).name, *sys.argv[1:]]),
        "commit": git_commit(),
        "sparseprefill": __version__,
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "python": platform.python_version(),
        "device": device,
        "dtype": str(next(model.parameters()).dtype) if model is not None else None,
    }


def _fmt(value: float | None, digits: int = 1) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    return f"{value:.{digits}f}"


@dataclass
class EvalReport:
    """Per-sample scores of every variant, paired into per-task rows.

    Attributes:
        kind: "ruler", "longbench", "ppl", "fidelity", ...
        model: the model's name or path.
        variants: the variants run, dense first.
        samples: per-sample scores of every variant.
        metric: what ``score`` means ("score (0-100)", "perplexity", ...).
        higher_is_better: the direction of ``metric`` (perplexity: lower).
        meta: run metadata (:func:`run_metadata`) plus the eval's own settings.
    """

    kind: str
    model: str
    variants: list[Variant]
    samples: list[SampleScore]
    metric: str
    higher_is_better: bool = True
    meta: dict[str, Any] = field(default_factory=dict)
    seed: int = 0

    def __post_init__(self) -> None:
        if not self.variants or not self.variants[0].is_dense:
            raise ValueError("the first variant must be dense (the reference every row is paired with)")

    # ------------------------------------------------------------------------------------ rows
    def _scores(self) -> dict[tuple[str, int, str], dict[int, SampleScore]]:
        table: dict[tuple[str, int, str], dict[int, SampleScore]] = defaultdict(dict)
        for s in self.samples:
            key = (s.task, s.length, s.variant)
            if s.index in table[key]:
                raise ValueError(f"duplicate sample {s.index} for {key}")
            table[key][s.index] = s
        return table

    def rows(self) -> list[dict[str, Any]]:
        """One row per (task, length, sparse variant), plus an ``average`` row per length that pools
        every task's samples (tasks with equal sample counts weigh equally)."""
        table = self._scores()
        dense_name = self.variants[0].name
        tasks = list(dict.fromkeys(s.task for s in self.samples))
        lengths = sorted({s.length for s in self.samples})
        rows = []
        for length in lengths:
            for variant in self.variants[1:]:
                pooled_dense, pooled_sparse, pooled_density = [], [], []
                task_rows = []
                for task in tasks:
                    dense = table.get((task, length, dense_name), {})
                    sparse = table.get((task, length, variant.name), {})
                    shared = sorted(set(dense) & set(sparse))
                    if not shared:
                        continue
                    if set(dense) != set(sparse):
                        raise ValueError(f"{task} @ {length}: dense and {variant.name} scored different samples")
                    d = [dense[i].score for i in shared]
                    s = [sparse[i].score for i in shared]
                    densities = [sparse[i].density for i in shared if sparse[i].density is not None]
                    pooled_dense += d
                    pooled_sparse += s
                    pooled_density += densities
                    task_rows.append(self._row(task, length, variant.name, d, s, densities))
                rows += task_rows
                if len(task_rows) > 1:
                    rows.append(self._row(AVERAGE_TASK, length, variant.name, pooled_dense, pooled_sparse,
                                          pooled_density))
        return rows

    def _row(self, task, length, variant, dense, sparse, densities) -> dict[str, Any]:
        delta = paired_bootstrap(dense, sparse, seed=self.seed)
        return {
            "task": task, "length": length, "variant": variant, "n": delta.n,
            "dense": delta.dense_mean, "sparse": delta.sparse_mean, "delta": delta.delta,
            "ci_low": delta.low, "ci_high": delta.high,
            "density": sum(densities) / len(densities) if densities else None,
        }

    def dense_only_rows(self) -> list[dict[str, Any]]:
        """Mean dense score per (task, length): the table when only dense was run."""
        table = self._scores()
        name = self.variants[0].name
        return [{"task": t, "length": l, "n": len(v), "dense": sum(s.score for s in v.values()) / len(v)}
                for (t, l, var), v in table.items() if var == name]

    # --------------------------------------------------------------------------------- outputs
    @classmethod
    def load(cls, path: str | Path) -> "EvalReport":
        """Read a report written by :meth:`write` (to re-render its table or plot)."""
        data = json.loads(Path(path).read_text())
        if data.get("format") != "sparseprefill-eval" or data.get("kind") == "fidelity":
            raise ValueError(f"{path} is not a paired eval report (format {data.get('format')!r}, "
                             f"kind {data.get('kind')!r})")
        variants = [Variant(v["name"], None if v["config"] is None else SparseConfig(**v["config"]), v["profile"])
                    for v in data["variants"]]
        fields = ("task", "length", "index", "variant", "score", "density", "prediction")
        samples = [SampleScore(**{k: s.get(k) for k in fields},
                               extra={k: v for k, v in s.items() if k not in fields}) for s in data["samples"]]
        return cls(kind=data["kind"], model=data["model"], variants=variants, samples=samples, metric=data["metric"],
                   higher_is_better=data["higher_is_better"], meta=data["meta"])

    def to_dict(self) -> dict[str, Any]:
        return {
            "format": "sparseprefill-eval",
            "version": 1,
            "kind": self.kind,
            "model": self.model,
            "metric": self.metric,
            "higher_is_better": self.higher_is_better,
            "confidence": DEFAULT_CONFIDENCE,
            "variants": [v.describe() for v in self.variants],
            "meta": self.meta,
            "rows": self.rows(),
            "samples": [s.to_dict() for s in self.samples],
        }

    def markdown(self) -> str:
        direction = "higher" if self.higher_is_better else "lower"
        lines = [
            f"### {self.kind}: {self.model}",
            "",
            f"{self.metric} ({direction} is better); delta = sparse - dense on the same samples, "
            f"{int(DEFAULT_CONFIDENCE * 100)}% paired bootstrap interval; density = share of causal pairs "
            "computed by the sparse layers.",
            "",
            "| task | length | n | dense | variant | sparse | delta (95% CI) | density |",
            "|---|---|---|---|---|---|---|---|",
        ]
        digits = 3 if not self.higher_is_better else 1
        for r in self.rows():
            ci = f"{r['delta']:+.{digits}f} ({_fmt(r['ci_low'], digits)}, {_fmt(r['ci_high'], digits)})"
            task = f"**{r['task']}**" if r["task"] == AVERAGE_TASK else r["task"]
            lines.append(f"| {task} | {r['length']} | {r['n']} | {r['dense']:.{digits}f} | {r['variant']} | "
                         f"{r['sparse']:.{digits}f} | {ci} | {_fmt(r['density'], 3)} |")
        if len(self.variants) == 1:
            for r in self.dense_only_rows():
                lines.append(f"| {r['task']} | {r['length']} | {r['n']} | {r['dense']:.{digits}f} | - | - | - | - |")
        if self.meta.get("command"):
            lines += ["", f"Command: `{self.meta['command']}` (commit {self.meta.get('commit')}, "
                          f"{self.meta.get('device')}, {self.meta.get('dtype')})"]
        return "\n".join(lines) + "\n"

    def plot(self, path: str | Path) -> Path | None:
        """Score against length per variant (the ``average`` row where there are several tasks)."""
        rows = self.rows()
        if not rows:
            return None
        from ..bench.plot import pyplot, save_figure

        plt = pyplot()

        tasks = {r["task"] for r in rows}
        task = AVERAGE_TASK if AVERAGE_TASK in tasks else sorted(tasks)[0]
        picked = [r for r in rows if r["task"] == task]
        fig, (ax_score, ax_delta) = plt.subplots(1, 2, figsize=(11, 4))
        dense_by_length: dict[int, float] = {}
        for variant in self.variants[1:]:
            mine = sorted((r for r in picked if r["variant"] == variant.name), key=lambda r: r["length"])
            if not mine:
                continue
            xs = [r["length"] for r in mine]
            for r in mine:
                dense_by_length[r["length"]] = r["dense"]
            ax_score.plot(xs, [r["sparse"] for r in mine], marker="o", label=variant.name)
            low = [r["delta"] - r["ci_low"] if not math.isnan(r["ci_low"]) else 0.0 for r in mine]
            high = [r["ci_high"] - r["delta"] if not math.isnan(r["ci_high"]) else 0.0 for r in mine]
            ax_delta.errorbar(xs, [r["delta"] for r in mine], yerr=[low, high], marker="o", capsize=3,
                              label=variant.name)
        xs = sorted(dense_by_length)
        ax_score.plot(xs, [dense_by_length[x] for x in xs], marker="s", color="black", label="dense")
        for ax in (ax_score, ax_delta):
            ax.set_xscale("log", base=2)
            ax.set_xlabel("length (tokens)")
            ax.legend()
            ax.grid(alpha=0.3)
        ax_delta.axhline(0.0, color="gray", lw=1)
        ax_score.set_ylabel(self.metric)
        ax_score.set_title(f"{self.kind} {task}: {self.model}")
        ax_delta.set_ylabel("sparse - dense (95% paired CI)")
        ax_delta.set_title("delta vs dense")
        return save_figure(fig, path, dpi=120)

    def write(self, out_dir: str | Path, stem: str | None = None, plot: bool = True) -> list[Path]:
        """Write ``<stem>.json``, ``<stem>.md`` and (with ``plot``) ``<stem>.png``; returns the paths."""
        return write_report_files(self, out_dir, stem or self.kind, plot=plot and len(self.variants) > 1)


def write_report_files(report: Any, out_dir: str | Path, stem: str, plot: bool) -> list[Path]:
    """``<stem>.json`` (``report.to_dict()``), ``<stem>.md`` (``report.markdown()``) and, with ``plot``,
    ``<stem>.png`` (``report.plot(path)``, which may decline by returning None)."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    json_path, md_path = out / f"{stem}.json", out / f"{stem}.md"
    json_path.write_text(json.dumps(report.to_dict(), indent=1, allow_nan=True) + "\n")
    md_path.write_text(report.markdown())
    written = [json_path, md_path]
    if plot:
        try:
            png = report.plot(out / f"{stem}.png")
        except MissingPlotterError as error:  # the results are written; the picture is optional
            print(f"[sparseprefill] no plot: {error} (the JSON and Markdown reports are written)",
                  file=sys.stderr, flush=True)
            png = None
        if png is not None:
            written.append(png)
    return written

