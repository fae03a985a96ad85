"""Triton estimation kernels (antidiagonal block mass, pooled block probabilities) vs their fp32
``naive.py`` twins.

On the CPU the kernels run in Triton's interpreter on small shapes (fp32 and fp16 inputs, since the
interpreter gets bf16 arithmetic wrong); on the GPU machine the same tests run compiled, bf16
included, plus a hypothesis fuzz over random shapes (``SPARSEPREFILL_FUZZ_EXAMPLES`` cases per kernel,
default 1000, as in test_gpu_fuzz.py).
"""

from __future__ import annotations


import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

triton = pytest.importorskip("triton", reason="Triton is not importable on this machine")

from tests import reference  # noqa: E402
from sparseprefill.kernels.block_sparse import antidiagonal_block_mass  # noqa: E402
from sparseprefill.kernels.block_sparse.naive import antidiagonal_block_mass_naive  # noqa: E402
from sparseprefill.kernels.block_sparse.triton_antidiagonal import antidiagonal_block_mass_triton  # noqa: E402
from sparseprefill.kernels.block_sparse import pooled_block_probs  # noqa: E402
from sparseprefill.kernels.block_sparse.naive import pooled_block_probs_naive  # noqa: E402
from sparseprefill.kernels.block_sparse.triton_pooled import pooled_block_probs_triton  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
DTYPES = [torch.float32, torch.float16] + ([torch.bfloat16] if DEVICE == "cuda" else [])
# Relative error bounds (||out - ref|| / ||ref||). Both sides read the same input values and
# accumulate in fp32, so only summation order and exp2/tanh rounding differ (~1e-6): 1e-4 leaves room
# while any masking or indexing slip costs > 1e-2. The exception: fp32 inputs on the GPU, whose
# antidiagonal dots run in TF32 like the other kernels' (pooled scores always run in full fp32).
EXACT_TOL = 1e-4
AD_TOL = {torch.float32: EXACT_TOL if DEVICE == "cpu" else 1e-2, torch.float16: EXACT_TOL, torch.bfloat16: EXACT_TOL}

# (batch, q heads, kv heads, Lq, Lk, head_dim, stride, block, softcap): odd lengths (not multiples of
# the stride or the block), chunked (Lq < Lk), GQA 1/2/3, head dims 64/80/256, strides 1/4/8, blocks
# 16/32/48/64 (block / stride from 2 to 16, 12 not a power of two), soft-cap.
ANTIDIAGONAL_CASES = [
    (1, 2, 2, 61, 61, 64, 4, 16, None),
    (2, 4, 2, 77, 150, 80, 8, 32, None),
    (1, 3, 1, 203, 203, 64, 8, 64, 30.0),
    (1, 2, 1, 90, 131, 256, 4, 32, 5.0),
    (1, 1, 1, 300, 300, 64, 8, 16, None),  # block / stride = 2: 32 query blocks per program
    (1, 2, 2, 50, 99, 80, 4, 48, None),  # block / stride = 12 rows padded to 16 slots
    (1, 1, 1, 70, 70, 64, 1, 16, None),  # stride 1: the exact dense block mass
]
# (batch, q heads, kv heads, Lq, Lk, head_dim, block, softcap); the 1300-key case spans two key tiles.
POOLED_CASES = [
    (1, 2, 2, 61, 61, 64, 16, None),
    (2, 4, 2, 77, 150, 80, 32, None),
    (1, 3, 1, 203, 203, 256, 8, 30.0),
    (1, 2, 1, 90, 1300, 64, 16, 5.0),
    (1, 4, 2, 1, 100, 64, 64, None),  # decode: a single query
]


def _ids(case):
    return "B{}H{}/{}L{}x{}D{}".format(*case[:6]) + "-" + "-".join(map(str, case[6:]))


def _inputs(b, hq, hkv, lq, lk, d, dtype, seed, device=DEVICE):
    # A shared offset gives q and k a common direction, like real heads, so block means score unevenly.
    g = torch.Generator(device="cpu").manual_seed(seed)
    bias = torch.randn(d, generator=g) * 0.5
    q = (torch.randn(b, hq, lq, d, generator=g) * 1.5 + bias).to(device=device, dtype=dtype)
    k = (torch.randn(b, hkv, lk, d, generator=g) + bias).to(device=device, dtype=dtype)
    return q, k


def _rel_err(out, ref):
    assert out.shape == ref.shape and out.dtype == torch.float32
    assert torch.isfinite(out).all(), "non-finite output"
    return float((out - ref).norm() / ref.norm().clamp_min(1e-30))


