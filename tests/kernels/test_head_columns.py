"""The per-head column layout of ``VerticalSlashIndex`` (``column_layout="head"``): one column list per
head that every query block masks by its own bands, against the per-block layout of the same lines. The
attention and recall kernel tests here also cover per-head ranges (``HEAD_LAYOUTS``; their builders are
tested in ``test_head_ranges.py``).

The builders (naive and Triton) must list exactly the per-block layout's keys; the attention and recall
kernels on the per-head layout must match the naive twins on the per-block layout. On the CPU the Triton
kernels run in the interpreter; outputs are pre-filled with NaN.
"""

from __future__ import annotations

import random

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

triton = pytest.importorskip("triton", reason="Triton is not importable on this machine")

from sparseprefill.kernels import build_vertical_slash_index  # noqa: E402
from sparseprefill.kernels.common import compact  # noqa: E402
from sparseprefill.kernels.geometry import query_block_bounds  # noqa: E402
from sparseprefill.kernels.vertical_slash import vertical_slash_block_recall  # noqa: E402
from sparseprefill.kernels.vertical_slash.head_columns import (  # noqa: E402
    diagonal_prefix,
    head_column_list,
    to_head_columns,
)
from sparseprefill.kernels.vertical_slash.naive import (  # noqa: E402
    block_recall_naive,
    build_vertical_slash_index_naive,
    split_ranges_naive,
    vertical_slash_attention_naive,
)
from sparseprefill.kernels.vertical_slash.triton_attention import vertical_slash_attention_triton  # noqa: E402
from sparseprefill.kernels.vertical_slash.triton_index import build_vertical_slash_index_triton  # noqa: E402
from sparseprefill.kernels.vertical_slash.triton_recall import block_recall_triton  # noqa: E402

from tests import reference  # noqa: E402
from tests.kernels.test_triton_attention import CASES  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
REL_TOL = 1e-4  # fp32 inputs: both paths accumulate in fp32 over the same keys

# The attention tests' shapes: odd lengths, GQA, chunked prefill (Lq < Lk), head dims 64 / 80 / 128 / 256,
# window and soft-cap.
CASE_ID = lambda c: f"B{c[0]}H{c[1]}/{c[2]}L{c[3]}x{c[4]}D{c[5]}bs{c[6]}w{c[7]}c{c[8]}"  # noqa: E731


def _lines(b, h, k_len, p_vertical, p_slash, seed, local: bool = True):
    """Ascending, unique line lists (as ``select_lines`` makes them); ``local``: diagonal 0 kept, as the
    default always keeps it, so blocks read only the columns below their last band."""
    g = torch.Generator(device="cpu").manual_seed(seed)
    vertical_count, vertical_index = compact((torch.rand(b, h, k_len, generator=g) < p_vertical).to(DEVICE))
    slashes = torch.rand(b, h, k_len, generator=g) < p_slash
    if local:
        slashes[..., 0] = True
    slash_count, slash_offset = compact(slashes.to(DEVICE))
    return vertical_index.long(), vertical_count, slash_offset.long(), slash_count


def _inputs(case, seed):
    b, hq, hkv, lq, lk, d, _, _, _ = case
    g = torch.Generator(device="cpu").manual_seed(seed)
    make = lambda *shape: torch.randn(*shape, generator=g).to(DEVICE)  # noqa: E731
    return make(b, hq, lq, d), make(b, hkv, lk, d), make(b, hkv, lk, d)


def _rel_err(out, ref):
    assert not torch.isnan(out).any(), "output has unwritten (NaN) elements"
    return float((out.float() - ref).norm() / ref.norm().clamp_min(1e-30))


