"""Index layouts and the vertical/slash -> ranges/columns converter against brute force: key sets,
invariants (sorted, disjoint, merged), pair counting (density numerator and denominator)."""

from __future__ import annotations

import random
from dataclasses import replace

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from sparseprefill.kernels import build_vertical_slash_index
from sparseprefill.kernels.geometry import causal_pairs_total

from tests import reference as ref
from tests.reference import torch_single_thread  # noqa: F401  (autouse fixture)

FUZZ = settings(max_examples=300, deadline=None, derandomize=True, database=None, suppress_health_check=[HealthCheck.too_slow])


def check_converted_index(index, verticals, slashes, q_len, k_len, bq) -> None:
    """Every invariant of ``VerticalSlashIndex`` plus: for each (b, h, r) the union of ranges and
    columns equals the set of keys the lines cover for that query block."""
    b_n, h_n, rq = index.range_count.shape
    assert rq == -(-q_len // bq)
    assert (index.q_len, index.k_len, index.block_size_q) == (q_len, k_len, bq)
    rc, rs, re_ = index.range_count.tolist(), index.range_start.tolist(), index.range_end.tolist()
    cc, ci = index.column_count.tolist(), index.column_index.tolist()
    for b in range(b_n):
        for h in range(h_n):
            for r in range(rq):
                where = f"(b={b}, h={h}, block={r}, verticals={verticals[b][h]}, slashes={slashes[b][h]})"
                ranges = [(rs[b][h][r][i], re_[b][h][r][i]) for i in range(rc[b][h][r])]
                columns = [ci[b][h][r][i] for i in range(cc[b][h][r])]
                for s, e in ranges:
                    assert 0 <= s < e <= k_len, f"range [{s}, {e}) empty or out of [0, Lk) {where}"
                for (s0, e0), (s1, e1) in zip(ranges, ranges[1:]):
                    assert e0 <= s1, f"ranges [{s0},{e0}) and [{s1},{e1}) overlap or are unsorted {where}"
                    assert e0 < s1, f"touching ranges [{s0},{e0}) [{s1},{e1}) were not merged {where}"
                assert columns == sorted(set(columns)), f"columns {columns} not strictly ascending {where}"
                in_ranges = {j for s, e in ranges for j in range(s, e)}
                assert not (set(columns) & in_ranges), f"columns {sorted(set(columns) & in_ranges)} inside a range {where}"
                assert all(0 <= j < k_len for j in columns)
                got = in_ranges | set(columns)
                want = ref.lines_block_keys(verticals[b][h], slashes[b][h], r, bq, q_len, k_len)
                assert got == want, f"listed keys differ: missing {sorted(want - got)}, extra {sorted(got - want)} {where}"


@pytest.mark.parametrize(
    "q_len,k_len,bq,n_lines",
    [(64, 64, 16, 6), (77, 77, 16, 10), (33, 100, 8, 12), (1, 50, 16, 5), (100, 100, 1, 8), (50, 50, 64, 20), (20, 20, 4, 20)],
    ids=["64_bs16", "odd_77", "chunked_33_of_100", "decode", "block_size_1", "one_block", "all_lines"],
)
def test_vertical_slash_index_lists_exactly_the_keys_the_lines_cover(q_len, k_len, bq, n_lines):
    rng = random.Random(q_len * 1000 + k_len)
    vi, vc, so, sc, verticals, slashes = ref.random_lines(rng, 2, 3, k_len, n_lines, n_lines)
    index = build_vertical_slash_index(vi, vc, so, sc, q_len=q_len, k_len=k_len, block_size_q=bq)
    check_converted_index(index, verticals, slashes, q_len, k_len, bq)


@FUZZ
@given(
    k_len=st.integers(1, 120),
    q_frac=st.floats(0.0, 1.0),
    bq=st.sampled_from([1, 3, 8, 16, 32]),
    n_vertical=st.integers(0, 12),
    n_slash=st.integers(0, 12),
    int32_lines=st.booleans(),
    seed=st.integers(0, 2**16),
)
def test_vertical_slash_index_fuzz(k_len, q_frac, bq, n_vertical, n_slash, int32_lines, seed):
    q_len = max(1, round(q_frac * k_len))
    rng = random.Random(seed)
    vi, vc, so, sc, verticals, slashes = ref.random_lines(rng, 2, 2, k_len, n_vertical, n_slash)
    if int32_lines:
        vi, vc, so, sc = (t.to(torch.int32) for t in (vi, vc, so, sc))
    index = build_vertical_slash_index(vi, vc, so, sc, q_len=q_len, k_len=k_len, block_size_q=bq)
    check_converted_index(index, verticals, slashes, q_len, k_len, bq)


def test_vertical_slash_index_duplicate_and_overlapping_slashes_are_merged():
    """Slashes 0, 0, 1, 5, 3 (duplicates, unsorted) and verticals 2, 10, 11 on one block of 8 rows."""
    vi = torch.tensor([[[2, 10, 11]]])
    so = torch.tensor([[[0, 0, 1, 5, 3]]])
    index = build_vertical_slash_index(vi, torch.tensor([[3]]), so, torch.tensor([[5]]), q_len=8, k_len=12, block_size_q=8)
    # rows at positions 4..11: d in {0,1} -> keys 3..11, d=3 -> 1..8, d=5 -> 0..6 => [0, 12) one range
    assert index.range_count.tolist() == [[[1]]]
    assert (index.range_start[0, 0, 0, 0].item(), index.range_end[0, 0, 0, 0].item()) == (0, 12)
    assert index.column_count.tolist() == [[[0]]], "verticals inside the range must be dropped"
    assert ref.vertical_slash_key_multiplicity(index).max() == 1


def test_vertical_slash_index_drops_verticals_after_the_blocks_last_row():
    vi = torch.tensor([[[0, 5, 20, 31]]])
    so = torch.tensor([[[-1]]])  # padding only: no slash
    index = build_vertical_slash_index(vi, torch.tensor([[4]]), so, torch.tensor([[0]]), q_len=32, k_len=32, block_size_q=16)
    # block 0 covers positions 0..15: verticals 20 and 31 are in its future
    cols0 = index.column_index[0, 0, 0, : index.column_count[0, 0, 0]].tolist()
    cols1 = index.column_index[0, 0, 1, : index.column_count[0, 0, 1]].tolist()
    assert cols0 == [0, 5], cols0
    assert cols1 == [0, 5, 20, 31], cols1
    assert index.range_count.tolist() == [[[0, 0]]]


# ------------------------------------------------------------------------------------------------
# pair counting


@pytest.mark.parametrize("window", [None, 1, 7, 30, 1000])
@pytest.mark.parametrize(
    "q_len,k_len,bq,bk", [(61, 61, 16, 16), (30, 95, 16, 32), (1, 40, 16, 16), (50, 50, 8, 64)],
    ids=["odd_square", "chunked_bk32", "decode", "bk_larger_than_bq"],
)
def test_block_sparse_computed_pairs_equals_brute_force_count(window, q_len, k_len, bq, bk):
    index = ref.random_block_sparse_index(random.Random(q_len + k_len), 2, 3, q_len, k_len, bq, bk, 0.5)
    expected = ref.pair_count(ref.block_sparse_listed_mask(index), q_len, k_len, window)
    got = index.computed_pairs(window)
    assert got.dtype == torch.int64 and got.shape == (2, 3)
    assert torch.equal(got, expected), f"computed_pairs {got.tolist()} != brute force {expected.tolist()}"


@pytest.mark.parametrize("window", [None, 1, 7, 30, 1000])
@pytest.mark.parametrize("source", ["direct", "from_lines"])
@pytest.mark.parametrize("q_len,k_len,bq", [(61, 61, 16), (30, 95, 8), (1, 40, 16), (64, 64, 64)], ids=["odd_square", "chunked", "decode", "one_block"])
def test_vertical_slash_computed_pairs_equals_brute_force_count(window, source, q_len, k_len, bq):
    rng = random.Random(q_len * 7 + k_len)
    if source == "direct":
        index = ref.random_vertical_slash_index(rng, 2, 3, q_len, k_len, bq, 0.4)
    else:
        vi, vc, so, sc, _, _ = ref.random_lines(rng, 2, 3, k_len, 8, 8)
        index = build_vertical_slash_index(vi, vc, so, sc, q_len=q_len, k_len=k_len, block_size_q=bq)
    expected = ref.pair_count(ref.vertical_slash_listed_mask(index), q_len, k_len, window)
    got = index.computed_pairs(window)
    assert got.dtype == torch.int64 and got.shape == (2, 3)
    assert torch.equal(got, expected), f"computed_pairs {got.tolist()} != brute force {expected.tolist()}"


@settings(max_examples=80, deadline=None, derandomize=True, database=None)
@given(k_len=st.integers(1, 200), q_frac=st.floats(0.0, 1.0), window=st.one_of(st.none(), st.integers(1, 250)))
def test_causal_pairs_total_equals_brute_force_count(k_len, q_frac, window):
    q_len = max(1, round(q_frac * k_len))
    expected = int(ref.pair_count(None, q_len, k_len, window))
    assert causal_pairs_total(q_len, k_len, window) == expected


def test_full_indices_compute_exactly_the_causal_total():
    """An index listing every block / every key computes exactly causal_pairs_total (density 1)."""
    q_len, k_len, bs = 45, 70, 16
    full_bs = ref.random_block_sparse_index(random.Random(0), 1, 2, q_len, k_len, bs, bs, 1.0)
    full_vs = ref.random_vertical_slash_index(random.Random(0), 1, 2, q_len, k_len, bs, 1.0)
    for window in (None, 9):
        total = int(ref.pair_count(None, q_len, k_len, window))
        assert full_bs.computed_pairs(window).tolist() == [[total, total]]
        assert full_vs.computed_pairs(window).tolist() == [[total, total]]


# ------------------------------------------------------------------------------------------------
# debugging helpers of the index dataclasses


@pytest.mark.parametrize("q_len,k_len", [(45, 45), (20, 77)])
def test_index_to_dense_mask_matches_reference_mask(q_len, k_len):
    rng = random.Random(q_len)
    bs_index = ref.random_block_sparse_index(rng, 2, 2, q_len, k_len, 16, 8, 0.5)
    assert torch.equal(bs_index.to_dense_mask(), ref.block_sparse_listed_mask(bs_index))
    vs_index = ref.random_vertical_slash_index(rng, 2, 2, q_len, k_len, 16, 0.5)
    assert torch.equal(vs_index.to_dense_mask(), ref.vertical_slash_listed_mask(vs_index))


def test_lists_same_entries_ignores_padding_but_not_entries():
    vi, so = torch.tensor([[[1, 9, 20]]]), torch.tensor([[[0, 4]]])
    index = build_vertical_slash_index(vi, torch.tensor([[3]]), so, torch.tensor([[2]]), q_len=32, k_len=32, block_size_q=8)
    padded = replace(index, column_index=torch.cat([index.column_index, torch.full_like(index.column_index, 7)], -1))
    assert index.lists_same_entries(padded) and padded.lists_same_entries(index)
    moved = index.column_index.clone()
    moved[0, 0, -1, 0] += 1
    assert not index.lists_same_entries(replace(index, column_index=moved))
    assert not index.lists_same_entries(replace(index, column_count=index.column_count + 1))


@FUZZ
@given(
    k_len=st.integers(1, 120),
    q_frac=st.floats(0.0, 1.0),
    bq=st.sampled_from([1, 8, 16, 32]),
    n_vertical=st.integers(0, 12),
    n_slash=st.integers(0, 12),
    seed=st.integers(0, 2**16),
)
def test_lines_pairs_lower_bound_counts_full_blocks_exactly_and_never_exceeds_the_index(k_len, q_frac, bq, n_vertical,
                                                                                      n_slash, seed):
    """``VerticalSlashLines.pairs_lower_bound``: the larger of the columns' causal pairs and the diagonals'
    band pairs, which on full-width blocks equal what the index of the diagonals alone lists there and on
    the last, narrower block are the diagonals' own pairs with gaps up to its width filled (brute force
    over rows); never more than the index of all the lines counts, sorted or not, repeats counted once."""
    from sparseprefill.kernels.vertical_slash import vertical_slash_lines

    q_len = max(1, round(q_frac * k_len))
    rng = random.Random(seed)
    vi, vc, so, sc, verticals, slashes = ref.random_lines(rng, 2, 2, k_len, n_vertical, n_slash)
    real = int(sc[0, 0])
    if 0 < real < so.shape[-1]:  # a repeated diagonal: the contract allows them
        so[0, 0, real], sc[0, 0] = so[0, 0, 0], real + 1
        slashes[0][0] = so[0, 0, :real + 1].tolist()
    lines = vertical_slash_lines(vi, vc, so, sc, q_len=q_len, k_len=k_len, block_size_q=bq)
    full_blocks = q_len // bq
    partial_rows = range(k_len - q_len + full_blocks * bq, k_len)
    band = build_vertical_slash_index(vi, torch.zeros_like(vc), so, sc, q_len=q_len, k_len=k_len,
                                      block_size_q=bq).block_pair_counts()[..., :full_blocks].sum(-1)
    expected = torch.zeros(2, 2, dtype=torch.int64)
    for b in range(2):
        for h in range(2):
            offsets = sorted(set(slashes[b][h]))
            filled = set(offsets)
            for lo, hi in zip(offsets, offsets[1:]):
                if hi - lo <= len(partial_rows):
                    filled.update(range(lo, hi))
            diagonals = int(band[b, h]) + sum(1 for e in filled for p in partial_rows if p >= e)
            columns = sum(1 for c in set(verticals[b][h]) for p in range(k_len - q_len, k_len) if p >= c)
            expected[b, h] = max(diagonals, columns)
    assert torch.equal(lines.pairs_lower_bound(), expected), (lines.pairs_lower_bound(), expected)
    index_pairs = build_vertical_slash_index(vi, vc, so, sc, q_len=q_len, k_len=k_len, block_size_q=bq).computed_pairs()
    assert bool((expected <= index_pairs).all()), (expected, index_pairs)
    ascending = vertical_slash_lines(vi, vc, torch.where(torch.arange(so.shape[-1]) < sc[..., None], so, k_len)
                                     .sort(dim=-1).values, sc, q_len=q_len, k_len=k_len, block_size_q=bq)
    assert torch.equal(ascending.pairs_lower_bound(lines_sorted=True), expected)
    emptied = lines.without_heads(torch.tensor([[True, False], [False, True]]))
    assert emptied.pairs_lower_bound()[0, 0] == 0 and emptied.pairs_lower_bound()[1, 1] == 0
    assert emptied.pairs_lower_bound()[0, 1] == expected[0, 1] and emptied.pairs_lower_bound()[1, 0] == expected[1, 0]


@pytest.mark.parametrize("q_len,k_len,bq", [(64, 64, 16), (77, 77, 16), (33, 100, 8)])
def test_with_heads_whole_lists_every_visible_key_of_those_heads_only(q_len, k_len, bq):
    """``VerticalSlashIndex.with_heads_whole``: the chosen heads list every causally visible key (their
    pair count is the causal total), the others keep their entries, whether or not the index was cut into
    range pieces."""
    from sparseprefill.kernels.vertical_slash import split_ranges_naive

    vi, vc, so, sc, _, _ = ref.random_lines(random.Random(q_len), 2, 3, k_len, 6, 6)
    index = build_vertical_slash_index(vi, vc, so, sc, q_len=q_len, k_len=k_len, block_size_q=bq)
    heads = torch.tensor([[True, False, False], [False, False, True]])
    causal = causal_pairs_total(q_len, k_len)
    for source in (index, split_ranges_naive(index, 4)):
        whole = source.with_heads_whole(heads)
        pairs = whole.computed_pairs()
        assert bool((pairs[heads] == causal).all()), pairs
        assert torch.equal(pairs[~heads], source.computed_pairs()[~heads])
        mask, kept = ref.vertical_slash_listed_mask(whole), ref.vertical_slash_listed_mask(source)
        # A block's whole list: every key up to its last row's position (the kernel masks the rest causally).
        block_last = torch.clamp((torch.arange(q_len) // bq + 1) * bq, max=q_len) - 1 + (k_len - q_len)
        visible = torch.arange(k_len)[None, :] <= block_last[:, None]
        assert bool((mask[heads] == visible).all()) and torch.equal(mask[~heads], kept[~heads])
