"""User-facing options: frozen dataclasses and ``str`` enums.

Every default below is a named constant with the reason it has that value. A setting that
"keeps everything" (mass threshold 1.0, a full budget) makes the sparse path compute exactly
dense attention; the tests rely on that to prove the plumbing before proving the estimates.
The decode options live in ``decode_config.py`` and the shared validators in ``_checks.py``; both are
re-exported here, so ``sparseprefill.config`` stays the one place to import options from.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field, fields, replace
from typing import Any

from ._checks import (
    _check_block_size,
    _check_bool,
    _check_fraction,
    _check_positive_int,
    _check_spot_check,
    _coerce_enum,
    _layer_indices,
)
from .decode_config import DECODE_SHORTHAND, DecodeMethod, DecodeRetrievalConfig
from .kernels.mass_select import KEEP_ALL_MASS
from .kernels.vertical_slash.head_columns import ColumnLayout

__all__ = [
    "PatternName",
    "VerticalSlashConfig",
    "BlockSparseConfig",
    "AntidiagonalConfig",
    "AShapeConfig",
    "SparseConfig",
    "KEEP_ALL_MASS",
    "ColumnLayout",
    "DecodeMethod",
    "DecodeRetrievalConfig",
]


class PatternName(str, enum.Enum):
    """The sparse patterns a head can use. ``AUTO`` picks per head at run time."""

    AUTO = "auto"
    VERTICAL_SLASH = "vertical_slash"
    BLOCK_SPARSE = "block_sparse"
    ANTIDIAGONAL = "antidiagonal"
    A_SHAPE = "a_shape"
    DENSE = "dense"


class AntidiagonalScoring(str, enum.Enum):
    """How the antidiagonal estimate turns a key group's ``S`` sampled logits into a score."""

    MEAN_LOGIT = "mean_logit"  # XAttention: softmax over groups of the mean of the S logits
    SAMPLED_MASS = "sampled_mass"  # the sampled pairs' own softmax: sum of exp of each logit


class RangeLayout(str, enum.Enum):
    """How the vertical-slash index hands its merged diagonal bands to the GPU kernel. The keys are the
    same in every layout (no accuracy effect); only the kernel's loop changes."""

    AUTO = "auto"  # pieces where they measured faster (kernels/vertical_slash: head_dim above 64)
    PIECES = "pieces"  # bands cut to the kernel's key tile: one flat, software-pipelined loop
    WHOLE = "whole"  # whole bands: a short loop per band inside the loop over bands


# MInference estimates vertical and slash lines from the last 64 queries: enough rows to average
# out one query's idiosyncrasies, few enough that estimation is O(64 * L) instead of O(L^2).
DEFAULT_LAST_QUERIES = 64

# Always-kept structure. Attention sinks live in the first few tokens of every head (StreamingLLM);
# MInference keeps 30 sink columns and the 100 nearest diagonals of every head unconditionally. We
# round up to 64 of each: one 64-wide tile on the GPU costs the same as 30 columns.
DEFAULT_SINK_TOKENS = 64
DEFAULT_LOCAL_TOKENS = 128

# Query windows whose line scores the vertical-slash estimate averages (spread over the prompt, the last
# ending at its end). On Qwen2.5-Coder-0.5B on an H100 (experiments/real_speed.py, docs/benchmarks.md),
# 4 windows against the last 64 rows alone: KL to dense 0.0045 / 0.036 / 0.019 instead of 0.0075 /
# 0.117 / 0.034 at 32K / 64K / 128K, top-1 0.969 / 0.938 / 0.963 instead of 0.955 / 0.912 / 0.947, for
# 0.04-0.08 more density and 1.1-1.8 ms more estimate per layer (1.48x instead of 1.63x dense's speed at
# 128K). One window misjudges heads whose middle rows look elsewhere than the last rows (YaRN layers 9
# and 16 at 64K); the accuracy-first choice is 4.
DEFAULT_QUERY_WINDOWS = 4

# Query blocks the block estimators' spot check scores exactly (AntidiagonalConfig.spot_check_recall):
# spread over the prompt, the last among them. At 128-row blocks and 128K that is 8 of 1024 query
# blocks, two passes over their keys: about 1.6% of the layer's dense attention.
SPOT_CHECK_BLOCKS = 8

