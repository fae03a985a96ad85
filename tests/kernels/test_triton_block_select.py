"""Triton block selection (``select_blocks_triton``: a threshold search instead of a sort) vs its
sorting reference ``select_blocks_naive``.

On the CPU the kernel runs in Triton's interpreter; on the GPU machine the same tests run compiled,
plus a hypothesis fuzz (``SPARSEPREFILL_FUZZ_EXAMPLES`` cases, default 1000, ``-m gpu``).
"""

from __future__ import annotations

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

triton = pytest.importorskip("triton", reason="Triton is not importable on this machine")

from tests import reference  # noqa: E402
from sparseprefill.kernels.block_sparse import select_blocks  # noqa: E402
from sparseprefill.kernels.block_sparse.naive import select_blocks_naive  # noqa: E402
from sparseprefill.kernels.block_sparse.triton_select import select_blocks_triton  # noqa: E402
from sparseprefill.kernels.geometry import causal_block_layout  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
MASSES = [0.0, 0.1, 0.5, 0.9, 0.95, 0.98, 0.999999]
CPU_EXAMPLES = 60
FUZZ_CASES = [0]
# Where fp32 sums in tree order and in sorted-cumsum order may decide a boundary block differently: its
# mass-before within this share of the row total from the target (rounding is ~1e-7 of the total).
BOUNDARY_SLACK = 1e-5


def _lists(index) -> list:
    """Per row, the kept blocks and the padding: ``[(kept ids, padding slots), ...]`` over [B, H, Rq]."""
    counts, ids = index.block_count.flatten().tolist(), index.block_index.flatten(0, 2).tolist()
    return [(row[:n], row[n:]) for n, row in zip(counts, ids)]


