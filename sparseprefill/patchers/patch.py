"""``patch``, ``unpatch``, ``stats`` and the inspection hooks (prefill and decode) of a patched model."""

from __future__ import annotations

import contextlib
import weakref
from dataclasses import replace
from typing import Any, Callable

from torch import nn

from ..config import PatternName, SparseConfig
from ..patterns import build_pattern
from ..profiles import Profile, ProfileError, check_profile_matches, load_profile
from .attention import IMPLEMENTATION_NAME, sparseprefill_attention
from .masks import SparsePrefillMask, make_mask_function
from .state import (
    FallbackReason,
    HeadGroup,
    LayerPlan,
    LayerStats,
    PatchState,
    PatchStats,
    Phase,
    full_plan,
    logger,
)
from .support import SUPPORTED_FAMILIES, UnsupportedModelError, check_supported
from .tensor_parallel import detect_tensor_parallel, localize_plans

__all__ = [
    "IMPLEMENTATION_NAME",
    "SUPPORTED_FAMILIES",
    "AlreadyPatchedError",
    "NotPatchedError",
    "UnsupportedModelError",
    "FallbackReason",
    "Phase",
    "PatchStats",
    "SparsePrefillMask",
    "patch",
    "unpatch",
    "stats",
    "reset_stats",
    "is_patched",
    "observe_prefill",
    "inspect_prefill",
    "inspect_decode",
]


class AlreadyPatchedError(RuntimeError):
    """``patch`` was called on a model that is already patched."""


class NotPatchedError(RuntimeError):
    """``unpatch`` / ``stats`` on a model that is not patched."""


# Patch state of every live patched model, by id() of each config object its layers and mask
# builder see (transformers configs define __eq__, so they cannot be weak dictionary keys).
_STATE_BY_CONFIG: dict[int, PatchState] = {}


def _lookup_state(config: Any) -> PatchState:
    state = _STATE_BY_CONFIG.get(id(config))
    if state is None:
        raise RuntimeError(
            "a model uses attn_implementation='sparseprefill' without sparseprefill.patch(model); "
            "patch the model instead of selecting the implementation by name"
        )
    return state


def _previous_mask_function(state: PatchState):
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, sdpa_mask

    fallback = state.fallback_implementation
    if fallback in ALL_MASK_ATTENTION_FUNCTIONS._global_mapping:
        return ALL_MASK_ATTENTION_FUNCTIONS[fallback]
    return sdpa_mask


_registered = False


def _register() -> None:
    global _registered
    if _registered:
        return
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface

    AttentionInterface.register(IMPLEMENTATION_NAME, sparseprefill_attention)
    # Must be the class-level register: transformers checks the global mapping, not item assignment.
    AttentionMaskInterface.register(IMPLEMENTATION_NAME, make_mask_function(_lookup_state, _previous_mask_function))
    _registered = True


def is_patched(model: nn.Module) -> bool:
    return getattr(model, "_sparseprefill_state", None) is not None


