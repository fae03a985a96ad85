"""The per-head range layout of ``VerticalSlashIndex`` (``ranges_per_head``): one table per head of
block-relative ranges (a row for full-width blocks, one for the last block) against the per-block lists
of the same lines.

Both builders (the torch reference and the Triton kernels) must list exactly the per-block keys; with
whole bands the very same ranges, with range pieces the same keys in pieces no wider than asked. The
attention and recall kernels on the per-head layouts are tested beside per-head columns
(``test_head_columns.py``, ``HEAD_LAYOUTS``). On the CPU the Triton kernels run in the interpreter;
outputs are pre-filled with NaN.
"""

from __future__ import annotations

import random
from dataclasses import replace

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

triton = pytest.importorskip("triton", reason="Triton is not importable on this machine")

from sparseprefill.kernels import build_vertical_slash_index  # noqa: E402
from sparseprefill.kernels.indices import RANGE_TABLE_ROWS  # noqa: E402
from sparseprefill.kernels.vertical_slash.head_columns import diagonal_prefix, to_head_columns  # noqa: E402
from sparseprefill.kernels.vertical_slash.head_ranges import head_range_table, resolve_ranges_per_head  # noqa: E402
from sparseprefill.kernels.vertical_slash.naive import (  # noqa: E402
    build_vertical_slash_index_naive,
    split_ranges_naive,
    vertical_slash_attention_naive,
)
from sparseprefill.kernels.vertical_slash.triton_attention import vertical_slash_attention_triton  # noqa: E402
from sparseprefill.kernels.vertical_slash.triton_index import build_vertical_slash_index_triton  # noqa: E402

from tests import reference  # noqa: E402
from tests.kernels.test_head_columns import _inputs, _lines, _rel_err  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
REL_TOL = 1e-4  # fp32 inputs: both paths accumulate in fp32 over the same keys


def _check_block_lists(index, max_range_keys):
    """Every block's expanded ranges ascend, are disjoint and non-empty, start at or above key 0 and are no
    wider than the pieces asked for."""
    count, start, end = index.block_ranges()
    real = torch.arange(start.shape[-1]) < count[..., None]
    assert bool((start[real] >= 0).all()) and bool((end[real] > start[real]).all())
    follows = real[..., 1:]
    assert bool((start[..., 1:] >= end[..., :-1])[follows].all()), "ranges overlap or are out of order"
    if max_range_keys is not None:
        assert bool(((end - start)[real] <= max_range_keys).all())


def _assert_same_keys(head, per_block, max_range_keys):
    """The per-head layout lists the per-block layout's keys: the same ranges with whole bands, the same
    dense mask and pair counts (so no key twice) with pieces."""
    assert head.ranges_per_head and tuple(head.range_start.shape[2:3]) == (RANGE_TABLE_ROWS,)
    assert torch.equal(head.to_dense_mask(), per_block.to_dense_mask())
    assert torch.equal(head.block_pair_counts(), per_block.block_pair_counts())
    if max_range_keys is None:
        assert head.lists_same_entries(per_block) and per_block.lists_same_entries(head)
    _check_block_lists(head, max_range_keys)


@pytest.mark.parametrize("max_range_keys", [None, 8, 32])
@pytest.mark.parametrize(
    "b,h,lq,lk,block,p_vertical,p_slash,local",
    [(2, 3, 77, 101, 16, 0.2, 0.1, True), (1, 2, 130, 200, 32, 0.05, 0.3, True), (1, 1, 64, 64, 16, 0.3, 0.05, False),
     (1, 2, 40, 300, 16, 0.5, 0.02, True), (2, 2, 100, 100, 32, 0.3, 0.0, False), (1, 2, 257, 257, 64, 0.1, 0.1, True)],
)
def test_head_ranges_list_the_per_block_keys(b, h, lq, lk, block, p_vertical, p_slash, local, max_range_keys):
    args = _lines(b, h, lk, p_vertical, p_slash, seed=lq * 17 + lk, local=local)
    kw = dict(q_len=lq, k_len=lk, block_size_q=block, max_range_keys=max_range_keys)
    per_block = build_vertical_slash_index(*[a.cpu() for a in args], **kw)
    for column_layout in ("block", "head"):
        naive = build_vertical_slash_index(*[a.cpu() for a in args], column_layout=column_layout,
                                           ranges_per_head=True, **kw)
        got = build_vertical_slash_index_triton(*args, column_layout=column_layout, ranges_per_head=True, **kw)
        for index in (naive, reference.on_cpu(got)):
            _assert_same_keys(index, per_block, max_range_keys)
        # The Triton builder's tables read as the reference's, piece for piece.
        assert torch.equal(got.range_count.cpu(), naive.range_count)
        assert reference.on_cpu(got).lists_same_entries(naive)
        assert torch.equal(got.block_pairs.cpu(), per_block.block_pair_counts())
        if column_layout == "head":
            assert torch.equal(got.column_count.cpu(), naive.column_count)


