"""Per-model patch state and per-layer statistics."""

from __future__ import annotations

import enum
import functools
import logging
from collections import Counter
from dataclasses import dataclass, field
from typing import Any, Callable

import torch

from ..config import SparseConfig
from ..patterns import SparsePattern
from ..patterns.cost import MIN_PREDICTED_SPEEDUP, predicted_speedup

logger = logging.getLogger("sparseprefill")

# Cost-model decisions remembered per (Lq, Lk, device): one per prompt length in practice.
MAX_COST_DECISIONS = 4096

__all__ = ["Phase", "FallbackReason", "HeadGroup", "LayerPlan", "LayerStats", "PatchStats", "PatchState"]


class Phase(str, enum.Enum):
    """What one attention call computed."""

    SPARSE_PREFILL = "sparse_prefill"  # fresh prefill, per-head sparse patterns
    SPARSE_CHUNK = "sparse_chunk"  # chunked prefill / follow-up turn, patterns with a query offset
    WINDOW = "sliding_window_exact"  # a sliding-window layer: exact window attention
    SPARSE_DECODE = "sparse_decode"  # decode (Lq == 1) over the top-k KV pages (SparseConfig.decode)
    RETRIEVAL_CHUNK = "retrieval_chunk"  # a short follow-up chunk over the top-k KV pages (decode.follow_up_chunks)
    DENSE = "dense"  # dense, for the reason recorded alongside


class FallbackReason(str, enum.Enum):
    """Why a call did not run as planned: dense, or (``PROFILE_RANGE``) the config's own pattern instead of
    the profile's."""

    DECODE = "decode"  # Lq == 1
    SHORT = "short_prompt"  # Lk < min_sparse_len
    COST_MODEL = "cost_model"  # min_sparse_len=None and the cost model predicts no gain (patterns/cost.py)
    UNALIGNED = "unaligned_cache"  # keys run past the queries (static cache) or a custom mask overlay
    SHORT_QUERY = "short_query_chunk"  # Lq < min_sparse_query_len
    TRAINING = "training_or_dropout"
    OUTPUT_ATTENTIONS = "output_attentions"
    PADDING_HOLES = "non_contiguous_padding"
    FORCED_DENSE = "pattern_dense"
    # Decode with SparseConfig.decode set, but this call runs dense (exactly the previous implementation):
    DECODE_SHORT = "decode_short_context"  # Lk < decode.min_context
    DECODE_DENSE_LAYER = "decode_dense_layer"  # layer listed in decode.dense_layers
    DECODE_SLIDING = "decode_sliding_window"  # a sliding-window layer (its window is already the budget)
    DECODE_MASK = "decode_unsupported_mask"  # static cache (keys past the query), non-contiguous padding, or
    # a mask type the decode path cannot read
    # A prompt longer than every prompt the profile was calibrated on: its per-head settings were never
    # measured there, so the config's own pattern ran instead (patch(allow_profile_extrapolation=True) keeps
    # the profile). On Qwen2.5-Coder-0.5B profiles calibrated at <= 32K fell from top-1 0.94-0.97 to 0.69
    # at 64K, and one calibrated at 64K ran 128K less accurately than one mass for every head.
    PROFILE_RANGE = "profile_beyond_calibration"


@dataclass(frozen=True)
class HeadGroup:
    """Query heads ``heads`` of one layer that share a pattern."""

    pattern: SparsePattern
    heads: tuple[int, ...]


@dataclass(frozen=True)
class LayerPlan:
    groups: tuple[HeadGroup, ...]


# Pending device-side pair counts per layer before they are folded into one (see LayerStats.record).
MAX_PENDING_COUNTS = 256


class DeviceCount:
    """A count added to as host ints or device tensors (0-d, or summable), the tensors summed on the device
    and read only when the total is read: a read per layer in the forward pass would stall the host until
    the GPU caught up, and inside a traced graph it would break the graph."""

    def __init__(self) -> None:
        self._total = 0
        self._pending: list[torch.Tensor] = []

    def add(self, count: int | bool | torch.Tensor) -> None:
        if isinstance(count, torch.Tensor):
            self._pending.append(count.reshape(-1).sum().to(torch.int64))
            if len(self._pending) >= MAX_PENDING_COUNTS:  # folded on the device: a bounded list, no read
                self._pending = [torch.stack(self._pending).sum()]
        else:
            self._total += int(count)

    @property
    def total(self) -> int:
        if self._pending:
            self._total += int(torch.stack(self._pending).sum())
            self._pending.clear()
        return self._total

    def __repr__(self) -> str:
        return f"DeviceCount({self.total})"