@pytest.mark.parametrize(
    "b,h,lq,lk,block,p_vertical,p_slash,local",
    [(2, 3, 77, 101, 16, 0.2, 0.1, True), (1, 2, 130, 200, 32, 0.05, 0.3, True), (1, 1, 64, 64, 16, 0.3, 0.05, False),
     (1, 2, 40, 300, 16, 0.5, 0.02, True), (2, 2, 100, 100, 32, 0.3, 0.0, False), (1, 2, 257, 257, 64, 0.1, 0.1, True)],
)
def test_head_columns_list_the_per_block_keys(b, h, lq, lk, block, p_vertical, p_slash, local):
    args = _lines(b, h, lk, p_vertical, p_slash, seed=lq * 31 + lk, local=local)
    kw = dict(q_len=lq, k_len=lk, block_size_q=block)
    per_block = build_vertical_slash_index_naive(*[a.cpu() for a in args], **kw)
    naive = build_vertical_slash_index(*[a.cpu() for a in args], column_layout="head", **kw)
    got = build_vertical_slash_index_triton(*args, column_layout="head", **kw)
    for index in (naive, reference.on_cpu(got)):
        assert index.columns_per_head and tuple(index.column_index.shape[:3]) == (b, h, 1)
        assert index.lists_same_entries(per_block) and per_block.lists_same_entries(index)
        assert torch.equal(index.computed_pairs(), per_block.computed_pairs())
    # The Triton builder's layout is the naive one, field by field (distinct lines: the same prefix).
    for field in ("column_count", "column_index", "column_cover", "range_count"):
        assert torch.equal(getattr(got, field).cpu(), getattr(naive, field).cpu()), field
    # Its kernel-counted pairs against the closed form over the naive per-block lists.
    assert torch.equal(got.block_pairs.sum(-1).cpu(), per_block.computed_pairs())
    # A block reads the head's columns below its last range when that range reaches the block's last key
    # (diagonal 0 kept), else those up to that key.
    _, p1 = query_block_bounds(lq, lk, block)
    columns = head_column_list(args[0].cpu(), args[1].cpu())
    up_to_p1 = (columns[:, :, None, :] <= p1[:, None]).sum(-1)
    if local:
        last = (per_block.range_count.long() - 1).clamp_min(0)[..., None]
        below_band = (columns[:, :, None, :] < torch.gather(per_block.range_start, -1, last)).sum(-1)
        assert torch.equal(naive.column_count.long(), torch.minimum(below_band, up_to_p1))
    else:
        assert bool((naive.column_count <= up_to_p1).all())


@settings(max_examples=40, deadline=None, derandomize=True, database=None, suppress_health_check=[HealthCheck.too_slow])
@given(k_len=st.integers(1, 160), q_frac=st.floats(0.0, 1.0), block=st.sampled_from([1, 3, 8, 16, 64]),
       n_vertical=st.integers(0, 40), n_slash=st.integers(0, 40), seed=st.integers(0, 2**16))
def test_head_columns_on_unsorted_repeated_lines(k_len, q_frac, block, n_vertical, n_slash, seed):
    """Unsorted, repeated lines with garbage padding (the builder's public contract): the per-head list
    is deduplicated and sorted, and both builders still list the per-block keys."""
    q_len = max(1, round(q_frac * k_len))
    vi, vc, so, sc, _, _ = reference.random_lines(random.Random(seed), 2, 2, k_len, n_vertical, n_slash)
    args = tuple(t.to(DEVICE) for t in (vi, vc, so, sc))
    kw = dict(q_len=q_len, k_len=k_len, block_size_q=block)
    per_block = build_vertical_slash_index_naive(*[a.cpu() for a in args], **kw)
    naive = build_vertical_slash_index(*[a.cpu() for a in args], column_layout="head", **kw)
    got = build_vertical_slash_index_triton(*args, column_layout="head", **kw)
    assert naive.lists_same_entries(per_block)
    assert reference.on_cpu(got).lists_same_entries(per_block)
    listed = naive.column_index[:, :, 0]
    real = listed != torch.iinfo(torch.int32).max
    assert bool((listed[..., 1:] > listed[..., :-1])[real[..., 1:]].all()), "per-head list not ascending and unique"
    assert torch.equal(got.block_pairs.sum(-1).cpu(), per_block.computed_pairs())


# The per-head layouts the kernels read, against the per-block one: (column_layout, ranges_per_head).
# Per-head columns with per-block ranges, with per-head ranges (as the builders pair them), and
# per-head ranges beside per-block columns.
HEAD_LAYOUTS = [("head", False), ("head", True), ("block", True)]
HEAD_LAYOUT_ID = lambda layout: f"{layout[0]}-columns-{'head' if layout[1] else 'block'}-ranges"  # noqa: E731


def _head_index(args, layout, **kw):
    """The index of ``args`` in ``layout`` (``HEAD_LAYOUTS``), checked to be in it."""
    column_layout, ranges_per_head = layout
    index = build_vertical_slash_index(*args, column_layout=column_layout, ranges_per_head=ranges_per_head, **kw)
    assert index.columns_per_head == (column_layout == "head") and index.ranges_per_head == ranges_per_head
    return index


