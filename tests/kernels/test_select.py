"""Cumulative-mass / top-k selection (``keep_by_cumulative_mass``) and block-index construction
(``select_blocks``): hypothesis property tests against the definitions."""

from __future__ import annotations

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from sparseprefill.kernels import keep_by_cumulative_mass, select_blocks
from sparseprefill.kernels.mass_select import KEEP_ALL_MASS

from tests import reference as ref
from tests.reference import torch_single_thread  # noqa: F401  (autouse fixture)

PROPS = settings(max_examples=400, deadline=None, derandomize=True, database=None, suppress_health_check=[HealthCheck.too_slow])


@st.composite
def candidates(draw, max_rows: int = 4, max_n: int = 24):
    """Rows of (score, valid, forced). Scores are small integers (plus exact zeros) so float32 sums
    are exact and the properties can be checked without rounding slack."""
    rows = draw(st.integers(1, max_rows))
    n = draw(st.integers(1, max_n))
    cell = st.tuples(st.integers(0, 50), st.integers(0, 3), st.integers(0, 5))
    data = draw(st.lists(st.lists(cell, min_size=n, max_size=n), min_size=rows, max_size=rows))
    scores = torch.tensor([[float(s) for s, _, _ in row] for row in data])
    valid = torch.tensor([[v != 0 for _, v, _ in row] for row in data])  # ~3/4 valid
    forced = torch.tensor([[f == 0 for _, _, f in row] for row in data])  # ~1/6 forced (some invalid)
    return scores, valid, forced


MASSES = st.sampled_from([0.0, 0.1, 0.3, 0.5, 0.75, 0.9, 0.95, 0.99, 0.999999])


@PROPS
@given(cands=candidates(), mass=MASSES)
def test_keep_by_mass_properties(cands, mass):
    scores, valid, forced = cands
    keep = keep_by_cumulative_mass(scores, valid, forced, mass)
    assert keep.dtype == torch.bool and keep.shape == scores.shape
    for row in range(scores.shape[0]):
        s, v, f, k = scores[row].tolist(), valid[row].tolist(), forced[row].tolist(), keep[row].tolist()
        n = len(s)
        where = f"row {row}: scores={s} valid={v} forced={f} kept={k} mass={mass}"
        assert all(not k[i] or v[i] for i in range(n)), f"kept an invalid candidate; {where}"
        assert all(k[i] for i in range(n) if f[i] and v[i]), f"dropped a forced valid candidate; {where}"
        total = sum(s[i] for i in range(n) if v[i])
        kept_mass = sum(s[i] for i in range(n) if k[i])
        assert kept_mass >= mass * total - 1e-9 * max(total, 1), f"kept mass {kept_mass} < {mass} x {total}; {where}"
        optional = [i for i in range(n) if k[i] and not f[i]]
        if optional:
            smallest = min(optional, key=lambda i: s[i])
            assert kept_mass - s[smallest] < mass * total + 1e-9 * max(total, 1), (
                f"not minimal: dropping kept candidate {smallest} (score {s[smallest]}) still reaches the target; {where}"
            )
            # greedy order: nothing dropped (valid, not forced) scores above a kept optional one
            dropped = [s[i] for i in range(n) if v[i] and not k[i]]
            if dropped:
                assert max(dropped) <= s[smallest], f"a dropped candidate outscores a kept one; {where}"


@PROPS
@given(cands=candidates())
def test_keep_by_mass_one_keeps_every_valid_candidate(cands):
    scores, valid, forced = cands
    assert torch.equal(keep_by_cumulative_mass(scores, valid, forced, 1.0), valid)


def test_keep_by_mass_one_keeps_candidates_with_zero_score():
    """Mass 1.0 means "everything that could hold mass": zero-score (underflowed) candidates too."""
    scores = torch.tensor([[1.0, 0.0, 0.0, 2.0]])
    valid = torch.tensor([[True, True, False, True]])
    forced = torch.zeros_like(valid)
    assert keep_by_cumulative_mass(scores, valid, forced, 1.0).tolist() == [[True, True, False, True]]