@settings(max_examples=40, deadline=None, derandomize=True, database=None, suppress_health_check=[HealthCheck.too_slow])
@given(k_len=st.integers(1, 160), q_frac=st.floats(0.0, 1.0), block=st.sampled_from([1, 3, 8, 16, 64]),
       n_vertical=st.integers(0, 40), n_slash=st.integers(0, 40), pieces=st.sampled_from([None, 1, 5, 32]),
       seed=st.integers(0, 2**16))
def test_head_ranges_on_unsorted_repeated_lines(k_len, q_frac, block, n_vertical, n_slash, pieces, seed):
    """Unsorted, repeated diagonals with garbage padding and diagonals past every key (the builder's
    public contract), any block width and query offset: both builders list the per-block keys."""
    q_len = max(1, round(q_frac * k_len))
    vi, vc, so, sc, _, _ = reference.random_lines(random.Random(seed), 2, 2, k_len, n_vertical, n_slash)
    args = tuple(t.to(DEVICE) for t in (vi, vc, so, sc))
    kw = dict(q_len=q_len, k_len=k_len, block_size_q=block, max_range_keys=pieces)
    per_block = build_vertical_slash_index(*[a.cpu() for a in args], **kw)
    naive = build_vertical_slash_index(*[a.cpu() for a in args], ranges_per_head=True, column_layout="head", **kw)
    got = build_vertical_slash_index_triton(*args, ranges_per_head=True, column_layout="head", **kw)
    for index in (naive, reference.on_cpu(got)):
        _assert_same_keys(index, per_block, pieces)
    assert torch.equal(got.block_pairs.cpu(), per_block.block_pair_counts())


def test_head_range_table_is_per_head_not_per_block():
    """The table's size follows the runs, not the blocks: the same lines at 4x the length keep a table
    of the same width; and a head whose local band reaches below key 0 in the first blocks has its
    ranges clipped there, and those past it dropped, only in those blocks."""
    so = torch.tensor([[[0, 1, 2, 40, 41, 200]]])
    sc = torch.tensor([[6]])
    widths = []
    for length in (256, 1024):
        count, start, end, _ = head_range_table(so, sc, q_len=length, k_len=length, block_size_q=16)
        assert tuple(start.shape[:3]) == (1, 1, RANGE_TABLE_ROWS)
        widths.append(start.shape[-1])
        # Runs at width 16: {0, 1, 2}, {40, 41}, {200}: farthest first, relative to p0.
        assert start[0, 0, 0].tolist() == [-200, -41, -2] and end[0, 0, 0].tolist() == [16 - 200, 16 - 40, 16]
        # Blocks 0 and 1 (p0 = 0, 16) see only the local band (block 0's clipped to [0, 16)); from block 2
        # (p0 = 32) the band of 40 too; the last block (p0 = length - 16) all three.
        assert count[0, 0, :4].tolist() == [1, 1, 2, 2] and int(count[0, 0, -1]) == 3
    assert widths[0] == widths[1] == 3