@dataclass
class LayerStats:
    layer_idx: int
    phases: Counter = field(default_factory=Counter)
    fallbacks: Counter = field(default_factory=Counter)
    patterns: Counter = field(default_factory=Counter)
    # Sparse calls whose vertical-slash index kept one column list per head (``column_layout``: asked for,
    # or chosen by ``auto`` where the per-block table would not fit the device memory), and with it one
    # range table per head (``HEAD_RANGES_WITH_HEAD_COLUMNS``).
    _per_head_columns: DeviceCount = field(default_factory=DeviceCount, repr=False)
    causal_pairs: int = 0
    # (batch row, head) pairs of sparse calls whose estimate kept past the kernel's break-even, or failed
    # the pattern's own check (VerticalSlashConfig.heldout_recall), so they ran dense attention instead
    # (SparseConfig.route_dense_heads); their pairs count as computed.
    _dense_heads: DeviceCount = field(default_factory=DeviceCount, repr=False)
    # Computed-pair counts recorded as device tensors, read back when the stats are read: an int() per
    # layer in the forward pass would stall the host until the GPU caught up, once per layer.
    _computed_total: int = field(default=0, repr=False)
    _pending: list = field(default_factory=list, repr=False)
    _last: tuple[Any, int] | None = field(default=None, repr=False)

    def _flush(self) -> None:
        if self._pending:
            self._computed_total += int(torch.stack([t.reshape(()) for t in self._pending]).sum())
            self._pending.clear()

    @property
    def estimated_dense_heads(self) -> int:
        return self._dense_heads.total

    @property
    def per_head_columns(self) -> int:
        return self._per_head_columns.total

    def record_dense_heads(self, count: int | torch.Tensor) -> None:
        """``count``: an int, or a 0-d device tensor (from a traced graph; read when the stats are read)."""
        self._dense_heads.add(count)

    def record_per_head_columns(self, used: bool | torch.Tensor) -> None:
        """One sparse call whose index did (True) or did not keep per-head column lists (a 0-d bool device
        tensor from a traced graph; read when the stats are read)."""
        self._per_head_columns.add(used)

    @property
    def computed_pairs(self) -> int:
        self._flush()
        return self._computed_total

    @property
    def last_density(self) -> float | None:
        """Density of the latest non-fallback call."""
        if self._last is None or not self._last[1]:
            return None
        computed, causal = self._last
        return int(computed) / causal

    @property
    def density(self) -> float | None:
        """Computed / causal (query, key) pairs over all non-fallback calls so far."""
        return self.computed_pairs / self.causal_pairs if self.causal_pairs else None

    def record(self, phase: Phase, computed: int | torch.Tensor, causal: int) -> None:
        """``computed``: an int, or a 0-d / summable int64 device tensor (summed, never synchronised here)."""
        self.phases[phase.value] += 1
        if isinstance(computed, torch.Tensor):
            computed = computed.sum()
            self._pending.append(computed)
            if len(self._pending) >= MAX_PENDING_COUNTS:
                # Fold on the device (still no host read) so a model whose stats are never read holds
                # a bounded list.
                self._pending = [torch.stack(self._pending).sum()]
        else:
            self._computed_total += computed
        self.causal_pairs += causal
        self._last = (computed, causal)

    def record_fallback(self, reason: FallbackReason) -> None:
        if reason is FallbackReason.PROFILE_RANGE:  # sparse still, on the config's pattern: not a dense call
            self.fallbacks[reason.value] += 1
            return
        if not self.fallbacks[reason.value]:
            logger.info("sparseprefill: layer %d runs dense for %s", self.layer_idx, reason.value)
        self.phases[Phase.DENSE.value] += 1
        self.fallbacks[reason.value] += 1

    def to_dict(self) -> dict[str, Any]:
        return {
            "layer": self.layer_idx,
            "phases": dict(self.phases),
            "fallbacks": dict(self.fallbacks),
            "patterns": dict(self.patterns),
            "estimated_dense_heads": self.estimated_dense_heads,
            "per_head_columns": self.per_head_columns,
            "density": self.density,
            "last_density": self.last_density,
            "computed_pairs": self.computed_pairs,
            "causal_pairs": self.causal_pairs,
        }