@PROPS
@given(cands=candidates(), top_k=st.integers(0, 30))
def test_keep_top_k_keeps_forced_plus_k_best(cands, top_k):
    scores, valid, forced = cands
    keep = keep_by_cumulative_mass(scores, valid, forced, 0.5, top_k=top_k)  # mass is ignored with top_k
    for row in range(scores.shape[0]):
        s, v, f, k = scores[row].tolist(), valid[row].tolist(), forced[row].tolist(), keep[row].tolist()
        n = len(s)
        where = f"row {row}: scores={s} valid={v} forced={f} kept={k} top_k={top_k}"
        assert all(not k[i] or v[i] for i in range(n)), where
        assert all(k[i] for i in range(n) if f[i] and v[i]), where
        others = [i for i in range(n) if v[i] and not f[i]]
        kept_others = [i for i in others if k[i]]
        assert len(kept_others) == min(top_k, len(others)), f"kept {len(kept_others)} non-forced; {where}"
        dropped = [s[i] for i in others if not k[i]]
        if kept_others and dropped:
            assert min(s[i] for i in kept_others) >= max(dropped), f"not the best {top_k}; {where}"


@PROPS
@given(cands=candidates(), mass=MASSES, max_count=st.integers(0, 10))
def test_keep_by_mass_max_count_caps_non_forced(cands, mass, max_count):
    scores, valid, forced = cands
    capped = keep_by_cumulative_mass(scores, valid, forced, mass, max_count=max_count)
    uncapped = keep_by_cumulative_mass(scores, valid, forced, mass)
    assert not (capped & ~uncapped).any(), "the cap added candidates"
    assert ((capped & ~(forced & valid)).sum(-1) <= max_count).all()
    assert torch.equal(capped & forced & valid, forced & valid)


def test_keep_by_mass_concrete_example():
    scores = torch.tensor([[5.0, 1.0, 3.0, 0.0, 1.0]])  # total 10
    valid = torch.ones(1, 5, dtype=torch.bool)
    forced = torch.tensor([[False, True, False, False, False]])
    # forced 1 (mass 1), then 5 (6), then 3 (9 >= 8.5): stop
    assert keep_by_cumulative_mass(scores, valid, forced, 0.85).tolist() == [[True, True, True, False, False]]
    # 0.9 -> 9 >= 9 reached exactly: still stop
    assert keep_by_cumulative_mass(scores, valid, forced, 0.9).tolist() == [[True, True, True, False, False]]
    # 0.95 -> needs one of the remaining 1.0 candidates (the 0.0 one adds nothing)
    assert keep_by_cumulative_mass(scores, valid, forced, 0.95).tolist() == [[True, True, True, False, True]]


# ------------------------------------------------------------------------------------------------
# select_blocks


@st.composite
def block_grids(draw):
    k_len = draw(st.integers(1, 150))
    q_len = max(1, round(draw(st.floats(0, 1)) * k_len))
    bq = draw(st.sampled_from([8, 16, 32]))
    bk = draw(st.sampled_from([8, 16, 32]))
    sink = draw(st.integers(0, 3))
    seed = draw(st.integers(0, 2**16))
    return q_len, k_len, bq, bk, sink, seed


@PROPS
@given(grid=block_grids(), mass=MASSES | st.just(1.0), use_top_k=st.booleans(), top_k=st.integers(0, 4),
       local=st.sampled_from([0, 0, 1, 3]))
