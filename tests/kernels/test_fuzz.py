"""Hypothesis fuzz of the two sparse attention kernels against the float64 masked reference over
shapes, lengths (chunked included), GQA groups, block sizes, densities, windows and soft-caps.
Deterministic: derandomized, no example database."""

from __future__ import annotations

import math
import random

import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from sparseprefill.kernels import block_sparse_attention, build_vertical_slash_index, vertical_slash_attention

from tests import reference as ref
from tests.reference import torch_single_thread  # noqa: F401  (autouse fixture)

FUZZ = settings(max_examples=250, deadline=None, derandomize=True, database=None, suppress_health_check=[HealthCheck.too_slow])


@st.composite
def attention_problems(draw):
    k_len = draw(st.integers(1, 140) | st.integers(60, 140))
    # a fresh prefill (Lq == Lk) about half of the time, otherwise a chunk of any length
    q_len = draw(st.one_of(st.just(k_len), st.integers(1, k_len), st.integers(max(1, k_len // 2), k_len)))
    return dict(
        b=draw(st.integers(1, 2)),
        hkv=draw(st.integers(1, 2)),
        group=draw(st.sampled_from([1, 2, 3, 4])),
        q_len=q_len,
        k_len=k_len,
        d=draw(st.sampled_from([8, 16, 24, 64])),
        bq=draw(st.sampled_from([1, 8, 16, 32, 64])),
        bk=draw(st.sampled_from([8, 16, 32, 64])),
        density=draw(st.sampled_from([0.0, 0.1, 0.3, 0.6, 0.9, 1.0])),
        window=draw(st.none() | st.integers(1, 150)),
        softcap=draw(st.none() | st.sampled_from([1.0, 5.0, 30.0])),
        spread=draw(st.sampled_from([0.5, 1.0, 4.0])),
        dtype=draw(st.sampled_from([torch.float32, torch.float32, torch.bfloat16])),
        seed=draw(st.integers(0, 2**20)),
    )


TOL = {torch.float32: dict(atol=2e-5, rtol=2e-5), torch.bfloat16: dict(atol=1.6e-2, rtol=1.6e-2)}


def _check(kernel, index, listed, p, q, k, v):
    scale = 1.0 / math.sqrt(p["d"])
    expected = ref.attention_reference(q, k, v, scale=scale, listed=listed, window=p["window"], softcap=p["softcap"])
    out = torch.full_like(q, float("nan"))
    kernel(q, k, v, index, scale=scale, window=p["window"], softcap=p["softcap"], out=out)
    assert not torch.isnan(out).any(), "unwritten output rows"
    torch.testing.assert_close(out.double(), expected, **TOL[p["dtype"]])


@FUZZ
@given(p=attention_problems())
def test_fuzz_block_sparse_attention_matches_reference(p):
    hq = p["hkv"] * p["group"]
    q, k, v = ref.make_qkv(p["seed"], p["b"], hq, p["hkv"], p["q_len"], p["k_len"], p["d"], p["dtype"], spread=p["spread"])
    index = ref.random_block_sparse_index(
        random.Random(p["seed"]), p["b"], hq, p["q_len"], p["k_len"], p["bq"], p["bk"], p["density"]
    )
    _check(block_sparse_attention, index, ref.block_sparse_listed_mask(index), p, q, k, v)


@FUZZ
@given(p=attention_problems(), from_lines=st.booleans(), n_lines=st.integers(0, 20))
def test_fuzz_vertical_slash_attention_matches_reference(p, from_lines, n_lines):
    hq = p["hkv"] * p["group"]
    q, k, v = ref.make_qkv(p["seed"], p["b"], hq, p["hkv"], p["q_len"], p["k_len"], p["d"], p["dtype"], spread=p["spread"])
    rng = random.Random(p["seed"])
    if from_lines:
        vi, vc, so, sc, verticals, slashes = ref.random_lines(rng, p["b"], hq, p["k_len"], n_lines, n_lines)
        index = build_vertical_slash_index(vi, vc, so, sc, q_len=p["q_len"], k_len=p["k_len"], block_size_q=p["bq"])
        listed = ref.lines_mask(verticals, slashes, p["bq"], p["q_len"], p["k_len"])
    else:
        index = ref.random_vertical_slash_index(rng, p["b"], hq, p["q_len"], p["k_len"], p["bq"], p["density"])
        listed = ref.vertical_slash_listed_mask(index)
    _check(vertical_slash_attention, index, listed, p, q, k, v)