def patch(
    model: nn.Module,
    config: SparseConfig | None = None,
    *,
    profile: Any = None,
    allow_profile_mismatch: bool = False,
    allow_profile_extrapolation: bool = False,
) -> nn.Module:
    """Replace the attention of a supported causal LM with sparse prefill. Returns the model.

    Args:
        model: a transformers causal LM of a supported family (``sparseprefill.SUPPORTED_FAMILIES``).
        config: budgets and routing; default ``SparseConfig()`` (adaptive per-head ``auto``).
        profile: a per-head profile (``Profile``, a path to its JSON file, or the parsed dict; see
            ``sparseprefill.load_profile``). Each head then uses the profile's pattern and budget;
            ``config`` still sets routing (``min_sparse_len`` ...) and the parameters the profile
            leaves out. Its model fingerprint must match ``model.config``.
        allow_profile_mismatch: apply a profile whose fingerprint differs (a warning lists the
            differences); a different layer or head layout is always refused.
        allow_profile_extrapolation: keep a measured profile's settings on prompts longer than its
            longest calibration prompt. By default such a prompt runs ``config``'s own pattern instead
            (once-only warning; ``stats()`` counts it as ``profile_beyond_calibration``): per-head settings
            measured on shorter prompts did not hold on longer ones on a real model (docs/benchmarks.md,
            stop 33). Imported profiles (``calibration.samples == 0``) are used at every length.

    Tensor parallelism (``from_pretrained(..., tp_plan="auto")`` or ``distributed_config=`` under
    ``torchrun``): patch each rank's model after loading it sharded. The plans (from ``config`` or the
    profile, over the model's global heads) are mapped to the rank's slice of heads; the head counts
    must divide by the TP size. A model sharded after ``patch`` is detected at its first attention
    call, which raises.

    Raises:
        AlreadyPatchedError: the model is already patched.
        UnsupportedModelError: the architecture or one of its features is not supported.
        ProfileError / ProfileMismatchError: the profile is malformed or made for another model.
    """
    if is_patched(model):
        raise AlreadyPatchedError(f"{type(model).__name__} is already patched; call sparseprefill.unpatch(model) first")
    config = config if config is not None else SparseConfig()
    if not isinstance(config, SparseConfig):
        raise TypeError(f"config must be a sparseprefill.SparseConfig, got {type(config).__name__}")
    model_type, modules = check_supported(model)
    tensor_parallel = detect_tensor_parallel(model)  # None unless loaded sharded over several ranks
    previous = model.config._attn_implementation or "eager"
    if previous == IMPLEMENTATION_NAME:
        raise AlreadyPatchedError(
            f"{type(model).__name__} already selects attn_implementation={IMPLEMENTATION_NAME!r} without a patch state"
        )
    _register()
    config_plans = None  # the config's own pattern in every layer
    if profile is None or not allow_profile_extrapolation:
        pattern = build_pattern(config.pattern, config)
        config_plans = {module.layer_idx: full_plan(pattern, module.config.num_attention_heads) for module in modules}
    beyond_profile_plans, profile_max_len = None, None
    if profile is not None:
        profile = load_profile(profile) if not isinstance(profile, Profile) else profile
        check_profile_matches(profile, model.config, allow_mismatch=allow_profile_mismatch)
        plans = _plans_from_profile(profile, config, modules)
        if profile.calibration.samples > 0 and not allow_profile_extrapolation:
            beyond_profile_plans, profile_max_len = config_plans, max(profile.calibration.lengths)
    else:
        plans = config_plans
    plans = _with_dense_layers(plans, config, modules)
    # The profile and the plans above speak of the config's (global) heads.
    head_counts = {module.layer_idx: _global_head_counts(module) for module in modules}
    if beyond_profile_plans is not None:
        beyond_profile_plans = _with_dense_layers(beyond_profile_plans, config, modules)
        if tensor_parallel is not None and tensor_parallel.heads_sharded:
            beyond_profile_plans, _ = localize_plans(beyond_profile_plans, head_counts, tensor_parallel)
    if tensor_parallel is not None and tensor_parallel.heads_sharded:
        plans, head_counts = localize_plans(plans, head_counts, tensor_parallel)
    config_objects = {id(model.config): model.config}
    for module in modules:
        config_objects[id(module.config)] = module.config
    state = PatchState(
        config=config, model_type=model_type, previous_implementation=previous,
        fallback_implementation=_fallback_implementation(model, previous), plans=plans,
        stats={module.layer_idx: LayerStats(module.layer_idx) for module in modules},
        config_ids=tuple(config_objects), profile=profile, decode_configs=_decode_configs(profile, config),
        beyond_profile_plans=beyond_profile_plans, profile_max_len=profile_max_len,
        head_counts=head_counts, tensor_parallel=tensor_parallel,
        head_dims={module.layer_idx: _head_dim(module) for module in modules
                   if getattr(module, "sliding_window", None) is None},
    )
    _attach(model, modules, state, config_objects)
    return model


def _fallback_implementation(model: nn.Module, previous: str) -> str:
    """The implementation the dense fallbacks run: the previous one, except where it would drop a
    soft-cap (transformers 5.17 runs Gemma 2 on SDPA, which silently ignores the attention soft-cap;
    the fallbacks must compute what the model defines, so they use the eager function)."""
    if getattr(model.config, "attn_logit_softcapping", None) and previous != "eager":
        logger.info("sparseprefill: %s soft-caps attention logits; dense fallbacks use 'eager', not %r",
                    type(model).__name__, previous)
        return "eager"
    return previous