def test_select_blocks_keeps_sink_and_diagonal_and_stays_causal(grid, mass, use_top_k, top_k, local):
    q_len, k_len, bq, bk, sink, seed = grid
    rq, rk = -(-q_len // bq), -(-k_len // bk)
    gen = torch.Generator().manual_seed(seed)
    scores = torch.rand(2, 3, rq, rk, generator=gen) ** 4  # skewed, like softmax mass
    index = select_blocks(
        scores, q_len=q_len, k_len=k_len, block_size_q=bq, block_size_k=bk, mass=mass,
        top_k=top_k if use_top_k else None, sink_blocks=sink, local_blocks=local,
    )
    assert (index.q_len, index.k_len, index.block_size_q, index.block_size_k) == (q_len, k_len, bq, bk)
    assert index.block_count.shape == (2, 3, rq)
    sets = ref.causal_block_sets(q_len, k_len, bq, bk, sink, local)
    counts, ids = index.block_count.tolist(), index.block_index.tolist()
    for b in range(2):
        for h in range(3):
            for r in range(rq):
                valid, diag, sink_set = sets[r]
                kept = ids[b][h][r][: counts[b][h][r]]
                where = f"(b={b}, h={h}, block={r}: kept {kept}, valid {sorted(valid)}, diag {sorted(diag)}, sink {sorted(sink_set)})"
                assert kept == sorted(set(kept)), f"ids not strictly ascending {where}"
                assert set(kept) <= valid, f"non-causal block kept {where}"
                assert diag <= set(kept), f"diagonal or local-band block dropped {where}"
                assert sink_set <= set(kept), f"sink block dropped {where}"
                row = scores[b, h, r].tolist()
                total = sum(row[c] for c in valid)
                if mass >= 1.0 and not use_top_k:
                    assert set(kept) == valid, f"mass 1.0 must keep every causal block {where}"
                elif use_top_k:
                    others = valid - diag - sink_set
                    assert len(set(kept) - diag - sink_set) == min(top_k, len(others)), where
                else:
                    kept_mass = sum(row[c] for c in kept)
                    assert kept_mass >= mass * total * (1 - 1e-5) - 1e-7, f"kept mass {kept_mass} < {mass} of {total} {where}"


def test_select_blocks_index_drives_the_kernel_like_its_dense_mask():
    """End to end: the selected index, run through block-sparse attention, equals masked attention
    over the blocks the reference reads from it."""
    from sparseprefill.kernels import block_sparse_attention

    q, k, v = ref.make_qkv(2, 1, 2, 1, 70, 70, 16)
    scores = torch.rand(1, 2, 5, 5, generator=torch.Generator().manual_seed(2))
    index = select_blocks(scores, q_len=70, k_len=70, block_size_q=16, block_size_k=16, mass=0.5)
    listed = ref.block_sparse_listed_mask(index)
    out = block_sparse_attention(q, k, v, index, scale=0.25)
    torch.testing.assert_close(out.double(), ref.attention_reference(q, k, v, scale=0.25, listed=listed), atol=2e-5, rtol=2e-5)


def test_select_blocks_rejects_wrong_grid():
    with pytest.raises(ValueError):
        select_blocks(torch.rand(1, 1, 3, 3), q_len=64, k_len=64, block_size_q=16, block_size_k=16, mass=0.9)


def test_select_blocks_local_band_by_hand():
    """Blocks of 16 over 100 tokens, mass 0, sink 1, a band of 2: query block 5 (positions 80-95) keeps
    the sink 0, the band 3-4 (keys 48-79) and its diagonal 5; block 1 keeps 0-1; the last block (96-99)
    keeps 0 and 4-6."""
    scores = torch.rand(1, 1, 7, 7, generator=torch.Generator().manual_seed(0))
    index = select_blocks(scores, q_len=100, k_len=100, block_size_q=16, block_size_k=16, mass=0.0, sink_blocks=1,
                          local_blocks=2)
    lists = [index.block_index[0, 0, r, : index.block_count[0, 0, r]].tolist() for r in range(7)]
    assert lists[5] == [0, 3, 4, 5] and lists[1] == [0, 1] and lists[6] == [0, 4, 5, 6], lists
    with pytest.raises(ValueError, match="local_blocks"):
        select_blocks(scores, q_len=100, k_len=100, block_size_q=16, block_size_k=16, mass=0.5, local_blocks=-1)


def test_select_blocks_zero_mass_keeps_only_forced_blocks():
    q_len = k_len = 100
    scores = torch.rand(1, 1, 7, 7, generator=torch.Generator().manual_seed(0))
    index = select_blocks(scores, q_len=q_len, k_len=k_len, block_size_q=16, block_size_k=16, mass=0.0, sink_blocks=1)
    for r, (valid, diag, sink) in enumerate(ref.causal_block_sets(q_len, k_len, 16, 16, 1)):
        kept = index.block_index[0, 0, r, : index.block_count[0, 0, r]].tolist()
        assert set(kept) == diag | sink, (r, kept)


@PROPS
@given(cands=candidates(), max_count=st.integers(0, 10))
def test_keep_all_mass_with_max_count_is_a_top_k_budget(cands, max_count):
    """mass = 1 with a cap (an imported MInference budget) keeps forced + the max_count best others."""
    scores, valid, forced = cands
    capped = keep_by_cumulative_mass(scores, valid, forced, KEEP_ALL_MASS, max_count=max_count)
    top = keep_by_cumulative_mass(scores, valid, forced, 0.5, top_k=max_count)
    assert torch.equal(capped, top)


@PROPS
@given(cands=candidates(max_n=40), mass=MASSES | st.just(KEEP_ALL_MASS),
       max_count=st.none() | st.integers(0, 12))
def test_select_lines_equals_compacted_keep_mask(cands, mass, max_count):
    """The one-sort line selection of the vertical-slash pattern equals its naive twin (the keep mask,
    compacted), ties included: the integer scores repeat and hold exact zeros."""
    from sparseprefill.kernels.vertical_slash import select_lines, select_lines_naive

    scores, _, forced = cands
    count, index = select_lines(scores, forced, mass, max_count=max_count)
    expected_count, expected_index = select_lines_naive(scores, forced, mass, max_count=max_count)
    assert torch.equal(count, expected_count)
    assert count.dtype == index.dtype == torch.int32
    assert torch.equal(index, expected_index)


def test_select_lines_on_line_prefix_forced_and_long_rows():
    """The vertical-slash call shape: ``forced`` is a ``[N]`` prefix broadcast over ``[B, H, N]``."""
    from sparseprefill.kernels.vertical_slash import select_lines, select_lines_naive

    scores = torch.rand(2, 3, 5000, generator=torch.Generator().manual_seed(1)) ** 8
    forced = torch.arange(5000) < 64
    for mass, max_count in ((0.9, None), (0.5, 100), (KEEP_ALL_MASS, 300), (KEEP_ALL_MASS, None)):
        got = select_lines(scores, forced, mass, max_count=max_count)
        want = select_lines_naive(scores, forced, mass, max_count=max_count)
        assert all(torch.equal(a, b) for a, b in zip(got, want)), (mass, max_count)
        # Untrimmed (the GPU estimate's form, no host read): the same lines, padded with -1 to N slots.
        count, full = select_lines(scores, forced, mass, max_count=max_count, trim=False)
        assert torch.equal(count, want[0]) and full.shape[-1] == scores.shape[-1], (mass, max_count)
        width = want[1].shape[-1]
        assert torch.equal(full[..., :width], want[1]) and bool((full[..., width:] == -1).all()), (mass, max_count)


@pytest.mark.parametrize("masses,caps", [
    ((0.9, 0.9), (None, None)), ((0.95, 0.6), (None, 40)), ((KEEP_ALL_MASS, 0.8), (None, None)),
    ((KEEP_ALL_MASS, KEEP_ALL_MASS), (7, None)), ((0.5, KEEP_ALL_MASS), (3, 11)), ((0.0, 0.99), (None, 0)),
])
@pytest.mark.parametrize("trim", [True, False])
def test_select_line_kinds_equals_one_select_per_kind(masses, caps, trim):
    """Columns and diagonals selected in one batched pass (the vertical-slash estimate's call) equal two
    separate ``select_lines`` calls, each with its own forced prefix, mass and cap."""
    from sparseprefill.kernels.vertical_slash import select_line_kinds, select_lines

    g = torch.Generator().manual_seed(7)
    scores = torch.rand(2, 2, 3, 300, generator=g) ** 6
    scores[1, 0, 1, 50:80] = 0.0  # exact zeros and ties
    scores[0, 1, 2, 10:20] = 0.25
    lines = torch.arange(300)
    forced = torch.stack([lines < 4, lines < 33])[:, None, None, :]
    count, index = select_line_kinds(scores, forced, list(masses), list(caps), trim=trim)
    for kind in range(2):
        want_count, want_index = select_lines(scores[kind], forced[kind], masses[kind], caps[kind])
        assert torch.equal(count[kind], want_count), (kind, masses, caps)
        width = want_index.shape[-1]
        assert torch.equal(index[kind, ..., :width], want_index), (kind, masses, caps)
        assert bool((index[kind, ..., width:] == -1).all())
