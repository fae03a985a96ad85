"""Tensor parallelism (``from_pretrained(..., tp_plan="auto")`` / ``distributed_config=``) under ``torchrun``.

transformers shards q/k/v projections column-wise (``"colwise"``: a ``Shard(0)`` DTensor weight, a
contiguous slice of its output rows per rank) and ``o_proj`` row-wise, so on TP rank ``r`` of ``N``
the attention function receives only that rank's contiguous slice of heads: query heads
``r*Hq/N .. (r+1)*Hq/N - 1`` and KV heads ``r*Hkv/N .. (r+1)*Hkv/N - 1``. Each local query head
keeps its own KV head (local ``j`` -> ``j // (Hq/Hkv)``) because both slices start at a group
boundary. The plans are built over the global heads of the config or profile, so ``patch`` maps
them to the rank's slice here; a layout where the query projection's output is gathered
(``"colwise_gather_output"``, e.g. Phi-3's fused ``qkv_proj``) hands every rank all heads, and the
global plans stay.

``patch`` must run after the model is sharded (load it with the TP plan, then patch): the
attention function checks every call's head counts against what the plans were built for and
raises if they differ, e.g. for a model sharded after ``patch``.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from .state import HeadGroup, LayerPlan
from .support import UnsupportedModelError

__all__ = ["TensorParallel", "detect_tensor_parallel", "localize_plans", "head_count_error", "tp_load_kwargs"]

# Plan styles (transformers' ParallelInterface) of the q/k/v projections and what they hand the attention:
SHARDED_STYLE = "colwise"  # this rank's contiguous slice of heads
GATHERED_STYLES = frozenset({"colwise_gather_output", "colwise_rep"})  # all heads, on every rank
ATTENTION_PROJECTIONS = ("q_proj", "k_proj", "v_proj", "qkv_proj", "query_key_value")


@dataclass(frozen=True)
class TensorParallel:
    """This process's place in the model's tensor-parallel group."""

    size: int
    rank: int
    heads_sharded: bool  # the attention function sees this rank's slice of heads (else all heads)

    def describe(self) -> str:
        heads = "its slice of the heads" if self.heads_sharded else "all heads (projections gathered)"
        return f"tensor parallel rank {self.rank} of {self.size}, attention over {heads}"


def _tp_mesh(model: nn.Module, size: int):
    """The TP dimension of the model's device mesh: 5.17 stores the 1-D TP mesh, 5.23 a named
    ("pp", "fsdp", "tp") mesh."""
    mesh = getattr(model, "_device_mesh", None)
    if mesh is None:
        mesh = getattr(model, "device_mesh", None)
    if mesh is None:
        raise UnsupportedModelError(
            f"{type(model).__name__} reports tp_size={size} but has no device mesh (model._device_mesh); "
            "sparseprefill cannot tell which heads this rank holds"
        )
    names = getattr(mesh, "mesh_dim_names", None) or ()
    if "tp" in names and mesh.ndim > 1:
        mesh = mesh["tp"]
    if mesh.ndim != 1 or mesh.size() != size:
        raise UnsupportedModelError(
            f"{type(model).__name__}: expected a 1-D tensor-parallel mesh of size {size}, found {mesh}"
        )
    return mesh


def _heads_sharded(model: nn.Module, size: int) -> bool:
    """Read the model's TP plan: column-wise q/k/v projections shard the heads, gathered ones do not.
    Anything else (a fused projection sharded column-wise, mixed styles) is not a contiguous head
    slice, so it is refused rather than guessed."""
    plan = getattr(model, "tp_plan", None) or {}
    styles: dict[str, set[str]] = {}
    for key, style in plan.items():
        name = key.rsplit(".", 1)[-1]
        if name in ATTENTION_PROJECTIONS:
            styles.setdefault(name, set()).add(style)
    found = set().union(*styles.values()) if styles else set()
    if found <= GATHERED_STYLES:
        return False
    if set(styles) == {"q_proj", "k_proj", "v_proj"} and found == {SHARDED_STYLE}:
        return True
    raise UnsupportedModelError(
        f"{type(model).__name__} is tensor parallel (tp_size={size}) with attention projection styles "
        f"{ {name: sorted(s) for name, s in sorted(styles.items())} }; sparseprefill supports q/k/v all "
        f"{SHARDED_STYLE!r} (each rank holds a contiguous slice of heads) or gathered "
        f"({', '.join(sorted(GATHERED_STYLES))})"
    )


def detect_tensor_parallel(model: nn.Module) -> TensorParallel | None:
    """None unless ``model`` was loaded sharded (``model.tp_size > 1``)."""
    size = getattr(model, "tp_size", None) or getattr(model, "_tp_size", None) or 1
    if size <= 1:
        return None
    rank = _tp_mesh(model, size).get_local_rank()
    return TensorParallel(size=size, rank=rank, heads_sharded=_heads_sharded(model, size))


def localize_plans(
    plans: dict[int, LayerPlan], head_counts: dict[int, tuple[int, int]], tp: TensorParallel
) -> tuple[dict[int, LayerPlan], dict[int, tuple[int, int]]]:
    """The rank's part of every layer plan, renumbered to local heads (global ``h`` -> ``h - rank*Hq/N``),
    and the (query, KV) head counts its attention calls must have."""
    local_plans, local_counts = {}, {}
    for layer, (hq, hkv) in head_counts.items():
        if hq % tp.size or hkv % tp.size:
            # transformers would split a head across ranks (or refuse); no per-head plan can follow that.
            raise UnsupportedModelError(
                f"layer {layer}: {hq} query / {hkv} KV heads do not split evenly over tp_size={tp.size}; "
                "sparseprefill needs both head counts divisible by the tensor-parallel size"
            )
        per_rank = hq // tp.size
        first = tp.rank * per_rank
        groups = []
        for group in plans[layer].groups:
            heads = tuple(h - first for h in group.heads if first <= h < first + per_rank)
            if heads:
                groups.append(HeadGroup(pattern=group.pattern, heads=heads))
        local_plans[layer] = LayerPlan(groups=tuple(groups))
        local_counts[layer] = (per_rank, hkv // tp.size)
    return local_plans, local_counts


def head_count_error(layer: int, found: tuple[int, int], expected: tuple[int, int], tp: TensorParallel | None) -> str:
    where = tp.describe() if tp is not None else "no tensor parallelism detected at patch time"
    return (
        f"sparseprefill layer {layer}: the attention call has {found[0]} query / {found[1]} KV heads, but the "
        f"patch planned for {expected[0]} / {expected[1]} ({where}). The model's head layout changed after "
        "sparseprefill.patch (e.g. it was sharded for tensor parallelism after patching); per-head plans would "
        "index the wrong heads. Load the model in its final layout, then call sparseprefill.patch (or unpatch "
        "and patch again)."
    )


def tp_load_kwargs() -> dict:
    """``from_pretrained`` keyword arguments that load with the model's own TP plan under ``torchrun``:
    ``distributed_config=DistributedConfig(tp_plan="auto")`` where this transformers has it (5.17 and
    later; there a bare ``tp_plan=`` is deprecated), else ``tp_plan="auto"``."""
    try:
        from transformers.distributed import DistributedConfig
    except ImportError:
        return {"tp_plan": "auto"}
    return {"distributed_config": DistributedConfig(tp_plan="auto")}