def _kv_map(hq, hkv, device=DEVICE):
    return torch.arange(hq, device=device) // (hq // hkv)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("case", ANTIDIAGONAL_CASES, ids=_ids)
@pytest.mark.parametrize("sampled", [False, True], ids=["mean_logit", "sampled"])
@pytest.mark.parametrize("alternate", [False, True], ids=["fixed", "alternate"])
def test_antidiagonal_triton_matches_naive(case, dtype, alternate, sampled):
    b, hq, hkv, lq, lk, d, stride, block, softcap = case
    q, k = _inputs(b, hq, hkv, lq, lk, d, dtype, seed=ANTIDIAGONAL_CASES.index(case))
    kw = dict(scale=d**-0.5, stride=stride, block_size=block, softcap=softcap, kv_head_index=_kv_map(hq, hkv),
              alternate=alternate, sampled=sampled)
    ref = antidiagonal_block_mass_naive(q, k, **kw)
    out = antidiagonal_block_mass_triton(q, k, **kw)
    assert _rel_err(out, ref) < AD_TOL[dtype]
    # Blocks no query of the row can see must be exactly zero, not merely small.
    assert torch.equal(out[ref == 0], ref[ref == 0])


@pytest.mark.parametrize("sweeps", [1, 2])
@pytest.mark.parametrize("tiles", [(64, 64, 4), (128, 64, 8), (64, 128, 4), (128, 128, 8), (32, 32, 4)], ids=str)
def test_antidiagonal_tile_shapes_change_the_schedule_not_the_result(tiles, sweeps):
    """The launch's knobs (swept by experiments/antidiagonal_tiles.py): 700 queries at stride 4 and
    block 16 are 175 reshaped rows, several tiles of each shape, with a ragged last block."""
    tile_rows, tile_groups, warps = tiles
    q, k = _inputs(1, 4, 2, 700, 700, 64, torch.float16, seed=11)
    kw = dict(scale=0.125, stride=4, block_size=16, softcap=None, kv_head_index=_kv_map(4, 2))
    ref = antidiagonal_block_mass_naive(q, k, **kw)
    out = antidiagonal_block_mass_triton(q, k, **kw, tile_rows=tile_rows, tile_groups=tile_groups, num_warps=warps,
                                         sweeps=sweeps)
    assert _rel_err(out, ref) < AD_TOL[torch.float16]
    assert torch.equal(out[ref == 0], ref[ref == 0])


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("case", ANTIDIAGONAL_CASES, ids=_ids)
def test_antidiagonal_one_sweep_matches_naive_one_head_per_launch(case, dtype, monkeypatch):
    """The one-sweep variant on every case (rows alternating), with its scratch cap forcing one head per
    launch (so the launch-local scratch rows and the head offset are both exercised)."""
    from sparseprefill.kernels.block_sparse import triton_antidiagonal as ad_triton

    monkeypatch.setattr(ad_triton, "ONE_SWEEP_SCRATCH_BYTES", 1)
    b, hq, hkv, lq, lk, d, stride, block, softcap = case
    q, k = _inputs(b, hq, hkv, lq, lk, d, dtype, seed=ANTIDIAGONAL_CASES.index(case))
    kw = dict(scale=d**-0.5, stride=stride, block_size=block, softcap=softcap, kv_head_index=_kv_map(hq, hkv),
              alternate=True)
    ref = antidiagonal_block_mass_naive(q, k, **kw)
    out = antidiagonal_block_mass_triton(q, k, **kw, sweeps=1)
    assert _rel_err(out, ref) < AD_TOL[dtype]
    assert torch.equal(out[ref == 0], ref[ref == 0])


def test_antidiagonal_sweeps_other_than_one_or_two_are_refused():
    q, k = _inputs(1, 1, 1, 32, 32, 64, torch.float16, seed=0)
    kw = dict(scale=0.1, stride=4, block_size=16, softcap=None, kv_head_index=_kv_map(1, 1))
    with pytest.raises(ValueError, match="sweeps must be 1 or 2, got 3"):
        antidiagonal_block_mass_triton(q, k, **kw, sweeps=3)
    with pytest.raises(ValueError, match="sampled scoring runs in one sweep only"):
        antidiagonal_block_mass_triton(q, k, **kw, sweeps=2, sampled=True)