# Held-out recall below which a head is routed dense (VerticalSlashConfig.heldout_recall). On Qwen2.5-
# Coder-0.5B at 128K (H100) 0.9 lifted top-1 agreement with dense from 0.963 to 0.971 and cut the KL
# from 0.019 to 0.015 for 0.06 more density, 1.32x cuDNN instead of 1.46x; forced sparse at 64K it cut
# the KL from 0.036 to 0.008. 0.8 barely helped at 128K (top-1 0.961, KL 0.017).
DEFAULT_HELDOUT_RECALL = 0.9

# Mass targets for vertical-slash (and so for the default "auto"): FlexPrefill's gamma (0.9 in its
# README, 0.95 in its Llama-3.1 RULER scripts). On SmolLM2 at 8K, 0.95 kept 0.973 of the true
# attention mass (0.90: 0.947); we take the accuracy-first value.
DEFAULT_VERTICAL_MASS = 0.95
DEFAULT_SLASH_MASS = 0.95

# Block size of block-level patterns. 128 is the granularity XAttention's published accuracy was
# measured at and the natural tile of Hopper attention kernels; 64 gives finer (sparser) masks.
DEFAULT_BLOCK_SIZE = 128

# Cumulative block-mass threshold: XAttention's maintainers recommend a fixed 0.9-0.95 when no
# per-head calibration exists; we take the accuracy-first value.
DEFAULT_BLOCK_MASS = 0.95

# Antidiagonal stride: XAttention evaluates S = 8 and 16; S = 8 scores with twice the samples per
# block (more accurate thresholds) at 1/8 of the Q K^T cost.
DEFAULT_ANTIDIAGONAL_STRIDE = 8

# Number of leading KV blocks every query block keeps (the sink block of XAttention/FlexPrefill).
DEFAULT_SINK_BLOCKS = 1

# Key blocks before the diagonal every query block keeps (a local band); 0 is XAttention's layout.
DEFAULT_LOCAL_BLOCKS = 0

# Share of each head's keys the antidiagonal estimate also keeps as whole columns (the best by the last
# queries' scores); 0 is XAttention's layout: blocks only.
DEFAULT_VERTICAL_SHARE = 0.0

# A-shape (StreamingLLM) defaults: MInference's n_init=128, and a 4096-token local window
# (MInference uses 3968 so that init + local = 4096).
DEFAULT_A_SHAPE_SINK = 128
DEFAULT_A_SHAPE_LOCAL = 3968


# A chunk with fewer queries than one query block gains nothing from sparsity (its cost is one
# row of tiles either way), so it runs dense.
DEFAULT_MIN_SPARSE_QUERY_LEN = 64


