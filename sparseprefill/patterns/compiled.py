"""A pattern's whole ``run`` as one ``torch.library`` op, so that ``torch.compile(fullgraph=True)`` compiles a
model patched with the vertical-slash family (the default), A-shape or dense heads without a graph break.

The vertical-slash estimate sizes its index on the host (one read of the plan's maxima) and routes heads
dense on the host (one read of the per-head flags): data-dependent shapes and branches that a traced graph
cannot hold (dense heads of a group other than the model's own grouping are attended per KV head, which
reads the head map). Inside an op they are no longer the tracer's business: the op's outputs have fixed shapes
(``[B, H]`` pair counts, the number of heads routed dense, whether the index kept per-head column lists),
and its body is the eager ``run``, so a compiled model computes exactly what the eager one does, the
same kernels on the same index. The index itself stays inside the op (its shapes are the host's
decision), so inspectors cannot see it there.

The op names its pattern by a key (the class and its frozen config) registered when the pattern is made:
a schema holds tensors and scalars, not Python objects. Host reads inside the op still forbid capturing it
in a CUDA graph; ``VerticalSlashConfig(fused=True)`` is the capturable path.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from ..kernels.library import NAMESPACE

if TYPE_CHECKING:
    from .base import PatternOutput, SparsePattern

__all__ = ["register_pattern", "run_pattern_op"]

# Op scalars cannot be None: these stand for "no softcap" and "no dense routing".
_NO_SOFTCAP = 0.0
_NO_DENSE_ROUTING = -1.0

_PATTERNS: dict[str, SparsePattern] = {}


def register_pattern(pattern: SparsePattern) -> str:
    """The key the op finds ``pattern`` by. Patterns of one class and equal (frozen) configs compute the same
    thing, so they share a key and the registry stays as small as the set of distinct configs."""
    key = f"{type(pattern).__module__}.{type(pattern).__qualname__}({getattr(pattern, 'config', None)!r})"
    _PATTERNS[key] = pattern
    return key


@torch.library.custom_op(f"{NAMESPACE}::pattern_run", mutates_args=("out",))
def _pattern_run_op(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, kv_head_index: torch.Tensor, out: torch.Tensor,
    pattern_key: str, scale: float, softcap: float, dense_above: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    pattern = _PATTERNS.get(pattern_key)
    if pattern is None:
        raise RuntimeError(f"sparseprefill: no pattern registered as {pattern_key!r}; registered: "
                           f"{sorted(_PATTERNS)}")
    result = pattern.run(q, k, v, scale=scale, softcap=None if softcap == _NO_SOFTCAP else softcap,
                         kv_head_index=kv_head_index, out=out,
                         dense_above=None if dense_above == _NO_DENSE_ROUTING else dense_above)
    dense_heads = torch.as_tensor(result.dense_heads, dtype=torch.int64, device=q.device).reshape(())
    per_head_columns = torch.tensor(result.per_head_columns, dtype=torch.bool, device=q.device)
    # A fresh tensor: an op's outputs must not alias its inputs or each other.
    return result.computed_pairs.to(torch.int64).clone(), dense_heads, per_head_columns


@_pattern_run_op.register_fake
def _(q, k, v, kv_head_index, out, pattern_key, scale, softcap, dense_above):
    return (q.new_empty(q.shape[:2], dtype=torch.int64), q.new_empty((), dtype=torch.int64),
            q.new_empty((), dtype=torch.bool))


def run_pattern_op(
    pattern: SparsePattern, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, scale: float,
    softcap: float | None, kv_head_index: torch.Tensor, out: torch.Tensor, dense_above: float | None,
) -> PatternOutput:
    """``pattern.run`` through the op: the same outputs and counts, no index (it stays inside the op; a dense
    pattern has none anyway)."""
    from .base import PatternOutput

    if softcap == _NO_SOFTCAP or (dense_above is not None and dense_above < 0):
        raise ValueError(f"softcap must be None or nonzero and dense_above None or >= 0, got {softcap}, {dense_above}")
    pairs, dense_heads, per_head_columns = torch.ops.sparseprefill.pattern_run(
        q, k, v, kv_head_index, out, pattern.op_key, float(scale), _NO_SOFTCAP if softcap is None else float(softcap),
        _NO_DENSE_ROUTING if dense_above is None else float(dense_above),
    )
    return PatternOutput(computed_pairs=pairs, index=None, dense_heads=dense_heads,
                         index_in_op=pattern.returns_index, columns_per_head=per_head_columns)
