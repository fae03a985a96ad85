"""Which architectures the patch supports, and the checks that refuse what it cannot do exactly.

Every supported family calls ``ALL_ATTENTION_FUNCTIONS.get_interface(...)`` with the post-RoPE,
post-norm ``q [B, Hq, Lq, D]`` and un-repeated ``k, v [B, Hkv, Lk, D]``, and passes its per-layer
features (``sliding_window``, ``softcap``) as keyword arguments, which the attention function
honours exactly (see ``attention.py``).
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass
from typing import Any

from torch import nn

__all__ = [
    "SUPPORTED_FAMILIES",
    "FamilySupport",
    "UnsupportedModelError",
    "find_attention_modules",
    "check_supported",
    "cache_keyword",
    "output_cache",
]


class UnsupportedModelError(ValueError):
    """The model (or one of its features) cannot be patched without changing its outputs."""


@dataclass(frozen=True)
class FamilySupport:
    model_type: str
    family: str
    features: str


SUPPORTED_FAMILIES: dict[str, FamilySupport] = {
    s.model_type: s
    for s in (
        FamilySupport("llama", "Llama (2, 3, 3.1, 3.2; SmolLM2)", "global causal attention"),
        FamilySupport("mistral", "Mistral", "sliding window (when configured) kept exact"),
        FamilySupport("qwen2", "Qwen2 / Qwen2.5", "optional sliding-window layers kept exact"),
        FamilySupport("qwen3", "Qwen3", "q/k RMSNorm (applied before the hook); sliding layers exact"),
        FamilySupport("phi3", "Phi-3 / Phi-3.5 / Phi-4-mini", "fused qkv; sliding window kept exact"),
        FamilySupport("gemma2", "Gemma 2", "attention logit soft-capping applied in every kernel; sliding layers exact"),
        FamilySupport("gemma3_text", "Gemma 3 (text)", "5:1 sliding/global layers: sliding exact, global sparse"),
        FamilySupport("glm4", "GLM-4", "partial rotary (applied before the hook)"),
    )
}


def _supported_list() -> str:
    return ", ".join(sorted(SUPPORTED_FAMILIES))


def find_attention_modules(model: nn.Module) -> list[nn.Module]:
    """The decoder's attention modules: those the model's modeling file calls the attention hook from."""
    modules = []
    for module in model.modules():
        if type(module).__name__.endswith("Attention") and hasattr(module, "layer_idx") and hasattr(module, "config"):
            modules.append(module)
    return modules


def check_supported(model: nn.Module) -> tuple[str, list[nn.Module]]:
    """Return ``(model_type, attention modules)`` or raise ``UnsupportedModelError`` saying why."""
    config = getattr(model, "config", None)
    model_type = getattr(config, "model_type", None)
    if model_type not in SUPPORTED_FAMILIES:
        raise UnsupportedModelError(
            f"sparseprefill does not support model_type={model_type!r} ({type(model).__name__}); "
            f"supported model types: {_supported_list()}"
        )
    if not getattr(config, "is_causal", True) or getattr(config, "use_bidirectional_attention", False):
        raise UnsupportedModelError(
            f"{type(model).__name__} is configured for bidirectional attention; sparseprefill requires causal attention"
        )
    modules = find_attention_modules(model)
    n_layers = getattr(config, "num_hidden_layers", None)
    if not modules or (n_layers is not None and len(modules) != n_layers):
        raise UnsupportedModelError(
            f"found {len(modules)} attention modules in {type(model).__name__}, expected {n_layers} "
            f"(one per decoder layer); the model's structure is not the one sparseprefill supports"
        )
    for module in modules:
        if not getattr(module, "is_causal", True):
            raise UnsupportedModelError(f"layer {module.layer_idx} attention is not causal")
    return model_type, modules


def cache_keyword(model: nn.Module) -> str:
    """The forward keyword that takes a KV cache: ``cache`` where transformers renamed it (5.24 warns
    that ``past_key_values`` is deprecated), ``past_key_values`` on releases before (5.17)."""
    return "cache" if "cache" in inspect.signature(type(model).forward).parameters else "past_key_values"


def output_cache(outputs: Any) -> Any:
    """The KV cache a forward returned, under either release's field name."""
    return outputs["cache"] if "cache" in outputs else outputs.past_key_values
