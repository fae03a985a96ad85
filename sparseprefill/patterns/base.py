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
from ..kernels import BlockSparseIndex, VerticalSlashIndex, library
from ..kernels.indices import VerticalSlashLines

SparseIndex = Union[BlockSparseIndex, VerticalSlashIndex, None]

__all__ = ["LinePattern", "SparsePattern", "PatternOutput", "SparseIndex", "inspectable_index"]


@dataclass(frozen=True)
class PatternOutput:
    """``computed_pairs [B, H]``: causal pairs the kernel computed (density numerator); ``index`` what
    the kernel read (``VerticalSlashLines`` for line patterns on their fused path)."""

    computed_pairs: torch.Tensor
    index: Union[SparseIndex, VerticalSlashLines]


def inspectable_index(index: Union[SparseIndex, VerticalSlashLines]) -> SparseIndex:
    """The per-block index of what a pattern selected, for inspectors and recall (lines are expanded
    to the ``VerticalSlashIndex`` of the same keys)."""
    return index.to_index() if isinstance(index, VerticalSlashLines) else index


class SparsePattern(abc.ABC):
    name: ClassVar[PatternName]

    @abc.abstractmethod
    def estimate(
        self, q: torch.Tensor, k: torch.Tensor, *, scale: float, softcap: float | None, kv_head_index: torch.Tensor
    ) -> SparseIndex:
        """``q [B, H, Lq, D]``, ``k [B, Hkv, Lk, D]`` -> an index over the H query heads."""

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
    ) -> PatternOutput:
        index = _estimate_outside_compile(self, q, k, scale=scale, softcap=softcap, kv_head_index=kv_head_index)
        self.attend(q, k, v, index, scale=scale, softcap=softcap, kv_head_index=kv_head_index, out=out)
        return PatternOutput(computed_pairs=index.computed_pairs(), index=index)


class LinePattern(SparsePattern):
    """A pattern whose estimate is per-head vertical-slash lines. ``run`` hands them straight to the
    fused kernel (``vertical_slash_lines_attention``: no per-block index, no host read between the
    estimate and the attention); ``estimate`` expands them to the per-block index for inspection,
    recall and profiling (the same keys)."""

    # The lines ``estimate_lines`` returns ascend in their counts (spares the kernel's plan two sorts).
    lines_sorted: ClassVar[bool] = True

    @abc.abstractmethod
    def estimate_lines(
        self, q: torch.Tensor, k: torch.Tensor, *, scale: float, softcap: float | None, kv_head_index: torch.Tensor
    ) -> VerticalSlashLines:
        """``q [B, H, Lq, D]``, ``k [B, Hkv, Lk, D]`` -> per-head lines over the H query heads."""

    def estimate(self, q, k, *, scale, softcap, kv_head_index) -> VerticalSlashIndex:
        return self.estimate_lines(q, k, scale=scale, softcap=softcap, kv_head_index=kv_head_index).to_index()

    def run(self, q, k, v, *, scale, softcap, kv_head_index, out) -> PatternOutput:
        lines = _estimate_outside_compile(self, q, k, scale=scale, softcap=softcap, kv_head_index=kv_head_index,
                                          as_lines=True)
        library.call_vertical_slash_lines(q, k, v, lines, scale=scale, window=None, softcap=softcap,
                                          kv_head_index=kv_head_index, out=out, lines_sorted=self.lines_sorted)
        return PatternOutput(computed_pairs=lines.computed_pairs(), index=lines)


# Estimates launch Triton kernels directly and some (block selection) size their indices on the host,
# which torch.compile cannot trace: run them eagerly, so a compiled patched model breaks its graph there
# once per sparse layer with this one reason instead of dynamo's data-dependent-shape traces, and
# fullgraph=True fails saying why.
ESTIMATE_COMPILE_REASON = (
    "sparseprefill: sparse estimation runs outside torch.compile (Triton launches; some estimators "
    "size their indices on the host), so fullgraph=True cannot compile a patched model's sparse layers yet"
)


def _estimate(pattern: SparsePattern, q, k, as_lines: bool = False, **kwargs):
    return pattern.estimate_lines(q, k, **kwargs) if as_lines else pattern.estimate(q, k, **kwargs)


try:
    _estimate_outside_compile = torch.compiler.disable(_estimate, reason=ESTIMATE_COMPILE_REASON)
except TypeError:  # torch releases before disable(reason=...) existed
    _estimate_outside_compile = torch.compiler.disable(_estimate)