@dataclass(frozen=True)
class VerticalSlashConfig:
    """MInference's vertical-slash pattern with FlexPrefill's mass-based budgets.

    The last ``last_queries`` queries score every key; columns ("verticals") and diagonals
    ("slashes") are kept, in order of estimated mass, until ``vertical_mass`` / ``slash_mass`` of
    the estimated mass is covered. ``sink_tokens`` first columns and ``local_tokens`` nearest
    diagonals are always kept. ``max_vertical`` / ``max_slash`` optionally cap the counts.

    ``query_windows`` (default 4) scores that many windows of ``last_queries`` rows, ending at evenly
    spaced points of the prompt (the last at its end), each against the keys it can see, and averages
    their line scores: heads whose middle rows attend elsewhere than the last rows are then judged on
    more than the end of the prompt. 1 is MInference's estimate (the last rows alone).

    ``fused=True`` hands the selected lines straight to the fused kernel (no per-block index, no host
    read between estimate and attention, so a patched layer can be captured in a CUDA graph) instead
    of building the per-block index. It is off by default because it is slower: on real
    Qwen2.5-Coder-0.5B q/k at 128K on an H100 a fused layer took 1.13-1.21x the index path's time
    (every block checks each of its head's columns against its bands, where the index lists only the
    uncovered ones; experiments/real_speed.py, docs/benchmarks.md). Fused heads are never routed dense.

    ``range_layout`` (GPU, ``RangeLayout``): ``pieces`` has the index builder cut each merged diagonal
    band into pieces of the kernel's key tile, so the kernel walks them in one flat, software-pipelined
    loop instead of a short loop per band (at head_dim 128 on Llama shapes, H100: 0.51 instead of 0.44
    of cuDNN's rate on the default's index at 32K); ``whole`` keeps whole bands (on real Qwen q/k at
    head_dim 64 they were as fast or up to 3% faster); ``auto`` (default) chooses by head_dim from those
    measurements. The same keys in every layout: no accuracy effect.

    ``column_layout`` (``ColumnLayout``): ``block`` lists each query block's columns outside its bands,
    compacted: O(blocks x verticals) memory, 11.5x a Llama-3.1-8B layer's KV cache at 128K on the
    structured input (5.9 GB, transient, one layer at a time); ``head`` keeps one column list per head that
    each block masks by its bands in the kernel, and one table of block-relative ranges per head
    (``kernels/vertical_slash/head_ranges.py``, since stop 40; before it, per-block range pieces were most
    of the 625 MB, 1.2x, it kept there), but the attention took 1.08-1.24x the time with per-head
    columns (H100, experiments/kernel_profile.py --time-slacks, docs/benchmarks.md).
    ``auto`` (default): ``block`` unless its table would take more than half the device memory still
    available, then ``head`` (logged once, counted in ``stats()``). The same keys in every layout.

    ``heldout_recall`` (default 0.9; None turns it off): where heads are routed dense
    (``SparseConfig.route_dense_heads``, GPU), also route a head whose selected keys hold less than this
    share of the exact attention mass on query blocks the estimate did not score (those ending at the
    midpoints between its windows): a head whose attention there differs from the scored rows is one
    the estimate cannot predict, and it runs exact. Costs two passes over those blocks' keys per head
    (about four 64-row attention passes per layer; ``kernels/vertical_slash/triton_recall.py``).
    """

    last_queries: int = DEFAULT_LAST_QUERIES
    vertical_mass: float = DEFAULT_VERTICAL_MASS
    slash_mass: float = DEFAULT_SLASH_MASS
    sink_tokens: int = DEFAULT_SINK_TOKENS
    local_tokens: int = DEFAULT_LOCAL_TOKENS
    max_vertical: int | None = None
    max_slash: int | None = None
    block_size: int = 64
    query_windows: int = DEFAULT_QUERY_WINDOWS
    fused: bool = False
    heldout_recall: float | None = DEFAULT_HELDOUT_RECALL
    range_layout: RangeLayout = RangeLayout.AUTO
    column_layout: ColumnLayout = ColumnLayout.AUTO

    def __post_init__(self) -> None:
        _check_bool("vertical_slash.fused", self.fused)
        _coerce_enum(self, "range_layout", RangeLayout, "vertical_slash.range_layout")
        _coerce_enum(self, "column_layout", ColumnLayout, "vertical_slash.column_layout")
        if self.heldout_recall is not None:
            _check_fraction("vertical_slash.heldout_recall", self.heldout_recall)
        _check_positive_int("vertical_slash.last_queries", self.last_queries)
        _check_positive_int("vertical_slash.query_windows", self.query_windows)
        _check_fraction("vertical_slash.vertical_mass", self.vertical_mass, allow_zero=True)
        _check_fraction("vertical_slash.slash_mass", self.slash_mass, allow_zero=True)
        _check_positive_int("vertical_slash.sink_tokens", self.sink_tokens, allow_zero=True)
        _check_positive_int("vertical_slash.local_tokens", self.local_tokens)
        for name in ("max_vertical", "max_slash"):
            value = getattr(self, name)
            if value is not None:
                _check_positive_int(f"vertical_slash.{name}", value)
        _check_block_size("vertical_slash.block_size", self.block_size)


