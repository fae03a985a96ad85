"""The Triton line selection (``vertical_slash/triton_select.py``) against its naive twin
(``select_lines_naive``: the keep mask of ``keep_by_cumulative_mass``, compacted) and the torch
``select_line_kinds``: exact on integer scores (every fp32 sum exact, ties and zeros included), and on
random real scores up to the one line whose preceding mass lies within fp32 rounding of the target
(the kernel sums in another order than ``torch.cumsum``). CPU interpreter and GPU."""

from __future__ import annotations

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

triton = pytest.importorskip("triton", reason="Triton is not importable on this machine")

from tests import reference  # noqa: E402
from sparseprefill.kernels.mass_select import KEEP_ALL_MASS  # noqa: E402
from sparseprefill.kernels.vertical_slash import select_line_kinds, select_lines_naive  # noqa: E402
from sparseprefill.kernels.vertical_slash.triton_select import select_line_kinds_triton  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
PROPS = settings(max_examples=60, deadline=None, derandomize=True, database=None,
                 suppress_health_check=[HealthCheck.too_slow])
BOUNDARY_REL_TOL = 1e-5  # fp32 prefix sums of up to ~1e5 terms, in two summation orders


@st.composite
def integer_rows(draw):
    """``[K, R, N]`` integer scores (exact zeros and repeats), a forced mask per kind, masses and caps."""
    kinds, rows, n = draw(st.integers(1, 2)), draw(st.integers(1, 3)), draw(st.integers(1, 60))
    scores = torch.tensor(draw(st.lists(st.integers(0, 40), min_size=kinds * rows * n, max_size=kinds * rows * n)),
                          dtype=torch.float32).view(kinds, rows, n)
    forced = torch.tensor(draw(st.lists(st.booleans(), min_size=kinds * n, max_size=kinds * n))).view(kinds, 1, n)
    mass = st.sampled_from([0.0, 0.3, 0.5, 0.9, 0.95, 0.999999, KEEP_ALL_MASS])
    cap = st.none() | st.integers(0, 20)
    return scores, forced, [draw(mass) for _ in range(kinds)], [draw(cap) for _ in range(kinds)]


METHODS = ["sort", "search"]


@pytest.mark.parametrize("method", METHODS)
@PROPS
@given(case=integer_rows())
def test_triton_selection_equals_the_naive_twin_on_exact_sums(method, case):
    scores, forced, masses, caps = case
    count, index = select_line_kinds_triton(scores.to(DEVICE), forced.to(DEVICE), masses, caps, KEEP_ALL_MASS,
                                            method=method)
    assert count.dtype == index.dtype == torch.int32 and index.shape == scores.shape
    for kind in range(scores.shape[0]):
        want_count, want_index = select_lines_naive(scores[kind], forced[kind], masses[kind], caps[kind])
        assert torch.equal(count[kind].cpu(), want_count), (kind, masses, caps)
        width = want_index.shape[-1]
        got = index[kind].cpu()
        assert torch.equal(got[..., :width][want_index >= 0], want_index[want_index >= 0])
        slots = torch.arange(scores.shape[-1])
        assert bool((got[slots >= want_count[..., None]] == -1).all()), "slots past the count must be -1"


