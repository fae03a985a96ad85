"""What every pattern provides: ``estimate`` (q, k -> index) and ``attend`` (index -> output).

The two steps are separate so they can be timed, inspected and replaced separately; ``run`` chains
them and reports how many causal (query, key) pairs the index made the kernel compute.
"""

from __future__ import annotations

import abc
from dataclasses import dataclass
from typing import ClassVar, Union

import torch

from ..config import PatternName
from ..kernels import BlockSparseIndex, VerticalSlashIndex, fast_dense_attention, library
from ..kernels.geometry import causal_pairs_total
from ..kernels.indices import VerticalSlashLines
from .compiled import register_pattern, run_pattern_op
from .cost import NO_EXTRAS, EstimateExtras

SparseIndex = Union[BlockSparseIndex, VerticalSlashIndex, None]

__all__ = ["LinePattern", "SparsePattern", "PatternOutput", "SparseIndex", "attend_heads_dense", "inspectable_index"]


@dataclass(frozen=True)
class PatternOutput:
    """``computed_pairs [B, H]``: causal pairs the kernel computed (density numerator); ``index`` what
    the kernel read (``VerticalSlashLines`` for line patterns on their fused path; heads routed dense
    keep their estimated entries, except ``known_dense`` ones); ``dense_heads``: (batch row, head) pairs whose estimate kept at least
    ``dense_above`` of their pairs and that therefore ran dense attention (a 0-d device tensor where
    the routing ran inside a traced graph or a CUDA-graph capture)."""

    computed_pairs: torch.Tensor
    index: Union[SparseIndex, VerticalSlashLines]
    dense_heads: int | torch.Tensor = 0
    # [B, H] bool: heads routed dense before their index rows were built (``routed_estimate``); their rows
    # of ``index`` are empty (``inspected_index`` shows them whole). None: every head kept its entries.
    known_dense: torch.Tensor | None = None
    # The run went through one op under torch.compile (``compiled.run_pattern_op``): its index stayed
    # inside the op, and ``columns_per_head`` (a 0-d bool device tensor) says what the index was like.
    index_in_op: bool = False
    columns_per_head: torch.Tensor | None = None

    @property
    def per_head_columns(self) -> bool | torch.Tensor:
        """Whether the vertical-slash index kept one column list per head (a 0-d device tensor from an op)."""
        if self.columns_per_head is not None:
            return self.columns_per_head
        return isinstance(self.index, VerticalSlashIndex) and self.index.columns_per_head

    def inspected_index(self) -> SparseIndex:
        """The per-block index of what each head attended, for inspectors: ``index`` expanded from lines,
        with the ``known_dense`` heads listing every visible key."""
        if self.index_in_op:
            raise RuntimeError("sparseprefill: this layer ran inside torch.compile, where a line pattern's index "
                               "stays inside its op; run inspectors (profiling, recall) on the eager model")
        index = inspectable_index(self.index)
        return index if self.known_dense is None else index.with_heads_whole(self.known_dense)


def inspectable_index(index: Union[SparseIndex, VerticalSlashLines]) -> SparseIndex:
    """The per-block index of what a pattern selected, for inspectors and recall (lines are expanded
    to the ``VerticalSlashIndex`` of the same keys)."""
    return index.to_index() if isinstance(index, VerticalSlashLines) else index