@dataclass(frozen=True)
class BlockSparseConfig:
    """Mean-pooled query/key block scores; keep blocks by cumulative softmax mass or top-k.

    With ``top_k`` set, each query block keeps the sink and diagonal blocks plus its ``top_k``
    highest-scoring other blocks and ``mass`` is ignored. ``spot_check_recall``, ``spot_check_quantile``:
    see ``AntidiagonalConfig``.
    """

    block_size: int = DEFAULT_BLOCK_SIZE
    mass: float = DEFAULT_BLOCK_MASS
    top_k: int | None = None
    sink_blocks: int = DEFAULT_SINK_BLOCKS
    spot_check_recall: float | None = None
    local_blocks: int = DEFAULT_LOCAL_BLOCKS
    spot_check_quantile: float | None = None

    def __post_init__(self) -> None:
        _check_positive_int("block_sparse.local_blocks", self.local_blocks, allow_zero=True)
        _check_block_size("block_sparse.block_size", self.block_size)
        _check_spot_check("block_sparse", self.spot_check_recall, self.spot_check_quantile)
        _check_fraction("block_sparse.mass", self.mass, allow_zero=True)
        if self.top_k is not None:
            # 0 would keep only the forced sink and diagonal blocks: ask for a_shape instead.
            _check_positive_int("block_sparse.top_k", self.top_k)
        _check_positive_int("block_sparse.sink_blocks", self.sink_blocks, allow_zero=True)


@dataclass(frozen=True)
class AntidiagonalConfig:
    """XAttention: strided antidiagonal block scoring, softmaxed block mass, row threshold.

    ``spot_check_recall`` (default None: off): where heads are routed dense
    (``SparseConfig.route_dense_heads``, GPU), also route a head whose kept blocks hold less than this
    share of the exact attention mass on any of ``SPOT_CHECK_BLOCKS`` query blocks spread over the
    prompt (the last among them): the block scores are estimates, and a head they misjudge runs exact.
    Costs two passes over those blocks' keys per head (``block_sparse.block_sparse_block_recall``). Not
    yet measured end to end: on Qwen2.5-Coder-0.5B at 64K this estimator drifts where the block oracle
    does not (docs/benchmarks.md, the accuracy floor), which is what the check is meant to catch.

    ``spot_check_quantile`` (default None: each checked block's mean over its rows): the check compares
    this quantile of the per-row recall over all checked rows (0: the worst row, 0.05: the 5th
    percentile) with ``spot_check_recall`` instead. A head that retrieves from far back on a few rows
    keeps most of its mass on the others, so its block means stay high while those rows lose most of
    theirs: on Qwen2.5-Coder-0.5B at 64K the heads whose misses moved the answers had a 5th-percentile
    row recall of 0.1-0.6 against 0.84 for the median head (stop 29's drift study).

    ``alternate`` (default False: XAttention's scoring): odd reshaped rows take their antidiagonal one
    query earlier. With an even ``stride`` the fixed antidiagonal only ever pairs a query and a key an
    odd distance apart, so a head that copies from a fixed even distance back scores nothing there;
    alternating rows sample both parities at the same cost (``kernels.antidiagonal_block_mass``).

    ``scoring`` (``AntidiagonalScoring``): ``mean_logit`` (default, XAttention) softmaxes the mean of
    each key group's ``S`` antidiagonal logits, which dilutes a spike on one key ``S``-fold in the
    exponent, so the kept share of the estimate overstates the true one (on SmolLM2 at 8K, mass 0.95
    kept 0.72-0.76 of the true mass in layers 3 and 7); ``sampled_mass`` sums the exponentials of the
    sampled logits themselves (each pair exact, causal per pair), an estimate of the true block mass
    from 1/S of the pairs at the same FLOPs (0.95-0.96 there at mass 0.95; GPU: one sweep only). On
    Qwen2.5-Coder-0.5B at 64K / 128K it did not cure the estimate's drift (top-1 0.916 / 0.939; 0.949 /
    0.957 at mass 0.98), and its kernel costs 2-3.3x the mean-logit one (0.24-0.37 of dense attention).

    ``local_blocks`` (default 0): every query block also keeps the key blocks within this many blocks
    before its diagonal, whatever their score. A row whose mass sits on one key a few hundred positions
    back (a copy) holds a negligible share of its block averaged over the block's rows, so no block
    threshold keeps it. On Qwen2.5-Coder-0.5B it cuts the KL at 8K-32K (32K: top-1 0.977 at density
    0.284 with 16 blocks), but not at 64K-128K, where the missed mass lies 8K-60K keys back.

    ``vertical_share`` (default 0: blocks only): every query block also attends the head's best
    ``ceil(vertical_share * Lk)`` key columns, ranked by the mean probability of the last
    ``DEFAULT_LAST_QUERIES`` queries (the vertical-slash estimate's column scores), wherever no kept
    block holds them. A key that a few rows of a block retrieve from far back holds a negligible share
    of its block's averaged score; on Qwen2.5-Coder-0.5B at 64K the top 1% of columns held 29-35% of
    the mass the blocks missed on the worst heads. The columns are a per-block list inside the block
    index (``BlockSparseIndex.column_index``), which the block kernel attends after the blocks.
    """

    block_size: int = DEFAULT_BLOCK_SIZE
    stride: int = DEFAULT_ANTIDIAGONAL_STRIDE
    mass: float = DEFAULT_BLOCK_MASS
    sink_blocks: int = DEFAULT_SINK_BLOCKS
    spot_check_recall: float | None = None
    alternate: bool = False
    scoring: AntidiagonalScoring = AntidiagonalScoring.MEAN_LOGIT
    local_blocks: int = DEFAULT_LOCAL_BLOCKS
    vertical_share: float = DEFAULT_VERTICAL_SHARE
    spot_check_quantile: float | None = None

    def __post_init__(self) -> None:
        _check_positive_int("antidiagonal.local_blocks", self.local_blocks, allow_zero=True)
        _check_fraction("antidiagonal.vertical_share", self.vertical_share, allow_zero=True)
        _check_spot_check("antidiagonal", self.spot_check_recall, self.spot_check_quantile)
        _check_bool("antidiagonal.alternate", self.alternate)
        _coerce_enum(self, "scoring", AntidiagonalScoring, "antidiagonal.scoring")
        _check_block_size("antidiagonal.block_size", self.block_size)
        _check_positive_int("antidiagonal.stride", self.stride)
        if self.block_size % self.stride:
            raise ValueError(
                f"antidiagonal.block_size ({self.block_size}) must be a multiple of "
                f"antidiagonal.stride ({self.stride})"
            )
        _check_fraction("antidiagonal.mass", self.mass, allow_zero=True)
        _check_positive_int("antidiagonal.sink_blocks", self.sink_blocks, allow_zero=True)