@pytest.mark.parametrize("tiles", [(64, 128, 4), (128, 64, 8), (32, 32, 4)], ids=str)
def test_antidiagonal_sampled_tile_shapes_and_head_groups(tiles, monkeypatch):
    """The sampled scoring under other tiles, one head per launch (scratch cap), a chunk (Lq < Lk) with
    ragged ends and soft-cap."""
    from sparseprefill.kernels.block_sparse import triton_antidiagonal as ad_triton

    monkeypatch.setattr(ad_triton, "ONE_SWEEP_SCRATCH_BYTES", 1)
    tile_rows, tile_groups, warps = tiles
    q, k = _inputs(1, 4, 2, 301, 650, 64, torch.float16, seed=12)
    kw = dict(scale=0.125, stride=4, block_size=16, softcap=20.0, kv_head_index=_kv_map(4, 2), sampled=True)
    ref = antidiagonal_block_mass_naive(q, k, **kw)
    out = antidiagonal_block_mass_triton(q, k, **kw, tile_rows=tile_rows, tile_groups=tile_groups, num_warps=warps)
    assert _rel_err(out, ref) < AD_TOL[torch.float16]
    assert torch.equal(out[ref == 0], ref[ref == 0])


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("case", POOLED_CASES, ids=_ids)
def test_pooled_triton_matches_naive(case, dtype):
    b, hq, hkv, lq, lk, d, block, softcap = case
    q, k = _inputs(b, hq, hkv, lq, lk, d, dtype, seed=100 + POOLED_CASES.index(case))
    kw = dict(scale=d**-0.5, block_size=block, softcap=softcap, kv_head_index=_kv_map(hq, hkv))
    ref = pooled_block_probs_naive(q, k, **kw)
    out = pooled_block_probs_triton(q, k, **kw)
    assert _rel_err(out, ref) < EXACT_TOL
    assert torch.equal(out[ref == 0], ref[ref == 0])


def test_triton_estimators_custom_kv_head_index_and_strided_views():
    """A non-monotone head map and q/k as transposed views of ``[B, L, H, D]`` buffers (HF's layout
    before its transpose): the kernels index through strides and the map, never assuming either."""
    q, k = _inputs(1, 3, 2, 70, 90, 64, torch.float16, seed=7)
    q = q.transpose(1, 2).contiguous().transpose(1, 2)  # [B, Hq, Lq, D] view of a [B, Lq, Hq, D] buffer
    k = k.transpose(1, 2).contiguous().transpose(1, 2)
    assert q.stride(2) == 3 * 64 and k.stride(2) == 2 * 64
    kv_head_index = torch.tensor([1, 0, 0], device=DEVICE)
    ad = dict(scale=0.125, stride=4, block_size=16, softcap=None, kv_head_index=kv_head_index)
    assert _rel_err(antidiagonal_block_mass_triton(q, k, **ad), antidiagonal_block_mass_naive(q, k, **ad)) < EXACT_TOL
    pb = dict(scale=0.125, block_size=16, softcap=None, kv_head_index=kv_head_index)
    assert _rel_err(pooled_block_probs_triton(q, k, **pb), pooled_block_probs_naive(q, k, **pb)) < EXACT_TOL


@pytest.mark.skipif(DEVICE != "cuda", reason="the public ops dispatch to Triton only on CUDA")
def test_public_ops_dispatch_to_triton_on_cuda(monkeypatch):
    from sparseprefill.kernels.block_sparse import triton_antidiagonal as ad_triton
    from sparseprefill.kernels.block_sparse import triton_pooled as pb_triton

    calls = []
    monkeypatch.setattr(ad_triton, "antidiagonal_block_mass_triton",
                        lambda *a, **kw: calls.append("ad") or antidiagonal_block_mass_naive(*a, **kw))
    monkeypatch.setattr(pb_triton, "pooled_block_probs_triton",
                        lambda *a, **kw: calls.append("pb") or pooled_block_probs_naive(*a, **kw))
    q, k = _inputs(1, 2, 1, 40, 40, 64, torch.float16, seed=3)
    antidiagonal_block_mass(q, k, scale=0.125, stride=4, block_size=16)
    pooled_block_probs(q, k, scale=0.125, block_size=16)
    assert calls == ["ad", "pb"]


# ------------------------------------------------------------------------------------------------
# GPU fuzz (compiled kernels only: the interpreter would take hours for this many cases)

EXAMPLES = reference.FUZZ_EXAMPLES
FUZZ = reference.gpu_fuzz
COUNTS = {"antidiagonal": 0, "pooled": 0}
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


