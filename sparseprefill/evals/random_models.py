"""Random-weight models for checks that need no hub download: what matters is where and how a model
runs (devices, tensor-parallel ranks, head mapping), not what it knows.

``save_peaked_llama`` builds a Llama of any shape with its q/k projections scaled up, so attention is
peaked and the sparse patterns have structure to find (with plain random weights every row is near
uniform and every pattern looks alike). Used by ``experiments/multi_gpu_check.py`` and
``experiments/tp_check.py``.
"""

from __future__ import annotations

from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, LlamaConfig

# Factor on the random q/k projections: attention logits grow by QK_SCALE**2, peaking each row.
QK_SCALE = 6.0


def save_peaked_llama(folder: Path, shape: dict, dtype: torch.dtype, seed: int) -> None:
    """A random Llama of ``shape`` (``LlamaConfig`` fields) with q/k projections scaled by ``QK_SCALE``,
    saved to ``folder`` (``save_pretrained``), reproducible from ``seed``."""
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(LlamaConfig(**shape), dtype=dtype)
    with torch.no_grad():
        for layer in model.model.layers:
            layer.self_attn.q_proj.weight.mul_(QK_SCALE)
            layer.self_attn.k_proj.weight.mul_(QK_SCALE)
    model.save_pretrained(folder)