def _attach(model: nn.Module, modules: list[nn.Module], state: PatchState, config_objects: dict[int, Any]) -> None:
    """Bind ``state`` to the model's config objects and attention modules, then switch the model to the
    registered implementation (undone if the model refuses it)."""
    for config_id, config_object in config_objects.items():
        _STATE_BY_CONFIG[config_id] = state
        weakref.finalize(config_object, _STATE_BY_CONFIG.pop, config_id, None)
    for module in modules:
        module._sparseprefill = (state, module.layer_idx)
    try:
        model.set_attn_implementation(IMPLEMENTATION_NAME)
        if model.config._attn_implementation != IMPLEMENTATION_NAME:
            raise UnsupportedModelError(
                f"{type(model).__name__} did not accept attn_implementation={IMPLEMENTATION_NAME!r} "
                f"(it stayed {model.config._attn_implementation!r})"
            )
    except Exception:
        _detach(model, modules, state)
        raise
    model._sparseprefill_state = state


def _head_dim(module: nn.Module) -> int:
    config = module.config
    return int(getattr(module, "head_dim", None) or getattr(config, "head_dim", None)
               or config.hidden_size // config.num_attention_heads)


def _global_head_counts(module: nn.Module) -> tuple[int, int]:
    """(query, KV) heads of one attention module as its config defines them (no KV count: MHA)."""
    num_heads = module.config.num_attention_heads
    return num_heads, getattr(module.config, "num_key_value_heads", None) or num_heads


def _decode_configs(profile: Profile | None, config: SparseConfig) -> dict[int, Any]:
    """Per-layer decode settings: the profile's ``decode`` overrides applied to ``config.decode``, checked
    now so a bad budget fails at patch time. ``None`` for a layer means it always decodes dense."""
    if config.decode is None or profile is None or profile.decode is None:
        return {}
    configs: dict[int, Any] = {}
    for layer, setting in enumerate(profile.decode):
        if setting is None:
            continue
        if setting.dense:
            configs[layer] = None
            continue
        try:
            configs[layer] = replace(config.decode, budget_tokens=setting.budget_tokens)
        except ValueError as exc:
            raise ProfileError(f"decode[{layer}].budget_tokens", f"{exc} (with this SparseConfig.decode)") from None
    return configs


def _with_dense_layers(plans: dict[int, LayerPlan], config: SparseConfig, modules: list[nn.Module]) -> dict[int, LayerPlan]:
    """``plans`` with every layer of ``config.dense_layers`` run dense (all heads, one group)."""
    if not config.dense_layers:
        return plans
    heads = {module.layer_idx: module.config.num_attention_heads for module in modules}
    unknown = [layer for layer in config.dense_layers if layer not in heads]
    if unknown:
        raise ValueError(f"SparseConfig.dense_layers lists layer(s) {unknown}, but the model's attention layers "
                         f"are {min(heads)}-{max(heads)}")
    dense = build_pattern(PatternName.DENSE, config)
    return {layer: full_plan(dense, heads[layer]) if layer in config.dense_layers else plan
            for layer, plan in plans.items()}


def _plans_from_profile(profile: Profile, config: SparseConfig, modules: list[nn.Module]) -> dict[int, LayerPlan]:
    """One head group per distinct setting in each layer; identical settings share one pattern object."""
    patterns: dict[Any, Any] = {}
    plans = {}
    for module in modules:
        settings = profile.layers[module.layer_idx]
        heads_by_key: dict[Any, list[int]] = {}
        for head, setting in enumerate(settings):
            key = setting.key()
            if key not in patterns:
                head_config = setting.to_config(config)
                patterns[key] = build_pattern(head_config.pattern, head_config)
            heads_by_key.setdefault(key, []).append(head)
        plans[module.layer_idx] = LayerPlan(
            groups=tuple(HeadGroup(pattern=patterns[key], heads=tuple(heads)) for key, heads in heads_by_key.items())
        )
    return plans


@contextlib.contextmanager
def _hooked(model: nn.Module, slot: str, hook: Callable[..., None]):
    """Attach ``hook`` to the patch state's ``slot`` for the duration of the block (one at a time)."""
    state = getattr(model, "_sparseprefill_state", None)
    if state is None:
        raise NotPatchedError(f"{type(model).__name__} is not patched")
    if getattr(state, slot) is not None:
        raise RuntimeError(f"another {slot} is already attached to this model")
    if state.tensor_parallel is not None and state.tensor_parallel.heads_sharded:
        # The hooks would see this rank's heads numbered from 0, while the profiler and the fidelity
        # eval key their results by global head: refuse instead of mislabelling heads.
        raise RuntimeError(
            f"the {slot} hook sees whole layers' heads, but this model is sharded "
            f"({state.tensor_parallel.describe()}); run it on a model loaded without tensor parallelism"
        )
    setattr(state, slot, hook)
    try:
        yield
    finally:
        setattr(state, slot, None)


def observe_prefill(model: nn.Module, observer: Callable[..., None]):
    """Within the block, ``observer(layer, q, k, scale=..., softcap=...)`` sees every sparse-routed
    span's post-RoPE ``q [B, H, Lq, D]`` and ``k [B, Hkv, Lk, D]`` (the profiler's hook)."""
    return _hooked(model, "observer", observer)


def inspect_prefill(model: nn.Module, inspector: Callable[..., None]):
    """Within the block, ``inspector(layer, q, k, v, out, selections, scale=..., softcap=...)`` sees every
    sparse-routed span after its patterns ran: post-RoPE ``q [B, H, Lq, D]``, ``k``/``v [B, Hkv, Lk, D]``,
    the sparse output ``out [B, H, Lq, D]`` and ``selections``, one ``(query heads, index)`` per head
    group (``index`` None where the group ran dense). The fidelity eval's hook."""
    return _hooked(model, "inspector", inspector)


def inspect_decode(model: nn.Module, inspector: Callable[..., None]):
    """Within the block, ``inspector(layer, q, k, v, out, page_index, page_count, page_size=..., scale=...,
    softcap=...)`` sees every sparse decode step (``SparseConfig.decode``) after its attention, per row
    group: ``q [B_g, Hq, 1, D]``, the group's cached ``k``/``v [B_g, Hkv, L, D]``, the output ``out
    [B_g, Hq, 1, D]`` and the attended pages (``page_index [B_g, Hkv, W]``, ``page_count [B_g, Hkv]``;
    both None where the group attended all its keys). The decode accuracy experiment's hook."""
    return _hooked(model, "decode_inspector", inspector)


def _detach(model: nn.Module, modules: list[nn.Module], state: PatchState) -> None:
    for module in modules:
        if getattr(module, "_sparseprefill", None) is not None:
            del module._sparseprefill
    for config_id in state.config_ids:
        if _STATE_BY_CONFIG.get(config_id) is state:
            del _STATE_BY_CONFIG[config_id]


def unpatch(model: nn.Module) -> nn.Module:
    """Restore the attention implementation the model had before ``patch``. Returns the model."""
    state = getattr(model, "_sparseprefill_state", None)
    if state is None:
        raise NotPatchedError(f"{type(model).__name__} is not patched by sparseprefill")
    model.set_attn_implementation(state.previous_implementation)
    _, modules = check_supported(model)
    _detach(model, modules, state)
    del model._sparseprefill_state
    return model


def stats(model: nn.Module) -> PatchStats:
    """Per-layer phases taken, fallbacks and density since ``patch`` (or ``reset_stats``)."""
    state = getattr(model, "_sparseprefill_state", None)
    if state is None:
        raise NotPatchedError(f"{type(model).__name__} is not patched by sparseprefill")
    return PatchStats(
        # Under a profile each head has its own pattern (the per-layer counters list them).
        model_type=state.model_type, pattern="profile" if state.profile is not None else state.config.pattern.value,
        layers=[state.stats[i] for i in sorted(state.stats)],
        tp_size=state.tensor_parallel.size if state.tensor_parallel is not None else 1,
        tp_rank=state.tensor_parallel.rank if state.tensor_parallel is not None else 0,
    )


def reset_stats(model: nn.Module) -> None:
    state = getattr(model, "_sparseprefill_state", None)
    if state is None:
        raise NotPatchedError(f"{type(model).__name__} is not patched by sparseprefill")
    state.reset_stats()