@dataclass
class PatchStats:
    """What ``sparseprefill.stats(model)`` returns: one ``LayerStats`` per decoder layer."""

    model_type: str
    pattern: str
    layers: list[LayerStats]
    # Under tensor parallelism each rank computes (and counts) only its own heads.
    tp_size: int = 1
    tp_rank: int = 0

    @property
    def density(self) -> float | None:
        """Overall computed / causal pairs across layers (sparse and window calls)."""
        causal = sum(s.causal_pairs for s in self.layers)
        return sum(s.computed_pairs for s in self.layers) / causal if causal else None

    @property
    def estimated_dense_heads(self) -> int:
        """Head calls that ran dense because their estimate kept past the kernel's break-even or failed
        the held-out recall check."""
        return sum(s.estimated_dense_heads for s in self.layers)

    @property
    def per_head_columns(self) -> int:
        """Sparse calls whose vertical-slash index kept one column list (and range table) per head
        (``column_layout``)."""
        return sum(s.per_head_columns for s in self.layers)

    @property
    def fallbacks(self) -> Counter:
        total: Counter = Counter()
        for s in self.layers:
            total.update(s.fallbacks)
        return total

    @property
    def phases(self) -> Counter:
        total: Counter = Counter()
        for s in self.layers:
            total.update(s.phases)
        return total

    def to_dict(self) -> dict[str, Any]:
        return {
            "model_type": self.model_type,
            "pattern": self.pattern,
            "tp_size": self.tp_size,
            "tp_rank": self.tp_rank,
            "density": self.density,
            "phases": dict(self.phases),
            "fallbacks": dict(self.fallbacks),
            "estimated_dense_heads": self.estimated_dense_heads,
            "per_head_columns": self.per_head_columns,
            "layers": [s.to_dict() for s in self.layers],
        }

    def __str__(self) -> str:
        density = "n/a" if self.density is None else f"{self.density:.3f}"
        tp = f", tensor parallel rank {self.tp_rank} of {self.tp_size} (this rank's heads)" if self.tp_size > 1 else ""
        lines = [f"sparseprefill stats: {self.model_type}, pattern={self.pattern}, overall density={density}{tp}"]
        lines.append(f"{'layer':>5}  {'density':>7}  phases / fallbacks")
        for s in self.layers:
            d = "-" if s.density is None else f"{s.density:.3f}"
            phases = ", ".join(f"{k}={v}" for k, v in sorted(s.phases.items())) or "no calls"
            beyond = s.fallbacks.get(FallbackReason.PROFILE_RANGE.value, 0)
            falls = ", ".join(f"{k}={v}" for k, v in sorted(s.fallbacks.items())
                              if k != FallbackReason.PROFILE_RANGE.value)
            routed = f" [{s.estimated_dense_heads} head calls dense by estimate]" if s.estimated_dense_heads else ""
            routed += f" [{s.per_head_columns} calls with per-head column lists]" if s.per_head_columns else ""
            config_pattern = f" [config's pattern, not the profile's: {FallbackReason.PROFILE_RANGE.value}={beyond}]"
            lines.append(f"{s.layer_idx:>5}  {d:>7}  {phases}" + (f" [dense: {falls}]" if falls else "") + routed
                         + (config_pattern if beyond else ""))
        return "\n".join(lines)