@dataclass(frozen=True)
class AShapeConfig:
    """StreamingLLM's A-shape: ``sink_tokens`` first keys plus a ``local_tokens`` window."""

    sink_tokens: int = DEFAULT_A_SHAPE_SINK
    local_tokens: int = DEFAULT_A_SHAPE_LOCAL
    block_size: int = 64

    def __post_init__(self) -> None:
        _check_positive_int("a_shape.sink_tokens", self.sink_tokens, allow_zero=True)
        _check_positive_int("a_shape.local_tokens", self.local_tokens)
        _check_block_size("a_shape.block_size", self.block_size)


@dataclass(frozen=True)
class SparseConfig:
    """How ``sparseprefill.patch`` computes attention.

    Attributes:
        pattern: ``"auto"`` (default: vertical-slash with per-head mass budgets, no profile needed;
            see ``patterns/auto.py`` for why) or one pattern forced
            for every head (``"vertical_slash"``, ``"block_sparse"``, ``"antidiagonal"``,
            ``"a_shape"``, ``"dense"``).
        min_sparse_len: ``None`` (default): a prefill runs sparse only where the measured cost model
            (``patterns/cost.py``) predicts it faster than dense for this model's head counts,
            head_dim, patterns and length; elsewhere dense, exactly as unpatched (stats record
            ``cost_model``). An int forces the old rule: sparse at every key length from this one
            up (0: always), dense below it (``short_prompt``).
        min_sparse_query_len: chunks with fewer new queries than this run dense.
        route_dense_heads: on the GPU, a head whose estimate keeps at least its sparse kernel's
            break-even share of causal pairs (``patterns.cost.dense_break_even``: about 0.7 at head_dim
            64, where the kernel computes a pair at about 0.7 of cuDNN's rate) runs dense attention
            (SDPA) instead; costs one host read per layer; ``stats()`` counts these heads. Not on the
            CPU (no cost model there) nor on the fused vertical-slash path. On Qwen2.5-Coder-0.5B (H100,
            4 query windows) it made 128K faster and closer to dense (1.48x instead of 1.41x of cuDNN,
            KL 0.019 instead of 0.025; its most diffuse layer 76 instead of 88 ms) and changed nothing at
            64K; at 32K and below it costs 1-3 ms per layer, but there the default runs dense anyway.
        dense_layers: layer indices whose every head runs dense (pattern ``"dense"``: SDPA on the GPU),
            whatever the pattern or profile says for them; the peers keep the first layers of some
            models dense for accuracy. ``patch`` refuses an index past the model's layers.
        vertical_slash, block_sparse, antidiagonal, a_shape: per-pattern budgets.
        decode: top-k KV page retrieval for decode (``DecodeRetrievalConfig``, its dict, or ``"topk"`` for
            the defaults); None (default) decodes dense, exactly as unpatched.
    """

    pattern: PatternName | str = PatternName.AUTO
    min_sparse_len: int | None = None
    min_sparse_query_len: int = DEFAULT_MIN_SPARSE_QUERY_LEN
    route_dense_heads: bool = True
    dense_layers: tuple[int, ...] = ()
    vertical_slash: VerticalSlashConfig = field(default_factory=VerticalSlashConfig)
    block_sparse: BlockSparseConfig = field(default_factory=BlockSparseConfig)
    antidiagonal: AntidiagonalConfig = field(default_factory=AntidiagonalConfig)
    a_shape: AShapeConfig = field(default_factory=AShapeConfig)
    decode: DecodeRetrievalConfig | None = None

    def __post_init__(self) -> None:
        try:
            pattern = PatternName(self.pattern)
        except ValueError:
            valid = ", ".join(repr(p.value) for p in PatternName)
            raise ValueError(f"unknown pattern {self.pattern!r}; expected one of {valid}") from None
        object.__setattr__(self, "pattern", pattern)
        if self.min_sparse_len is not None:
            _check_positive_int("min_sparse_len", self.min_sparse_len, allow_zero=True)
        _check_positive_int("min_sparse_query_len", self.min_sparse_query_len)
        _check_bool("route_dense_heads", self.route_dense_heads)
        object.__setattr__(self, "dense_layers", _layer_indices("dense_layers", self.dense_layers))
        expected = {
            "vertical_slash": VerticalSlashConfig,
            "block_sparse": BlockSparseConfig,
            "antidiagonal": AntidiagonalConfig,
            "a_shape": AShapeConfig,
        }
        for name, cls in expected.items():
            value = getattr(self, name)
            if isinstance(value, dict):
                object.__setattr__(self, name, cls(**value))
            elif not isinstance(value, cls):
                raise TypeError(f"{name} must be a {cls.__name__}, got {type(value).__name__}")
        decode = self.decode
        if decode == DECODE_SHORTHAND:
            decode = DecodeRetrievalConfig()
        elif isinstance(decode, dict):
            decode = DecodeRetrievalConfig(**{k: tuple(v) if k == "dense_layers" else v for k, v in decode.items()})
        elif decode is not None and not isinstance(decode, DecodeRetrievalConfig):
            raise TypeError(f"decode must be a DecodeRetrievalConfig, a dict, {DECODE_SHORTHAND!r} or None, "
                            f"got {decode!r}")
        object.__setattr__(self, "decode", decode)

    @classmethod
    def keep_everything(cls, pattern: PatternName | str = PatternName.AUTO, **overrides: Any) -> SparseConfig:
        """A config whose every pattern keeps all causal keys: the sparse path equals dense.

        Useful to check an integration end to end before trusting any estimate.
        """
        base = cls(
            pattern=pattern,
            min_sparse_len=0,
            min_sparse_query_len=1,
            vertical_slash=VerticalSlashConfig(vertical_mass=KEEP_ALL_MASS, slash_mass=KEEP_ALL_MASS),
            block_sparse=BlockSparseConfig(mass=KEEP_ALL_MASS),
            antidiagonal=AntidiagonalConfig(mass=KEEP_ALL_MASS),
            a_shape=AShapeConfig(local_tokens=2**62),
        )
        return replace(base, **overrides)

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for f in fields(self):
            value = getattr(self, f.name)
            if isinstance(value, enum.Enum):
                value = value.value
            elif isinstance(value, DecodeRetrievalConfig):
                value = value.to_dict()
            elif isinstance(value, tuple):
                value = list(value)
            elif hasattr(value, "__dataclass_fields__"):
                value = {g.name: getattr(value, g.name) for g in fields(value)}
            out[f.name] = value
        return out