@st.composite
def estimator_shapes(draw):
    kv_heads = draw(st.sampled_from([1, 2, 4]))
    group = draw(st.sampled_from([1, 2, 3, 4, 7]))
    head_dim = draw(st.sampled_from([64, 80, 96, 128, 256]))
    k_len = draw(st.integers(1, 1500))
    q_len = draw(st.one_of(st.just(k_len), st.integers(1, k_len)))
    stride = draw(st.sampled_from([1, 2, 4, 8, 16]))
    block = stride * draw(st.sampled_from([1, 2, 4, 8, 16, 3, 12]))
    dtype = draw(st.sampled_from([torch.bfloat16, torch.float16, torch.float32]))
    softcap = draw(st.one_of(st.none(), st.sampled_from([5.0, 30.0])))
    batch = draw(st.sampled_from([1, 2]))
    seed = draw(st.integers(0, 2**31 - 1))
    return batch, kv_heads * group, kv_heads, q_len, k_len, head_dim, stride, block, dtype, softcap, seed


@pytest.mark.gpu
@needs_cuda
@FUZZ
@given(estimator_shapes())
def test_antidiagonal_fuzz(shape):
    b, hq, hkv, lq, lk, d, stride, block, dtype, softcap, seed = shape
    q, k = _inputs(b, hq, hkv, lq, lk, d, dtype, seed, device="cuda")
    kw = dict(scale=d**-0.5, stride=stride, block_size=block, softcap=softcap, kv_head_index=_kv_map(hq, hkv, "cuda"))
    kw["alternate"] = bool(seed % 2)  # the seed is random: half the cases alternate
    ref = antidiagonal_block_mass_naive(q, k, **kw)
    for sweeps in (1, 2):  # both schedules on every case: each may become the launch default
        assert _rel_err(antidiagonal_block_mass_triton(q, k, **kw, sweeps=sweeps), ref) < AD_TOL[dtype], sweeps
    sampled_ref = antidiagonal_block_mass_naive(q, k, **kw, sampled=True)
    assert _rel_err(antidiagonal_block_mass_triton(q, k, **kw, sampled=True), sampled_ref) < AD_TOL[dtype], "sampled"
    COUNTS["antidiagonal"] += 1
    reference.fuzz_progress("antidiagonal", COUNTS["antidiagonal"])


@pytest.mark.gpu
@needs_cuda
@FUZZ
@given(estimator_shapes())
def test_pooled_fuzz(shape):
    b, hq, hkv, lq, lk, d, _, block, dtype, softcap, seed = shape
    q, k = _inputs(b, hq, hkv, lq, lk, d, dtype, seed, device="cuda")
    kw = dict(scale=d**-0.5, block_size=block, softcap=softcap, kv_head_index=_kv_map(hq, hkv, "cuda"))
    ref = pooled_block_probs_naive(q, k, **kw)
    assert _rel_err(pooled_block_probs_triton(q, k, **kw), ref) < EXACT_TOL
    COUNTS["pooled"] += 1


@pytest.mark.gpu
@needs_cuda
def test_estimator_fuzz_ran_the_requested_number_of_cases(request):
    # Runs after the fuzz tests (file order); Hypothesis may stop early if it exhausts distinct examples.
    # Only the fuzzes selected in this session (``-k``) are held to the count; a selected one that ran
    # no case fails.
    selected = {name for name in COUNTS if any(item.name == f"test_{name}_fuzz" for item in request.session.items)}
    print(f"\nestimator fuzz cases run: {COUNTS} (selected: {sorted(selected)})")
    assert selected, "no estimator fuzz was selected"
    assert all(COUNTS[name] >= min(EXAMPLES, 500) for name in selected), COUNTS


# ------------------------------------------------------------------------------------------------
# Vertical / slash line scores (MInference's last-queries estimate). Pass 2 sums each key tile's
# diagonals in registers (a skewing tl.gather) before one atomic per diagonal, so the cases cover
# every row padding (ROWS 16/32/64/128 for 1/20/64/100 voting rows), both key tiles (64 keys, and
# 32 for head_dim 256), the tile that straddles the causal edge, a partial last tile, chunked
# prefill (Lq < Lk: the diagonals start at Lk - Lq), decode, GQA and soft-cap.

from sparseprefill.kernels.vertical_slash.naive import vertical_slash_scores_naive  # noqa: E402
from sparseprefill.kernels.vertical_slash.triton_estimate import vertical_slash_scores_triton  # noqa: E402

# (batch, q heads, kv heads, Lq, Lk, head_dim, last_queries, softcap)
LINE_SCORE_CASES = [
    (1, 2, 2, 61, 61, 64, 64, None),  # last_queries > Lq: every row votes
    (2, 4, 2, 77, 150, 128, 64, None),
    (1, 3, 1, 203, 203, 128, 20, 30.0),
    (1, 2, 1, 90, 131, 256, 64, 5.0),
    (1, 4, 2, 1, 100, 64, 64, None),  # decode: one row on diagonals Lk - 1 - j
    (1, 2, 2, 130, 333, 64, 100, None),  # 128 padded rows, odd tail tile
    (1, 1, 1, 40, 300, 128, 1, None),  # a single voting row
]
# Line scores take their dots in full fp32 for fp32 inputs (triton_common.exact_dot), unlike the
# antidiagonal estimate's TF32.
LINE_TOL = {torch.float32: EXACT_TOL, torch.float16: EXACT_TOL, torch.bfloat16: EXACT_TOL}