class SparsePattern(abc.ABC):
    name: ClassVar[PatternName]
    # Query windows whose scores the estimate averages (the cost model prices each one past the first).
    query_windows: int = 1
    # The estimate's part that grows like dense attention, relative to the pattern's measured one
    # (``cost.PatternCost.estimate_dense_fraction``): an option that changes the estimate's work says so.
    estimate_cost_factor: float = 1.0
    # What the pattern's options add to its measured cost (``cost.EstimateExtras``).
    cost_extras: EstimateExtras = NO_EXTRAS
    # The estimate is a ``torch.library`` op of fixed output shapes (or plain traceable torch): ``run`` lets
    # torch.compile trace it instead of running it eagerly outside the graph.
    traceable_estimate: ClassVar[bool] = False
    # ``run`` returns an index of what it attended (``DensePattern``: none, every key is attended).
    returns_index: ClassVar[bool] = True

    @abc.abstractmethod
    def estimate(
        self, q: torch.Tensor, k: torch.Tensor, *, scale: float, softcap: float | None, kv_head_index: torch.Tensor
    ) -> SparseIndex:
        """``q [B, H, Lq, D]``, ``k [B, Hkv, Lk, D]`` -> an index over the H query heads."""

    def unpredictable_heads(
        self, q: torch.Tensor, k: torch.Tensor, index: SparseIndex, *, scale: float, softcap: float | None,
        kv_head_index: torch.Tensor,
    ) -> torch.Tensor | None:
        """``[B, H]`` bool: heads that ``run`` routes dense (with ``dense_above``) whatever their density,
        because their estimate failed a check of the pattern's own; None: no such check."""
        return None

    def attend(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        index: SparseIndex,
        *,
        scale: float,
        softcap: float | None,
        kv_head_index: torch.Tensor,
        out: torch.Tensor,
    ) -> torch.Tensor:
        # Through the torch.library ops: opaque to torch.compile, same kernels underneath.
        kwargs = dict(scale=scale, window=None, softcap=softcap, kv_head_index=kv_head_index, out=out)
        if isinstance(index, BlockSparseIndex):
            return library.call_block_sparse(q, k, v, index, **kwargs)
        if isinstance(index, VerticalSlashIndex):
            return library.call_vertical_slash(q, k, v, index, **kwargs)
        raise TypeError(f"{type(self).__name__} produced an unsupported index {type(index).__name__}")

    def routed_estimate(
        self, q: torch.Tensor, k: torch.Tensor, dense_pairs: float | None, *, scale: float, softcap: float | None,
        kv_head_index: torch.Tensor,
    ) -> tuple[SparseIndex, torch.Tensor | None]:
        """``run``'s estimate: the index, and ``[B, H]`` bool heads already known to list at least
        ``dense_pairs`` causal pairs (None: none known; their index rows may then be left empty, since
        ``run`` computes them dense). The default estimates every head."""
        kwargs = dict(scale=scale, softcap=softcap, kv_head_index=kv_head_index)
        if self.traceable_estimate:
            return self.estimate(q, k, **kwargs), None
        return _estimate_outside_compile(self, q, k, **kwargs), None

    def run(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        *,
        scale: float,
        softcap: float | None,
        kv_head_index: torch.Tensor,
        out: torch.Tensor,
        dense_above: float | None = None,
    ) -> PatternOutput:
        """Estimate, then attend. With ``dense_above`` (a share of causal pairs), a head whose index
        lists at least that share, or that ``unpredictable_heads`` flags, runs dense attention instead
        (``fast_dense_attention``: SDPA on the GPU), which costs one host read of the per-head flags."""
        kwargs = dict(scale=scale, softcap=softcap, kv_head_index=kv_head_index)
        causal = causal_pairs_total(q.shape[2], k.shape[2])
        index, known_dense = self.routed_estimate(q, k, None if dense_above is None else dense_above * causal,
                                                  **kwargs)
        pairs = index.computed_pairs()
        dense = None if dense_above is None else pairs >= dense_above * causal
        if known_dense is not None:
            dense = dense | known_dense
        if dense is not None:
            unpredictable = self.unpredictable_heads(q, k, index, **kwargs)
            dense = dense if unpredictable is None else dense | unpredictable
        if dense is not None and isinstance(index, BlockSparseIndex) and _no_host_reads(q):
            # Traced or captured code cannot branch on the flags: the routed heads list every visible block
            # and the block kernel computes them exactly (at its rate, not cuDNN's), with no host read.
            self.attend(q, k, v, index.with_heads_whole(dense), out=out, **kwargs)
            return PatternOutput(computed_pairs=torch.where(dense, causal, pairs), index=index,
                                 dense_heads=dense.sum(), known_dense=known_dense)
        dense_host = None if dense is None else dense.cpu()  # the one host read routing costs
        if dense_host is None or not dense_host.any():
            self.attend(q, k, v, index, out=out, **kwargs)
            return PatternOutput(computed_pairs=pairs, index=index, known_dense=known_dense)
        # The head -> KV head map is read here, while the queue is empty after the read above: read
        # after the sparse launch, it stalled the host behind the whole sparse kernel. The dense heads
        # come second because the sparse kernel writes zeros for the heads it was told to skip.
        kv_of_head = kv_head_index.tolist()
        if not dense_host.all():
            self.attend(q, k, v, index.without_heads(dense), out=out, **kwargs)
        attend_heads_dense(q, k, v, dense_host, kv_of_head, scale=scale, softcap=softcap, out=out)
        return PatternOutput(computed_pairs=torch.where(dense, causal, pairs), index=index,
                             dense_heads=int(dense_host.sum()), known_dense=known_dense)