@dataclass
class PatchState:
    config: SparseConfig
    model_type: str
    previous_implementation: str  # restored by unpatch
    fallback_implementation: str  # runs the dense fallbacks (eager where the previous one drops a soft-cap)
    plans: dict[int, LayerPlan]
    stats: dict[int, LayerStats]
    config_ids: tuple[int, ...] = ()
    # Called as observer(layer, q, k, scale=..., softcap=...) with each span's post-RoPE q [B, H, Lq, D]
    # and k [B, Hkv, Lk, D] before its heads' patterns run (the profiler measures candidates here).
    observer: Callable[..., None] | None = None
    # Called as inspector(layer, q, k, v, out, selections, scale=..., softcap=...) after a span's
    # patterns ran: ``out [B, H, Lq, D]`` is the sparse output and ``selections`` lists
    # (query heads, index) per head group (index None = dense). The fidelity eval measures here.
    inspector: Callable[..., None] | None = None
    # Called as decode_inspector(layer, q, k, v, out, page_index, page_count, page_size=..., scale=...,
    # softcap=...) after each sparse decode step's attention, per row group (``page_index`` None where the
    # group attended all its keys). The decode accuracy experiment measures here.
    decode_inspector: Callable[..., None] | None = None
    profile: Any = None  # the Profile the plans came from, if any
    # With a measured profile: the plans of the config's own pattern, for prompts longer than
    # ``profile_max_len`` (the profile's longest calibration prompt; FallbackReason.PROFILE_RANGE).
    beyond_profile_plans: dict[int, LayerPlan] | None = None
    profile_max_len: int | None = None
    # Decode retrieval state (``patterns/retrieval.DecodeState``: per-layer page summaries and selections),
    # created on the first sparse decode call when SparseConfig.decode is set.
    decode: Any = None
    # Per-layer decode settings from the profile's ``decode`` overrides: a DecodeRetrievalConfig, or None
    # for a layer the profile keeps dense. Layers not listed use ``config.decode``.
    decode_configs: dict[int, Any] = field(default_factory=dict)
    # Per layer, the (query, KV) head counts every attention call must have: the config's, or the
    # rank's slice under tensor parallelism (``plans`` then index local heads; see tensor_parallel.py).
    head_counts: dict[int, tuple[int, int]] = field(default_factory=dict)
    tensor_parallel: Any = None  # a tensor_parallel.TensorParallel, or None for an unsharded model
    # Per layer, the head_dim the cost model prices; sliding-window layers are left out (they compute
    # their exact window whether or not the prompt runs sparse).
    head_dims: dict[int, int] = field(default_factory=dict)
    _cost_decisions: dict[tuple[int, int, str], FallbackReason | None] = field(default_factory=dict)
    _warned_profile_range: bool = False

    def plans_for(self, k_len: int) -> tuple[dict[int, LayerPlan], bool]:
        """The plans a prefill over ``k_len`` keys runs, and whether they replace a profile's plans
        because the prompt is longer than every calibration prompt."""
        if self.beyond_profile_plans is not None and k_len > self.profile_max_len:
            if not self._warned_profile_range:
                logger.warning("sparseprefill: a %d-token prompt is longer than the profile's calibration prompts "
                               "(at most %d tokens); running the config's pattern (%s) instead of the profile's "
                               "(patch(..., allow_profile_extrapolation=True) keeps it)", k_len,
                               self.profile_max_len, self.config.pattern.value)
                self._warned_profile_range = True
            return self.beyond_profile_plans, True
        return self.plans, False

    def prefill_dense_reason(self, q_len: int, k_len: int, device_type: str) -> FallbackReason | None:
        """Why a plain prefill of ``q_len`` queries over ``k_len`` keys runs dense, or None (sparse):
        ``min_sparse_len`` when set, else the cost model over every priced layer's head groups."""
        min_len = self.config.min_sparse_len
        if min_len is not None:
            return FallbackReason.SHORT if k_len < min_len else None
        key = (q_len, k_len, device_type)
        if key not in self._cost_decisions:
            if len(self._cost_decisions) >= MAX_COST_DECISIONS:  # chunked prefill sees many lengths
                self._cost_decisions.clear()
            groups = [(group.pattern.name, len(group.heads), head_dim, group.pattern.query_windows,
                       group.pattern.estimate_cost_factor, group.pattern.cost_extras)
                      for layer, head_dim in self.head_dims.items() for group in self.plans_for(k_len)[0][layer].groups]
            speedup = predicted_speedup(groups, q_len, k_len, device_type)
            self._cost_decisions[key] = None if speedup >= MIN_PREDICTED_SPEEDUP else FallbackReason.COST_MODEL
            logger.debug("cost model: Lq=%d Lk=%d on %s predicts %.2fx -> %s", q_len, k_len, device_type, speedup,
                         "sparse" if self._cost_decisions[key] is None else "dense")
        return self._cost_decisions[key]

    def reset_stats(self) -> None:
        for layer in list(self.stats):
            self.stats[layer] = LayerStats(layer)


def full_plan(pattern: SparsePattern, num_heads: int) -> LayerPlan:
    return LayerPlan(groups=(HeadGroup(pattern=pattern, heads=tuple(range(num_heads))),))


@functools.lru_cache(maxsize=1024)
def heads_tensor(heads: tuple[int, ...], device: torch.device) -> torch.Tensor:
    """The head ids of a plan group on ``device``, built once: a host-to-device copy per layer and
    call would wait for the GPU queue. Callers must not modify the returned tensor."""
    return torch.tensor(heads, dtype=torch.long, device=device)
