"""Tiny random-weight models of every supported family, built from configs (no hub)."""

from __future__ import annotations

import torch
from transformers import (
    AutoModelForCausalLM,
    Gemma2Config,
    Gemma3TextConfig,
    Glm4Config,
    LlamaConfig,
    MistralConfig,
    Phi3Config,
    Qwen2Config,
    Qwen3Config,
)

FAMILIES = ("llama", "mistral", "qwen2", "qwen3", "phi3", "gemma2", "gemma3_text", "glm4")

VOCAB = 128
# Short enough that a tiny model's prefill runs past it, so sliding layers take the window path.
SLIDING_WINDOW = 96

_COMMON = dict(
    vocab_size=VOCAB,
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=4096,
    pad_token_id=0,
    bos_token_id=1,
    eos_token_id=2,
)


def tiny_config(family: str, *, windowed: bool = True):
    """A 2-layer config with GQA (4 query / 2 KV heads). ``windowed`` gives the families that have
    sliding-window layers one sliding and one global layer (or all-sliding where that is the family's
    only form, Mistral and Phi-3); ``windowed=False`` keeps every layer global."""
    window = SLIDING_WINDOW if windowed else None
    if family == "llama":
        return LlamaConfig(head_dim=16, **_COMMON)
    if family == "mistral":
        return MistralConfig(head_dim=16, sliding_window=window, **_COMMON)
    if family == "qwen2":
        return Qwen2Config(
            use_sliding_window=windowed, sliding_window=SLIDING_WINDOW, max_window_layers=1, **_COMMON
        )
    if family == "qwen3":
        return Qwen3Config(
            head_dim=16, use_sliding_window=windowed, sliding_window=SLIDING_WINDOW, max_window_layers=1, **_COMMON
        )
    if family == "phi3":
        return Phi3Config(sliding_window=window, **_COMMON)
    if family == "gemma2":
        layer_types = ["sliding_attention", "full_attention"] if windowed else ["full_attention"] * 2
        return Gemma2Config(
            head_dim=16, sliding_window=SLIDING_WINDOW, layer_types=layer_types, query_pre_attn_scalar=16, **_COMMON
        )
    if family == "gemma3_text":
        layer_types = ["sliding_attention", "full_attention"] if windowed else ["full_attention"] * 2
        return Gemma3TextConfig(
            head_dim=16, sliding_window=SLIDING_WINDOW, layer_types=layer_types, query_pre_attn_scalar=16, **_COMMON
        )
    if family == "glm4":
        return Glm4Config(head_dim=16, **_COMMON)
    raise KeyError(family)


def tiny_model(family: str, *, windowed: bool = True, qk_scale: float = 1.0, seed: int = 0):
    """fp32 eval-mode model. ``qk_scale`` multiplies the q/k projections: at the default init the
    attention of a random model is nearly uniform (nothing to sparsify); a scale of ~8 gives peaked
    attention while the residual stream stays tame."""
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(tiny_config(family, windowed=windowed)).eval()
    if family == "gemma2":
        # The reference must soft-cap: transformers 5.17 defaults Gemma 2 to SDPA, which drops the cap
        # (5.23 defaults to eager). Compare against what the model defines on every version.
        model.set_attn_implementation("eager")
    if qk_scale != 1.0:
        peak_attention(model, qk_scale)
    return model


def peak_attention(model, qk_scale: float) -> None:
    """Multiply every layer's q and k projections by ``qk_scale`` (logits by its square), in place."""
    with torch.no_grad():
        for layer in model.model.layers:
            attn = layer.self_attn
            if hasattr(attn, "qkv_proj"):  # Phi-3 fuses q, k, v: scale the q and k rows only
                q_and_k = attn.config.num_attention_heads * attn.head_dim + attn.config.num_key_value_heads * attn.head_dim
                attn.qkv_proj.weight[:q_and_k].mul_(qk_scale)
            else:
                attn.q_proj.weight.mul_(qk_scale)
                attn.k_proj.weight.mul_(qk_scale)


def random_ids(length: int, batch: int = 1, seed: int = 0) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(3, VOCAB, (batch, length), generator=generator)


def static_cache_generate(model, config, ids: torch.Tensor, max_new_tokens: int = 5):
    """Greedy ``generate`` with a static cache, unpatched then patched with ``config``: returns
    ``(patched tokens, unpatched tokens, stats of the patched run)``. A static cache hands attention
    keys past the current token, which the sparse paths must detect and route to dense."""
    import sparseprefill

    kwargs = dict(max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=0, cache_implementation="static")
    with torch.no_grad():
        reference = model.generate(ids, **kwargs)
    sparseprefill.patch(model, config)
    try:
        with torch.no_grad():
            patched = model.generate(ids, **kwargs)
        return patched, reference, sparseprefill.stats(model)
    finally:
        sparseprefill.unpatch(model)
