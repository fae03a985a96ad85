"""The Triton line bound (``vertical_slash/triton_lines_bound.py``) against its torch twin
(``VerticalSlashLines.pairs_lower_bound_torch``, itself checked against brute force and the index in
``test_index.py``): exact, on random ascending lines with repeats, padding and lines past the keys, odd
lengths, chunked queries, several block sizes and more lines than one tile. CPU interpreter and GPU."""

from __future__ import annotations

import random

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

pytest.importorskip("triton", reason="Triton is not importable on this machine")

from tests import reference  # noqa: E402
from sparseprefill.kernels.vertical_slash import vertical_slash_lines  # noqa: E402
from sparseprefill.kernels.vertical_slash.triton_lines_bound import (  # noqa: E402
    BOUND_TILE,
    lines_pairs_lower_bound_triton,
)

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
PROPS = settings(max_examples=40, deadline=None, derandomize=True, database=None,
                 suppress_health_check=[HealthCheck.too_slow])


def ascending_lines(rng: random.Random, rows: int, k_len: int, slots: int, most: int):
    """``[1, rows, slots]`` int32 lines, ascending in their count (repeats and values past ``k_len``
    allowed), padding -1, and the counts."""
    lines = torch.full((1, rows, slots), -1, dtype=torch.int32)
    count = torch.zeros(1, rows, dtype=torch.int32)
    for r in range(rows):
        n = rng.randint(0, min(most, slots))
        values = sorted(rng.choice(range(k_len + 3)) if rng.random() < 0.1 else rng.randrange(k_len)
                        for _ in range(n))
        if rng.random() < 0.5:  # a dense local band, as the estimate keeps
            values = sorted(set(values) | set(range(min(n, k_len))))[:n]
            n = len(values)  # the set drops repeats: fewer lines than drawn
        lines[0, r, :n] = torch.tensor(values, dtype=torch.int32)
        count[0, r] = n
    return lines, count


def check(k_len, q_len, block, slots, most, seed):
    rng = random.Random(seed)
    slashes, slash_count = ascending_lines(rng, 3, k_len, slots, most)
    verticals, vertical_count = ascending_lines(rng, 3, k_len, slots, most)
    lines = vertical_slash_lines(verticals, vertical_count, slashes, slash_count, q_len=q_len, k_len=k_len,
                                 block_size_q=block)
    expected = lines.pairs_lower_bound_torch(lines_sorted=True)
    out = lines_pairs_lower_bound_triton(*(t.to(DEVICE) for t in (slashes, slash_count, verticals, vertical_count)),
                                         q_len=q_len, k_len=k_len, block_size_q=block)
    assert torch.equal(out.cpu(), expected), (out, expected)


@PROPS
@given(k_len=st.integers(1, 300), q_frac=st.floats(0.0, 1.0), block=st.sampled_from([16, 32, 64]),
       seed=st.integers(0, 2**16))
def test_triton_line_bound_equals_the_torch_twin(k_len, q_frac, block, seed):
    q_len = max(1, round(q_frac * k_len))
    check(k_len, q_len, block, slots=k_len + 2, most=k_len, seed=seed)


@pytest.mark.parametrize("k_len,q_len,block", [(3 * BOUND_TILE // 2, 3 * BOUND_TILE // 2, 64),
                                                (2 * BOUND_TILE + 5, BOUND_TILE + 7, 16)])
def test_triton_line_bound_carries_runs_across_tiles(k_len, q_len, block):
    """More real lines than one tile: a run that spans a tile boundary keeps its first diagonal."""
    check(k_len, q_len, block, slots=k_len, most=k_len, seed=k_len)


FUZZ_COUNT = {"bound": 0}
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


@pytest.mark.gpu
@needs_cuda
@reference.gpu_fuzz
@given(k_len=st.integers(1, 6000), q_frac=st.floats(0.0, 1.0), block=st.sampled_from([16, 32, 64, 128]),
       most=st.integers(0, 6000), seed=st.integers(0, 2**31 - 1))
def test_triton_line_bound_fuzz(k_len, q_frac, block, most, seed):
    """Random lengths, blocks and line counts up to several tiles on the GPU: the kernel equals its
    torch twin exactly."""
    check(k_len, max(1, round(q_frac * k_len)), block, slots=k_len + 2, most=most, seed=seed)
    FUZZ_COUNT["bound"] += 1


@pytest.mark.gpu
@needs_cuda
def test_triton_line_bound_fuzz_ran_the_requested_number_of_cases():
    print(f"\nline bound fuzz cases run: {FUZZ_COUNT}")
    assert FUZZ_COUNT["bound"] >= min(reference.FUZZ_EXAMPLES, 500), FUZZ_COUNT