def _assert_same_up_to_the_boundary_line(scores, forced, mass, got_count, got_index, want_count, want_index):
    """Per row: the same lines, or one line more or less where that line's preceding mass (fp64, in
    the rule's order) is within ``BOUNDARY_REL_TOL`` of the target."""
    for row in range(scores.shape[0]):
        a, b = int(got_count[row]), int(want_count[row])
        got, want = got_index[row, :a].tolist(), want_index[row, :b].tolist()
        if a == b:
            assert got == want, row
            continue
        assert abs(a - b) == 1, (row, a, b)
        extra = set(got) ^ set(want)
        assert len(extra) == 1 and set(got) - extra == set(want) - extra, row
        line = extra.pop()
        s = scores[row].double().clamp_min(0)
        key = torch.where(forced[row], float("inf"), s)
        order = torch.sort(key, descending=True, stable=True).indices.tolist()
        before = float(s[order[: order.index(line)]].sum())
        target = mass * float(s.sum())
        assert abs(before - target) <= BOUNDARY_REL_TOL * float(s.sum()), (row, before, target)


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("n", [1, 70, 2048, 5000])
def test_triton_selection_on_the_estimate_call_shape(n, method):
    """Columns and diagonals at once (``[2, B, H, N]``, forced prefixes), real scores with ties and zeros,
    against the torch path."""
    g = torch.Generator().manual_seed(n)
    scores = torch.rand(2, 2, 3, n, generator=g) ** 8
    scores[1, 0, 1, n // 3: n // 2] = 0.0
    scores[0, 1, 2, : n // 4] = 0.25
    lines = torch.arange(n)
    forced = torch.stack([lines < 4, lines < 33])[:, None, None, :]
    for masses, caps in (((0.95, 0.9), (None, None)), ((0.8, KEEP_ALL_MASS), (n // 10, None)),
                         ((KEEP_ALL_MASS, 0.5), (None, 7))):
        count, index = select_line_kinds_triton(scores.to(DEVICE), forced.to(DEVICE), list(masses), list(caps),
                                                KEEP_ALL_MASS, method=method)
        want_count, want_index = select_line_kinds(scores, forced, list(masses), list(caps), trim=False)
        for kind in range(2):
            _assert_same_up_to_the_boundary_line(
                scores[kind].flatten(0, -2), forced[kind].expand_as(scores[kind]).flatten(0, -2), masses[kind],
                count[kind].flatten().cpu(), index[kind].flatten(0, -2).cpu(),
                want_count[kind].flatten(), want_index[kind].flatten(0, -2))
        assert bool((index.cpu()[torch.arange(n) >= count.cpu()[..., None]] == -1).all())


@pytest.mark.skipif(DEVICE != "cuda", reason="the dispatch to the kernel happens on CUDA")
def test_select_line_kinds_takes_the_kernel_on_cuda_and_trims_like_the_torch_path():
    g = torch.Generator().manual_seed(3)
    scores = torch.randint(0, 30, (2, 1, 4, 900), generator=g).float()
    forced = torch.stack([torch.arange(900) < 2, torch.arange(900) < 16])[:, None, None, :]
    got = select_line_kinds(scores.cuda(), forced.cuda(), [0.9, 0.8], [None, 50], trim=True)
    want = select_line_kinds(scores, forced, [0.9, 0.8], [None, 50], trim=True)
    assert torch.equal(got[0].cpu(), want[0]) and torch.equal(got[1].cpu(), want[1])


FUZZ_COUNT = {"select": 0}
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


@pytest.mark.gpu
@needs_cuda
@reference.gpu_fuzz
@given(n=st.integers(1, 9000), rows=st.integers(1, 6), forced_lines=st.integers(0, 64), exact=st.booleans(),
       mass=st.sampled_from([0.0, 0.5, 0.8, 0.9, 0.95, 0.98, KEEP_ALL_MASS]), cap=st.none() | st.integers(0, 3000),
       seed=st.integers(0, 2**31 - 1), method=st.sampled_from(METHODS))
def test_triton_selection_fuzz(n, rows, forced_lines, exact, mass, cap, seed, method):
    """Random widths, forced prefixes, masses and caps on the GPU: integer scores must match the naive
    twin exactly; real scores up to the boundary line."""
    g = torch.Generator().manual_seed(seed)
    scores = torch.randint(0, 50, (1, rows, n), generator=g).float() if exact else torch.rand(1, rows, n, generator=g) ** 6
    forced = (torch.arange(n) < forced_lines)[None, None, :]
    count, index = select_line_kinds_triton(scores.cuda(), forced.cuda(), [mass], [cap], KEEP_ALL_MASS, method=method)
    want_count, want_index = select_lines_naive(scores[0], forced[0], mass, cap)
    if exact:
        assert torch.equal(count[0].cpu(), want_count)
        assert torch.equal(index[0, :, :want_index.shape[-1]].cpu()[want_index >= 0], want_index[want_index >= 0])
    else:
        _assert_same_up_to_the_boundary_line(scores[0], forced[0].expand(rows, n), mass, count[0].cpu(),
                                             index[0].cpu(), want_count, want_index)
    assert bool((index[0].cpu()[torch.arange(n) >= count[0].cpu()[..., None]] == -1).all())
    FUZZ_COUNT["select"] += 1
    FUZZ_COUNT[method] = FUZZ_COUNT.get(method, 0) + 1


@pytest.mark.gpu
@needs_cuda
def test_triton_selection_fuzz_ran_the_requested_number_of_cases():
    print(f"\nselection fuzz cases run: {FUZZ_COUNT}")
    assert FUZZ_COUNT["select"] >= min(reference.FUZZ_EXAMPLES, 500), FUZZ_COUNT