@pytest.mark.parametrize("pieces", [False, True], ids=["whole", "pieces"])
@pytest.mark.parametrize("layout", HEAD_LAYOUTS, ids=HEAD_LAYOUT_ID)
@pytest.mark.parametrize("case", CASES, ids=CASE_ID)
def test_vertical_slash_triton_on_head_layouts_matches_naive(case, layout, pieces):
    """The index kernel reading per-head columns (masked per block) and / or per-head ranges (shifted and
    clipped per block, the last block's own row) against the naive twin on the per-block index of the
    same lines; whole bands and range pieces."""
    b, hq, hkv, lq, lk, d, block, window, softcap = case
    q, k, v = _inputs(case, seed=7 * lq + d)
    args = _lines(b, hq, lk, 0.15, 0.2, seed=lk + d)
    kw = dict(q_len=lq, k_len=lk, block_size_q=block)
    per_block = build_vertical_slash_index(*args, **kw)
    head = _head_index(args, layout, max_range_keys=32 if pieces else None, **kw)
    kvh = torch.arange(hq, device=DEVICE) // (hq // hkv)
    attend = dict(scale=d**-0.5, window=window, softcap=softcap, kv_head_index=kvh)
    ref = vertical_slash_attention_naive(q, k, v, per_block, out=torch.empty_like(q), **attend)
    out = vertical_slash_attention_triton(q, k, v, head, out=torch.full_like(q, float("nan")), **attend)
    assert _rel_err(out, ref) < REL_TOL
    # The naive twin reads the per-head layout too (it expands it first).
    naive_head = vertical_slash_attention_naive(q, k, v, head, out=torch.empty_like(q), **attend)
    assert _rel_err(naive_head, ref) < REL_TOL


@pytest.mark.parametrize("layout", HEAD_LAYOUTS, ids=HEAD_LAYOUT_ID)
@pytest.mark.parametrize("case", CASES[:3], ids=CASE_ID)
def test_head_layouts_with_range_tiles_by_tensor_descriptor(case, layout):
    b, hq, hkv, lq, lk, d, block, window, softcap = case
    q, k, v = _inputs(case, seed=5 * lq)
    args = _lines(b, hq, lk, 0.15, 0.2, seed=lk)
    kw = dict(q_len=lq, k_len=lk, block_size_q=block)
    kvh = torch.arange(hq, device=DEVICE) // (hq // hkv)
    attend = dict(scale=d**-0.5, window=window, softcap=softcap, kv_head_index=kvh)
    ref = vertical_slash_attention_naive(q, k, v, build_vertical_slash_index(*args, **kw), out=torch.empty_like(q),
                                         **attend)
    head = _head_index(args, layout, **kw)
    out = vertical_slash_attention_triton(q, k, v, head, out=torch.full_like(q, float("nan")), range_tma=True, **attend)
    assert _rel_err(out, ref) < REL_TOL


def test_head_columns_masked_inside_bands_matter():
    """Columns that lie inside a block's bands are listed per head and must be skipped: dense verticals
    under wide bands, where attending them twice changes the output."""
    case = (1, 2, 1, 96, 96, 64, 16, None, None)
    b, hq, hkv, lq, lk, d, block, _, _ = case
    q, k, v = _inputs(case, seed=1)
    # Every third key a column; diagonals 0 and 40: each block reads the columns below its local band,
    # among them those of the band 40 keys back.
    verticals = torch.arange(0, lk, 3, device=DEVICE).expand(b, hq, -1)
    slashes = torch.tensor([0, 40], device=DEVICE).expand(b, hq, -1)
    args = (verticals, torch.full((b, hq), verticals.shape[-1], device=DEVICE), slashes,
            torch.full((b, hq), 2, device=DEVICE))
    kw = dict(q_len=lq, k_len=lk, block_size_q=block)
    head = build_vertical_slash_index(*args, column_layout="head", **kw)
    per_block = build_vertical_slash_index(*args, **kw)
    # Some read column is inside a band: the layouts differ in slots, not in keys.
    assert int(head.column_count.sum()) > int(per_block.column_count.sum())
    attend = dict(scale=d**-0.5, window=None, softcap=None, kv_head_index=torch.zeros(hq, dtype=torch.long,
                                                                                       device=DEVICE))
    ref = vertical_slash_attention_naive(q, k, v, per_block, out=torch.empty_like(q), **attend)
    out = vertical_slash_attention_triton(q, k, v, head, out=torch.full_like(q, float("nan")), **attend)
    assert _rel_err(out, ref) < REL_TOL


