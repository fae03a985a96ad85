"""Full-size architectures with random weights, for the end-to-end and decode benchmarks.

Architecture configs ship in ``bench/configs/*.json`` (transformers ``config.json`` fields of the public
models, no hub access): ``load_arch_config`` reads one by name or path, ``tiny_config`` shrinks it to a
2-layer model of the same family and RoPE (dry runs and tests), ``build_model`` makes a model with
random weights straight on the device (or loads real weights from a folder).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

CONFIG_DIR = Path(__file__).with_name("configs")

# The dry run: the named config shrunk to this (same family and RoPE), on the CPU, at short lengths.
TINY_OVERRIDES = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, head_dim=16, vocab_size=256, bos_token_id=1, eos_token_id=2,
                      pad_token_id=0)


def shipped_configs() -> list[str]:
    return sorted(p.stem for p in CONFIG_DIR.glob("*.json"))


def load_arch_config(name_or_path: str | Path, **overrides: Any):
    """A transformers config from a shipped name (``llama-3.1-8b``) or a ``config.json`` path."""
    from transformers import AutoConfig

    path = Path(name_or_path)
    if not path.suffix == ".json" or not path.exists():
        path = CONFIG_DIR / f"{name_or_path}.json"
    if not path.exists():
        raise FileNotFoundError(f"no architecture config {name_or_path!r}; shipped: {', '.join(shipped_configs())}")
    fields = json.loads(path.read_text())
    fields.update(overrides)
    model_type = fields.pop("model_type")
    return AutoConfig.for_model(model_type, **fields)


def tiny_config(name_or_path: str | Path):
    """The named architecture shrunk to 2 layers / 64 hidden (dry run and tests)."""
    return load_arch_config(name_or_path, **TINY_OVERRIDES)


def build_model(config, *, device: torch.device, dtype: torch.dtype, model_path: str | None = None):
    """Random weights straight on ``device`` (no fp32 copy on the CPU), or ``from_pretrained(model_path)``."""
    from transformers import AutoModelForCausalLM

    if model_path is not None:
        model = AutoModelForCausalLM.from_pretrained(model_path, dtype=dtype, attn_implementation="sdpa",
                                                     device_map={"": device} if device.type == "cuda" else None)
        return model.to(device).eval()
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype, attn_implementation="sdpa")
    return model.eval()