# Line patterns route heads dense from their lines before building the index (``LinePattern.routed_estimate``).
# The decisions are provably the index's own (the bound never exceeds its count). Timed on real Qwen q/k (H100,
# stop 39, with the head-runs builder): the estimate of the diffuse last layer at 128K took 4.2 instead of
# 6.1 ms (9 of 14 heads found from their lines; 5.5 instead of 14.8 ms with the old builder), the other layers
# within +-0.6 ms; end to end at 128K the default ran 1,328 instead of 1,393 ms with the same density and
# logits. Its kernel (``triton_lines_bound``) passed 1,000 GPU fuzz cases against its torch twin.
DENSE_HEADS_FROM_LINES = True


class LinePattern(SparsePattern):
    """A pattern whose estimate is per-head vertical-slash lines. ``estimate`` expands them to the
    per-block index (the same keys), which ``run`` attends by default; where ``uses_fused_kernel``,
    ``run`` hands the lines straight to the fused kernel instead (``vertical_slash_lines_attention``:
    no per-block index, no host read between the estimate and the attention, so capturable in a CUDA
    graph; on real Qwen q/k at 128K on an H100 a fused layer took 1.13-1.21x the index path's time)."""

    # The lines ``estimate_lines`` returns ascend in their counts (spares the kernel's plan two sorts).
    lines_sorted: ClassVar[bool] = True

    def __init__(self, config):
        self.config = config
        # What torch.compile passes to the op that runs this pattern whole (``compiled.py``).
        self.op_key = register_pattern(self)

    @abc.abstractmethod
    def estimate_lines(
        self, q: torch.Tensor, k: torch.Tensor, *, scale: float, softcap: float | None, kv_head_index: torch.Tensor
    ) -> VerticalSlashLines:
        """``q [B, H, Lq, D]``, ``k [B, Hkv, Lk, D]`` -> per-head lines over the H query heads."""

    def estimate(self, q, k, *, scale, softcap, kv_head_index) -> VerticalSlashIndex:
        lines = self.estimate_lines(q, k, scale=scale, softcap=softcap, kv_head_index=kv_head_index)
        return self.index_of(lines, q)

    def index_of(self, lines: VerticalSlashLines, q: torch.Tensor) -> VerticalSlashIndex:
        """The per-block index of ``lines`` as ``estimate`` builds it for queries ``q``."""
        return lines.to_index(slashes_sorted=self.lines_sorted, max_range_keys=self.range_piece_keys(q),
                              column_layout=self.column_layout())

    def routed_estimate(self, q, k, dense_pairs, *, scale, softcap, kv_head_index, from_lines: bool | None = None):
        """With ``from_lines`` (None: ``DENSE_HEADS_FROM_LINES``), heads whose lines alone cover
        ``dense_pairs`` (``VerticalSlashLines.pairs_lower_bound``, at most the index's exact count, so ``run``
        would route them dense from the index too) get no index rows: the builder skips their blocks, which
        on a diffuse layer are most of its work (12 of 14.7 ms of estimate on Qwen's layer 23 at 128K, H200,
        stop 37)."""
        from_lines = DENSE_HEADS_FROM_LINES if from_lines is None else from_lines
        if dense_pairs is None or not from_lines:
            return super().routed_estimate(q, k, dense_pairs, scale=scale, softcap=softcap,
                                           kv_head_index=kv_head_index)
        return _line_index_outside_compile(self, q, k, dense_pairs, scale=scale, softcap=softcap,
                                           kv_head_index=kv_head_index)

    def range_piece_keys(self, q: torch.Tensor) -> int | None:
        """Width the index builder cuts merged ranges to, so the kernel walks them in one flat loop
        (None: ranges stay whole). The same keys either way; only the kernel's loop changes."""
        return None

    def column_layout(self) -> str:
        """How the index stores its columns (``ColumnLayout``: ``"block"`` or ``"head"``); the same keys."""
        return "block"

    def uses_fused_kernel(self) -> bool:
        """Whether ``run`` takes the fused path (the lines straight into the fused kernel: no host read,
        no per-block index, no dense routing) instead of the per-block index and its kernel."""
        return False

    def run(self, q, k, v, *, scale, softcap, kv_head_index, out, dense_above=None) -> PatternOutput:
        if torch.compiler.is_compiling():  # one opaque op: its host reads stay out of the graph
            return run_pattern_op(self, q, k, v, scale=scale, softcap=softcap, kv_head_index=kv_head_index,
                                  out=out, dense_above=dense_above)
        if not self.uses_fused_kernel():
            if q.is_cuda and torch.cuda.is_current_stream_capturing():
                # Said here, before the builder's size read invalidates the capture with a CUDA error.
                raise RuntimeError(
                    f"sparseprefill: {type(self).__name__} sizes its per-block index with a host read, which a "
                    "CUDA-graph capture cannot hold; capture with VerticalSlashConfig(fused=True) (the lines "
                    "straight into the fused kernel, no host read) or pattern='antidiagonal' / 'block_sparse'")
            return super().run(q, k, v, scale=scale, softcap=softcap, kv_head_index=kv_head_index, out=out,
                               dense_above=dense_above)
        lines = _estimate_outside_compile(self, q, k, scale=scale, softcap=softcap, kv_head_index=kv_head_index,
                                          as_lines=True)
        library.call_vertical_slash_lines(q, k, v, lines, scale=scale, window=None, softcap=softcap,
                                          kv_head_index=kv_head_index, out=out, lines_sorted=self.lines_sorted)
        return PatternOutput(computed_pairs=lines.computed_pairs(), index=lines)


