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

SparseIndex = Union[BlockSparseIndex, VerticalSlashIndex, None]

__all__ = ["SparsePattern", "PatternOutput", "SparseIndex"]


@dataclass(frozen=True)
class PatternOutput:
    """``computed_pairs [B, H]``: causal pairs the kernel computed (density numerator)."""

    computed_pairs: torch.Tensor
    index: SparseIndex


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


# Estimates size their indices on the host (a few reads per layer), which torch.compile cannot trace:
# run them eagerly, so a compiled patched model breaks its graph there once per sparse layer with this
# one reason instead of dynamo's data-dependent-shape traces, and fullgraph=True fails saying why.
ESTIMATE_COMPILE_REASON = (
    "sparseprefill: sparse estimation reads index sizes on the host, so it runs outside torch.compile "
    "(fullgraph=True cannot compile a patched model's sparse layers yet)"
)


def _estimate(pattern: SparsePattern, q, k, **kwargs) -> SparseIndex:
    return pattern.estimate(q, k, **kwargs)


try:
    _estimate_outside_compile = torch.compiler.disable(_estimate, reason=ESTIMATE_COMPILE_REASON)
except TypeError:  # torch releases before disable(reason=...) existed
    _estimate_outside_compile = torch.compiler.disable(_estimate)