@pytest.mark.parametrize("layout", HEAD_LAYOUTS, ids=HEAD_LAYOUT_ID)
@pytest.mark.parametrize("case", CASES[:2] + CASES[4:5], ids=CASE_ID)
def test_recall_on_head_layouts_matches_per_block(case, layout):
    b, hq, hkv, lq, lk, d, block, _, softcap = case
    q, k, _ = _inputs(case, seed=3 * lq)
    args = _lines(b, hq, lk, 0.15, 0.1, seed=lq)
    kw = dict(q_len=lq, k_len=lk, block_size_q=block)
    per_block = build_vertical_slash_index(*args, **kw)
    head = _head_index(args, layout, **kw)
    kvh = torch.arange(hq, device=DEVICE) // (hq // hkv)
    blocks = torch.tensor([0, head.range_count.shape[2] - 1, head.range_count.shape[2] // 2])
    recall = dict(scale=d**-0.5, softcap=softcap, kv_head_index=kvh)
    ref = block_recall_naive(q, k, per_block, blocks, **recall)
    for got in (block_recall_triton(q, k, head, blocks, split_keys=64, **recall),
                vertical_slash_block_recall(q, k, head, blocks, **recall),
                block_recall_naive(q, k, head, blocks, **recall)):
        torch.testing.assert_close(got, ref, atol=1e-5, rtol=0)


def test_head_columns_pairs_and_masks_without_the_builder_count():
    """Without the builder's ``block_pairs`` the pair count and the dense mask read the per-head layout
    through its coverage: equal to the per-block layout's."""
    from dataclasses import replace

    args = _lines(1, 3, 120, 0.4, 0.15, seed=9)
    kw = dict(q_len=90, k_len=120, block_size_q=16)
    per_block = build_vertical_slash_index_naive(*[a.cpu() for a in args], **kw)
    head = to_head_columns(per_block, args[0].cpu(), args[1].cpu(), diagonal_prefix(args[2].cpu(), args[3].cpu(), 120))
    head = replace(head, block_pairs=None)
    for window in (None, 7):
        assert torch.equal(head.block_pair_counts(window), per_block.block_pair_counts(window))
    assert torch.equal(head.to_dense_mask(), per_block.to_dense_mask())
    emptied = head.without_heads(torch.tensor([[False, True, False]]))
    assert int(emptied.block_pair_counts()[0, 1].sum()) == 0


def test_head_columns_refusals():
    args = [a.cpu() for a in _lines(1, 2, 64, 0.2, 0.1, seed=4)]
    kw = dict(q_len=64, k_len=64, block_size_q=16)
    with pytest.raises(ValueError, match="column_layout must be one of"):
        build_vertical_slash_index(*args, column_layout="rows", **kw)
    split = split_ranges_naive(build_vertical_slash_index_naive(*args, **kw), 8)
    with pytest.raises(ValueError, match="before the range split"):
        to_head_columns(split, args[0], args[1], diagonal_prefix(args[2], args[3], 64))
    head = build_vertical_slash_index(*args, column_layout="head", **kw)
    from dataclasses import replace

    with pytest.raises(ValueError, match=r"column_cover must be \(1, 2, 66\)"):
        replace(head, column_cover=head.column_cover[..., :-1])
    with pytest.raises(ValueError, match="per-head columns: column_index must be"):
        replace(head, column_index=head.column_index.expand(-1, -1, 4, -1))


@pytest.mark.parametrize("available,expected", [(None, "block"), (10**12, "block"), (1, "head")])
def test_auto_column_layout_follows_the_memory_available(monkeypatch, available, expected):
    """``auto``: per-head lists only where the per-block column table would exceed the share of the
    memory still available (``available`` faked; None: off CUDA); explicit layouts are kept as asked."""
    from sparseprefill.kernels.vertical_slash import head_columns
    from sparseprefill.kernels.vertical_slash.head_columns import ColumnLayout, resolve_column_layout

    monkeypatch.setattr(head_columns, "available_device_memory", lambda device: available)
    args = _lines(1, 2, 130, 0.3, 0.1, seed=6)
    kw = dict(q_len=100, k_len=130, block_size_q=16)
    per_block = build_vertical_slash_index_naive(*[a.cpu() for a in args], **kw)
    for index in (build_vertical_slash_index(*[a.cpu() for a in args], column_layout="auto", **kw),
                  build_vertical_slash_index_triton(*args, column_layout="auto", **kw)):
        assert index.columns_per_head == (expected == "head")
        assert reference.on_cpu(index).lists_same_entries(per_block)
    assert resolve_column_layout("block", 10**15, torch.device(DEVICE)) is ColumnLayout.BLOCK
    assert resolve_column_layout("head", 0, torch.device(DEVICE)) is ColumnLayout.HEAD
    share = head_columns.BLOCK_COLUMNS_MAX_SHARE
    if available is not None:  # the boundary: a table of exactly the share still fits
        assert resolve_column_layout("auto", int(share * available), torch.device(DEVICE)).value == "block"
        assert resolve_column_layout("auto", int(share * available) + 1, torch.device(DEVICE)).value == "head"