def _line_ids(case):
    return "B{}H{}/{}L{}x{}D{}".format(*case[:6]) + "-n{}-{}".format(*case[6:])


def _check_line_scores(b, hq, hkv, lq, lk, d, last_queries, softcap, dtype, seed, device=DEVICE, windows=1):
    q, k = _inputs(b, hq, hkv, lq, lk, d, dtype, seed, device=device)
    kw = dict(scale=d**-0.5, last_queries=last_queries, softcap=softcap, kv_head_index=_kv_map(hq, hkv, device),
              query_windows=windows)
    ref_v, ref_s = vertical_slash_scores_naive(q, k, **kw)
    out_v, out_s = vertical_slash_scores_triton(q, k, **kw)
    assert _rel_err(out_v, ref_v) < LINE_TOL[dtype], "vertical"
    assert _rel_err(out_s, ref_s) < LINE_TOL[dtype], "slash"
    # Each is a mean of softmax rows: it sums to 1 over the keys (a lost or doubled diagonal would not).
    ones = torch.ones(b, hq, device=device)
    torch.testing.assert_close(out_v.sum(-1), ones, atol=1e-4, rtol=0)
    torch.testing.assert_close(out_s.sum(-1), ones, atol=1e-4, rtol=0)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("case", LINE_SCORE_CASES, ids=_line_ids)
def test_line_scores_triton_matches_naive(case, dtype):
    _check_line_scores(*case, dtype=dtype, seed=300 + LINE_SCORE_CASES.index(case))


# (batch, q heads, kv heads, Lq, Lk, head_dim, last_queries, softcap, windows): one launch set scores
# every window; the reference scores each window on its key prefix and averages.
WINDOW_CASES = [
    (1, 4, 2, 301, 301, 64, 32, None, 3),
    (2, 3, 1, 250, 400, 128, 40, 30.0, 4),  # chunked, soft-capped; windows of 40 rows (64 lanes)
    (1, 2, 2, 97, 97, 64, 64, None, 4),  # room for one window only
    (1, 2, 1, 1000, 1000, 256, 16, None, 16),  # many windows, head_dim 256 (32-key tiles)
    (1, 7, 1, 129, 200, 80, 64, None, 2),  # padded head_dim, Lq not a multiple of the windows
]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("case", WINDOW_CASES, ids=lambda c: _line_ids(c[:8]) + f"-w{c[8]}")
def test_spread_window_line_scores_triton_match_naive(case, dtype):
    *shape, windows = case
    _check_line_scores(*shape, dtype=dtype, seed=700 + WINDOW_CASES.index(case), windows=windows)


def test_line_scores_slash_of_a_single_row_is_its_probabilities_reversed():
    """One voting row at position Lk - 1 puts key j on diagonal Lk - 1 - j: slash is vertical flipped,
    exactly (each diagonal receives one probability, from one tile)."""
    q, k = _inputs(1, 2, 1, 50, 200, 64, torch.float32, seed=7)
    kw = dict(scale=0.125, last_queries=1, softcap=None, kv_head_index=_kv_map(2, 1))
    vertical, slash = vertical_slash_scores_triton(q, k, **kw)
    assert torch.equal(slash, vertical.flip(-1))


LINE_COUNT = {"line_scores": 0}


@pytest.mark.gpu
@needs_cuda
@FUZZ
@given(estimator_shapes(), st.sampled_from([1, 7, 16, 20, 64, 100]), st.sampled_from([1, 2, 4, 7]))
def test_line_scores_fuzz(shape, last_queries, windows):
    b, hq, hkv, lq, lk, d, _, _, dtype, softcap, seed = shape
    _check_line_scores(b, hq, hkv, lq, lk, d, last_queries, softcap, dtype, seed, device="cuda", windows=windows)
    LINE_COUNT["line_scores"] += 1


@pytest.mark.gpu
@needs_cuda
def test_line_scores_fuzz_ran_the_requested_number_of_cases():
    print(f"\nline scores fuzz cases run: {LINE_COUNT}")
    assert LINE_COUNT["line_scores"] >= min(EXAMPLES, 500), LINE_COUNT