def attend_heads_dense(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, heads: torch.Tensor,
    kv_head_index: torch.Tensor | list[int], *, scale: float, softcap: float | None, out: torch.Tensor,
) -> None:
    """Dense attention for the (batch row, query head) pairs set in ``heads [B, H]`` (bool, on the
    host), written into their slices of ``out [B, H, Lq, D]``; one call per batch row and KV head, so
    GQA needs no repeated K/V (``kv_head_index`` maps query heads to KV heads: a device tensor, or its
    values as a host list, which spares the read)."""
    kv_of_head = kv_head_index if isinstance(kv_head_index, list) else kv_head_index.tolist()
    for b in range(heads.shape[0]):
        by_kv: dict[int, list[int]] = {}
        for h in torch.nonzero(heads[b]).flatten().tolist():
            by_kv.setdefault(kv_of_head[h], []).append(h)
        for kv, group in by_kv.items():
            rows = slice(b, b + 1)
            out[rows, group] = fast_dense_attention(q[rows, group], k[rows, kv:kv + 1], v[rows, kv:kv + 1],
                                                    scale=scale, softcap=softcap)


# The vertical-slash family's estimates launch Triton kernels directly and some
# size their indices on the host, which torch.compile cannot trace: run them eagerly, so a compiled
# patched model breaks its graph there once per sparse layer with this one reason instead of dynamo's
# data-dependent-shape traces, and fullgraph=True fails saying why. (The block estimates are ops of
# fixed shapes: ``traceable_estimate``.)
ESTIMATE_COMPILE_REASON = (
    "sparseprefill: sparse estimation runs outside torch.compile for this pattern (Triton launches; some "
    "estimators size their indices on the host), so fullgraph=True cannot compile its sparse layers; "
    "pattern='antidiagonal' or 'block_sparse' compiles whole"
)


def _no_host_reads(q: torch.Tensor) -> bool:
    """Inside a torch.compile trace or a CUDA-graph capture, where reading a device value on the host
    breaks the graph (or the capture)."""
    return torch.compiler.is_compiling() or (q.is_cuda and torch.cuda.is_current_stream_capturing())


def _estimate(pattern: SparsePattern, q, k, as_lines: bool = False, **kwargs):
    return pattern.estimate_lines(q, k, **kwargs) if as_lines else pattern.estimate(q, k, **kwargs)


def _line_index(pattern: LinePattern, q, k, dense_pairs: float, **kwargs):
    lines = pattern.estimate_lines(q, k, **kwargs)
    known_dense = lines.pairs_lower_bound(lines_sorted=pattern.lines_sorted) >= dense_pairs
    return pattern.index_of(lines.without_heads(known_dense), q), known_dense


try:
    _estimate_outside_compile = torch.compiler.disable(_estimate, reason=ESTIMATE_COMPILE_REASON)
    _line_index_outside_compile = torch.compiler.disable(_line_index, reason=ESTIMATE_COMPILE_REASON)
except TypeError:  # torch releases before disable(reason=...) existed
    _estimate_outside_compile = torch.compiler.disable(_estimate)
    _line_index_outside_compile = torch.compiler.disable(_line_index)