def _grid(q_len, k_len, bq, bk):
    return -(-q_len // bq), -(-k_len // bk)


def _check_equal(scores, q_len, k_len, bq, bk, mass, sink, exact: bool, local: int = 0):
    got = select_blocks_triton(scores, q_len=q_len, k_len=k_len, block_size_q=bq, block_size_k=bk, mass=mass,
                               sink_blocks=sink, local_blocks=local)
    want = select_blocks_naive(scores.float().cpu(), q_len=q_len, k_len=k_len, block_size_q=bq, block_size_k=bk,
                               mass=mass, sink_blocks=sink, local_blocks=local)
    rq, rk = _grid(q_len, k_len, bq, bk)
    assert got.block_index.shape == (*scores.shape[:2], rq, rk), "lists must span the full row"
    assert (got.q_len, got.k_len, got.block_size_q, got.block_size_k) == (q_len, k_len, bq, bk)
    valid, forced = causal_block_layout(q_len, k_len, bq, bk, sink, "cpu", local)
    flat = scores.float().cpu().clamp_min(0).flatten(0, 2)
    for row, ((kept, pad), (ref, _)) in enumerate(zip(_lists(got), _lists(want))):
        where = f"row {row} (block {row % rq}), mass {mass}, sink {sink}, local {local}: kernel kept {kept}, reference {ref}"
        assert all(p == -1 for p in pad), f"padding must be -1; {where}"
        if kept == ref:
            continue
        assert not exact, f"exactly representable scores must decide identically; {where}"
        # Allowed only at the boundary: every block on which they differ has its reference mass-before
        # within rounding of the target.
        r = row % rq
        s = torch.where(valid[r], flat[row], 0.0).double()
        free = valid[r] & ~forced[r]
        order = sorted((c for c in range(rk) if free[c]), key=lambda c: (-float(s[c]), c))
        before = float(s[forced[r] & valid[r]].sum())
        total, target = float(s.sum()), mass * float(s.sum())
        mass_before = {}
        for c in order:
            mass_before[c] = before
            before += float(s[c])
        for c in set(kept) ^ set(ref):
            assert c in mass_before and abs(mass_before[c] - target) <= BOUNDARY_SLACK * max(total, 1e-30), where


@st.composite
def selection_cases(draw, max_len: int = 300):
    k_len = draw(st.integers(1, max_len))
    q_len = max(1, round(draw(st.floats(0, 1)) * k_len))
    bq, bk = draw(st.sampled_from([8, 16, 32, 64])), draw(st.sampled_from([8, 16, 32, 64]))
    heads = draw(st.integers(1, 3))
    sink = draw(st.integers(0, 3))
    mass = draw(st.sampled_from(MASSES))
    kind = draw(st.sampled_from(["exact", "softmax", "spiky"]))
    seed = draw(st.integers(0, 2**31 - 1))
    local = draw(st.sampled_from([0, 0, 1, 4]))
    return q_len, k_len, bq, bk, heads, sink, mass, kind, seed, local


def _scores(case, device=DEVICE):
    q_len, k_len, bq, bk, heads, _, _, kind, seed, _ = case
    rq, rk = _grid(q_len, k_len, bq, bk)
    gen = torch.Generator().manual_seed(seed)
    if kind == "exact":  # small multiples of 1/64 with many ties and zeros: fp32 sums are exact
        scores = torch.randint(0, 12, (1, heads, rq, rk), generator=gen).float() / 64
    else:
        logits = torch.randn(1, heads, rq, rk, generator=gen) * (6.0 if kind == "spiky" else 1.5)
        scores = torch.softmax(logits, -1)
    return scores.to(device)


@settings(max_examples=CPU_EXAMPLES, deadline=None, derandomize=True, database=None,
          suppress_health_check=[HealthCheck.too_slow])
@given(case=selection_cases())
def test_triton_select_equals_sorting_reference(case):
    q_len, k_len, bq, bk, _, sink, mass, kind, _, local = case
    _check_equal(_scores(case), q_len, k_len, bq, bk, mass, sink, exact=kind == "exact", local=local)


@pytest.mark.parametrize("mass", [0.9, 0.95])
def test_triton_select_long_row_and_strided_bf16_scores(mass):
    """Rows of 300 key blocks (a 512-wide register row) for a last chunk of 3 query blocks (queries
    offset against the keys), scores read through strides, and bf16 scores."""
    k_len, q_len = 300 * 16, 3 * 16 - 5
    rq, rk = 3, 300
    gen = torch.Generator().manual_seed(7)
    base = torch.softmax(torch.randn(1, rk, 2, rq, generator=gen) * 3, 1)  # [B, Rk, H, Rq]
    scores = base.permute(0, 2, 3, 1)  # [B, H, Rq, Rk], non-contiguous
    _check_equal(scores.to(DEVICE), q_len, k_len, 16, 16, mass, 1, exact=False)
    exact = (torch.randint(0, 8, (1, 2, rq, rk), generator=gen).float() / 8).to(torch.bfloat16)
    _check_equal(exact.to(DEVICE), q_len, k_len, 16, 16, mass, 1, exact=True)


def test_triton_select_ties_and_zero_rows():
    """All-equal rows keep a stable prefix of the ties (lowest block ids first); all-zero rows keep only
    the forced blocks (a zero target is met before any other block)."""
    q_len = k_len = 160
    equal = torch.full((1, 1, 10, 10), 0.125, device=DEVICE)
    _check_equal(equal, q_len, k_len, 16, 16, 0.5, 1, exact=True)
    zeros = torch.zeros(1, 1, 10, 10, device=DEVICE)
    for mass in (0.0, 0.5):
        _check_equal(zeros, q_len, k_len, 16, 16, mass, 1, exact=True)


def test_select_blocks_dispatch_and_refusals():
    scores = torch.rand(1, 1, 4, 4, device=DEVICE)
    with pytest.raises(ValueError, match="block grid"):
        select_blocks(scores, q_len=64, k_len=64, block_size_q=32, block_size_k=32, mass=0.9)
    index = select_blocks(scores, q_len=64, k_len=64, block_size_q=16, block_size_k=16, mass=0.9)
    width = index.block_index.shape[-1]
    # CUDA's mass rule runs the kernel (full-width lists); elsewhere the reference (trimmed lists).
    assert width == 4 if DEVICE == "cuda" else width == int(index.block_count.max())


@pytest.mark.gpu
@pytest.mark.skipif(DEVICE != "cuda", reason="the fuzz runs compiled, on the GPU")
@reference.gpu_fuzz
@given(case=selection_cases(max_len=8000))
def test_triton_select_fuzz(case):
    q_len, k_len, bq, bk, _, sink, mass, kind, _, local = case
    _check_equal(_scores(case), q_len, k_len, bq, bk, mass, sink, exact=kind == "exact", local=local)
    FUZZ_CASES[0] += 1
    reference.fuzz_progress("block selection", FUZZ_CASES[0])


@pytest.mark.gpu
@pytest.mark.skipif(DEVICE != "cuda", reason="the fuzz runs compiled, on the GPU")
def test_triton_select_fuzz_ran_the_requested_number_of_cases():
    print(f"\nblock selection fuzz cases run: {FUZZ_CASES[0]}")
    assert FUZZ_CASES[0] >= min(reference.FUZZ_EXAMPLES, 500), FUZZ_CASES