def test_clipped_ranges_matter():
    """Long bands reaching below key 0 in the first blocks: without the clip at key 0 (or with the full
    row read by the last, narrower block) the kernel would read keys that do not exist or miss some;
    the output matches the per-block index's."""
    case = (1, 2, 1, 90, 90, 64, 16, None, None)
    b, hq, hkv, lq, lk, d, block, _, _ = case
    q, k, v = _inputs(case, seed=2)
    slashes = torch.arange(0, 60, 3, device=DEVICE).expand(b, hq, -1)  # one run at width 16: [0, 57]
    args = (torch.zeros(b, hq, 1, dtype=torch.long, device=DEVICE), torch.ones(b, hq, dtype=torch.long, device=DEVICE),
            slashes, torch.full((b, hq), slashes.shape[-1], device=DEVICE))
    kw = dict(q_len=lq, k_len=lk, block_size_q=block, max_range_keys=8)
    head = build_vertical_slash_index(*args, ranges_per_head=True, **kw)
    per_block = build_vertical_slash_index(*args, **kw)
    assert int(head.range_start.min()) < -50  # relative starts far below key 0 for the first blocks
    attend = dict(scale=d**-0.5, window=None, softcap=None, kv_head_index=torch.zeros(hq, dtype=torch.long,
                                                                                       device=DEVICE))
    ref = vertical_slash_attention_naive(q, k, v, per_block, out=torch.empty_like(q), **attend)
    out = vertical_slash_attention_triton(q, k, v, head, out=torch.full_like(q, float("nan")), **attend)
    assert _rel_err(out, ref) < REL_TOL


def test_head_ranges_pairs_masks_and_whole_heads_without_the_builder_count():
    """Without the builder's ``block_pairs`` the pair count (with and without a window), the dense mask,
    emptied heads and heads made whole read the per-head table through its expansion."""
    args = [a.cpu() for a in _lines(1, 3, 120, 0.3, 0.15, seed=19)]
    kw = dict(q_len=90, k_len=120, block_size_q=16)
    per_block = build_vertical_slash_index(*args, max_range_keys=8, **kw)
    head = replace(build_vertical_slash_index(*args, ranges_per_head=True, max_range_keys=8, **kw), block_pairs=None)
    for window in (None, 7):
        assert torch.equal(head.block_pair_counts(window), per_block.block_pair_counts(window))
    assert torch.equal(head.to_dense_mask(), per_block.to_dense_mask())
    heads = torch.tensor([[False, True, False]])
    assert int(head.without_heads(heads).block_pair_counts()[0, 1].sum()) == 0
    assert torch.equal(head.with_heads_whole(heads).to_dense_mask(), per_block.with_heads_whole(heads).to_dense_mask())


def test_head_ranges_follow_head_columns_and_refusals():
    args = [a.cpu() for a in _lines(1, 2, 64, 0.2, 0.1, seed=4)]
    kw = dict(q_len=64, k_len=64, block_size_q=16)
    assert build_vertical_slash_index(*args, column_layout="head", **kw).ranges_per_head
    assert not build_vertical_slash_index(*args, column_layout="block", **kw).ranges_per_head
    assert not build_vertical_slash_index(*args, column_layout="head", ranges_per_head=False, **kw).ranges_per_head
    assert resolve_ranges_per_head(None, True) and not resolve_ranges_per_head(None, False)
    assert resolve_ranges_per_head(True, False)
    head = build_vertical_slash_index(*args, ranges_per_head=True, **kw)
    with pytest.raises(ValueError, match="one range table per head"):
        head.range_valid()
    with pytest.raises(ValueError, match="range_valid"):
        split_ranges_naive(head, 8)
    with pytest.raises(ValueError, match="per-head ranges"):
        to_head_columns(head, args[0], args[1], diagonal_prefix(args[2], args[3], 64))
    with pytest.raises(ValueError, match=r"per-head ranges: range_start must be \(1, 2, 2, 'M'\)"):
        replace(head, range_start=head.range_start[:, :, :1], range_end=head.range_end[:, :, :1])
    with pytest.raises(ValueError, match="max_range_keys must be >= 1"):
        head_range_table(args[2], args[3], max_range_keys=0, **kw)


def test_head_ranges_reference_rejects_a_wrong_row():
    """The test's own power: the last block reading the full-width row (not its own) lists other keys
    on a narrower last block, which the comparison above catches."""
    args = [a.cpu() for a in _lines(1, 2, 100, 0.0, 0.3, seed=8)]
    kw = dict(q_len=100, k_len=100, block_size_q=32)  # last block: 4 rows
    head = build_vertical_slash_index(*args, ranges_per_head=True, **kw)
    per_block = build_vertical_slash_index_naive(*args, **kw)
    wrong_row = replace(head, range_start=head.range_start[:, :, :1].expand(-1, -1, 2, -1),
                        range_end=head.range_end[:, :, :1].expand(-1, -1, 2, -1))
    assert torch.equal(head.to_dense_mask(), per_block.to_dense_mask())
    assert not torch.equal(wrong_row.to_dense_mask(), per_block.to_dense_mask())
