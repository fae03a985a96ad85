"""The local data cache: where each prepared text and its manifest live, reading them back (no
network), and the lock and atomic writes ``prepare_data`` fills it with.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from ..offline_models import CACHE_ENV_VAR
from .sources import DataNotPreparedError, HaystackSource

__all__ = ["data_dir", "haystack_text", "is_prepared", "manifest_path", "read_manifest", "text_path"]

DATA_FOLDER_NAME = "data"
DEFAULT_DATA_DIR = Path("~/.cache/sparseprefill/data")
MANIFEST_VERSION = 1
PREPARE_COMMAND = "sparseprefill prepare-data"

# Waiting for another process preparing the same source (download + extraction take seconds).
LOCK_TIMEOUT_S = 600


def data_dir() -> Path:
    """The data cache: ``$SPARSEPREFILL_CACHE/data`` if that is set, else ``~/.cache/sparseprefill/data``."""
    override = os.environ.get(CACHE_ENV_VAR)
    return Path(override).expanduser() / DATA_FOLDER_NAME if override else DEFAULT_DATA_DIR.expanduser()


def text_path(source: HaystackSource | str) -> Path:
    """Where the prepared text of ``source`` lives (whether or not it is prepared)."""
    return data_dir() / f"{HaystackSource(source).value}.txt"


def manifest_path(source: HaystackSource | str) -> Path:
    """Where the manifest of ``source`` lives; it is written last, after the text."""
    return data_dir() / f"{HaystackSource(source).value}.json"


def read_manifest(source: HaystackSource | str) -> dict[str, Any]:
    """The manifest of a prepared source (url, sha256, words, chars, text_sha256, date, ...)."""
    source = HaystackSource(source)
    if not is_prepared(source):
        raise DataNotPreparedError(_not_prepared_message(source))
    return json.loads(manifest_path(source).read_text(encoding="utf-8"))


def is_prepared(source: HaystackSource | str) -> bool:
    """True when the text and its manifest are in the cache (reading needs no network)."""
    source = HaystackSource(source)
    try:
        manifest = json.loads(manifest_path(source).read_text(encoding="utf-8"))
        # The size check catches a text replaced or truncated after its manifest was written.
        return manifest.get("source") == source.value and text_path(source).stat().st_size == manifest["bytes"]
    except (OSError, ValueError, KeyError, AttributeError):
        return False


def _not_prepared_message(source: HaystackSource) -> str:
    return (
        f"the {source.value} text is not prepared in {data_dir()}: run `{PREPARE_COMMAND} --sources "
        f"{source.value}` (it downloads from PyPI / deb.debian.org). The GPU machine has no network: "
        f"run it on a networked machine and copy the folder {data_dir()} to the same place there (or "
        f"set {CACHE_ENV_VAR} to a folder holding the copy as {DATA_FOLDER_NAME}/)"
    )


def haystack_text(source: HaystackSource | str = HaystackSource.PAUL_GRAHAM) -> str:
    """The prepared text of ``source``, for ``sparseprefill.evals.ruler.generate(haystack_text=...)``.

    Raises:
        DataNotPreparedError: the text is not in the cache; the message says which command to run.
    """
    source = HaystackSource(source)
    if not is_prepared(source):
        raise DataNotPreparedError(_not_prepared_message(source))
    # newline="": the text is returned exactly as prepared (no newline translation).
    with open(text_path(source), encoding="utf-8", newline="") as handle:
        return handle.read()


def _lock(source: HaystackSource):
    from filelock import FileLock  # a dependency of huggingface_hub, hence of transformers

    directory = data_dir()
    directory.mkdir(parents=True, exist_ok=True)
    return FileLock(str(directory / f".{source.value}.lock"), timeout=LOCK_TIMEOUT_S)


def _write_atomically(path: Path, text: str) -> None:
    partial = path.with_name(f"{path.name}.partial-{os.getpid()}")
    try:
        with open(partial, "w", encoding="utf-8", newline="") as handle:
            handle.write(text)
        os.replace(partial, path)
    except BaseException:
        partial.unlink(missing_ok=True)
        raise
