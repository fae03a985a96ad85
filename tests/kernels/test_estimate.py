"""Estimation ops (vertical/slash scores, antidiagonal block mass, pooled block probabilities)
against brute-force float64 references built by explicit loops."""

from __future__ import annotations

import pytest
import torch

from sparseprefill.kernels import antidiagonal_block_mass, pooled_block_probs, vertical_slash_scores

from tests import reference as ref
from tests.reference import torch_single_thread  # noqa: F401  (autouse fixture)

ATOL = 2e-6  # fp32 ops vs float64 loops on probabilities in [0, 1]


def causal_block_validity(q_len: int, k_len: int, block_size: int) -> torch.Tensor:
    """``[Rq, Rk]`` bool: KV block ``c`` holds a key visible to some query of block ``r``."""
    sets = ref.causal_block_sets(q_len, k_len, block_size, block_size, 0)
    rk = -(-k_len // block_size)
    return torch.tensor([[c in valid for c in range(rk)] for valid, _, _ in sets], dtype=torch.bool)


# ------------------------------------------------------------------------------------------------
# vertical / slash scores


@pytest.mark.parametrize(
    "b,hkv,group,q_len,k_len,last_queries,softcap,spread",
    [
        (1, 1, 1, 40, 40, 8, None, 1.0),
        (2, 2, 2, 37, 37, 64, None, 2.0),  # last_queries > Lq: every row votes
        (2, 1, 3, 25, 70, 10, None, 2.0),  # chunked
        (1, 2, 1, 1, 33, 4, None, 1.0),  # decode
        (1, 1, 4, 30, 45, 12, 2.0, 5.0),  # softcap
    ],
    ids=["square", "last_queries_exceeds_lq", "chunked_gqa3", "decode", "softcap_gqa4"],
)
def test_vertical_slash_scores_match_dense_probability_sums(b, hkv, group, q_len, k_len, last_queries, softcap, spread):
    hq = hkv * group
    q, k, _ = ref.make_qkv(q_len + k_len, b, hq, hkv, q_len, k_len, 16, spread=spread)
    vertical, slash = vertical_slash_scores(q, k, scale=0.25, last_queries=last_queries, softcap=softcap)
    exp_v, exp_s = ref.vertical_slash_scores_reference(q, k, scale=0.25, last_queries=last_queries, softcap=softcap)
    assert vertical.shape == slash.shape == (b, hq, k_len)
    assert vertical.dtype == slash.dtype == torch.float32
    torch.testing.assert_close(vertical.double(), exp_v, atol=ATOL, rtol=1e-5, msg=lambda m: f"vertical: {m}")
    torch.testing.assert_close(slash.double(), exp_s, atol=ATOL, rtol=1e-5, msg=lambda m: f"slash: {m}")
    torch.testing.assert_close(vertical.sum(-1).double(), torch.ones(b, hq, dtype=torch.float64), atol=1e-5, rtol=0)
    torch.testing.assert_close(slash.sum(-1).double(), torch.ones(b, hq, dtype=torch.float64), atol=1e-5, rtol=0)


def test_vertical_slash_scores_custom_kv_head_index():
    q, k, _ = ref.make_qkv(3, 1, 3, 4, 30, 30, 16, spread=2.0)
    kv_head_index = torch.tensor([2, 2, 0])
    vertical, slash = vertical_slash_scores(q, k, scale=0.25, last_queries=9, kv_head_index=kv_head_index)
    exp_v, exp_s = ref.vertical_slash_scores_reference(q, k, scale=0.25, last_queries=9, kv_head_index=kv_head_index)
    torch.testing.assert_close(vertical.double(), exp_v, atol=ATOL, rtol=1e-5)
    torch.testing.assert_close(slash.double(), exp_s, atol=ATOL, rtol=1e-5)


def test_vertical_slash_scores_find_a_planted_column_and_diagonal():
    """Key 7 attracts every query; the rest of the mass is on diagonal 3. Both must top the scores."""
    q_len = k_len = 48
    d = 64
    q = torch.zeros(1, 1, q_len, d)
    k = torch.zeros(1, 1, k_len, d)
    q[..., 0] = 1.0
    k[0, 0, 7, 0] = 8.0
    # diagonal 3: query at position p likes key p - 3 via one-hot position codes in dims 1..51
    for p in range(q_len):
        q[0, 0, p, 1 + p] = 8.0
        if p + 3 < k_len:
            k[0, 0, p, 1 + p + 3] = 1.0
    vertical, slash = vertical_slash_scores(q, k, scale=1.0, last_queries=16)
    assert int(vertical[0, 0].argmax()) == 7
    assert int(slash[0, 0].argmax()) == 3
    assert vertical[0, 0, 7] > 0.3 and slash[0, 0, 3] > 0.3


# ------------------------------------------------------------------------------------------------
# antidiagonal block mass


@pytest.mark.parametrize(
    "b,hkv,group,q_len,k_len,stride,block_size,softcap",
    [
        (1, 1, 1, 64, 64, 4, 16, None),
        (1, 1, 1, 61, 61, 4, 16, None),  # Lq not a multiple of the stride or the block
        (2, 2, 2, 50, 50, 2, 8, None),
        (1, 1, 3, 30, 67, 4, 16, None),  # chunked, offset 37 not a multiple of the stride
        (1, 2, 1, 16, 40, 8, 16, None),
        (1, 1, 2, 33, 33, 4, 8, 1.5),  # softcap
        (1, 1, 1, 7, 29, 4, 8, None),  # fewer queries than one block
        (1, 1, 1, 40, 40, 8, 8, None),  # one group row per block
    ],
    ids=["square", "odd_len", "batch2_gqa2", "chunked_unaligned_offset", "stride8", "softcap", "short_chunk", "stride_eq_block"],
)
@pytest.mark.parametrize("sampled", [False, True], ids=["mean_logit", "sampled"])
@pytest.mark.parametrize("alternate", [False, True], ids=["fixed", "alternate"])
def test_antidiagonal_block_mass_matches_loop_reference(b, hkv, group, q_len, k_len, stride, block_size, softcap,
                                                        alternate, sampled):
    hq = hkv * group
    q, k, _ = ref.make_qkv(q_len * 3 + k_len, b, hq, hkv, q_len, k_len, 8, spread=2.0)
    kw = dict(scale=0.35, stride=stride, block_size=block_size, softcap=softcap, alternate=alternate, sampled=sampled)
    got = antidiagonal_block_mass(q, k, **kw)
    expected = ref.antidiagonal_block_mass_reference(q, k, **kw)
    assert got.shape == expected.shape and got.dtype == torch.float32
    torch.testing.assert_close(got.double(), expected, atol=ATOL, rtol=1e-5)


@pytest.mark.parametrize("sampled", [False, True], ids=["mean_logit", "sampled"])
@pytest.mark.parametrize("alternate", [False, True], ids=["fixed", "alternate"])
@pytest.mark.parametrize("q_len,k_len,stride,block_size", [(61, 61, 4, 16), (30, 67, 4, 16), (5, 40, 2, 8), (64, 64, 8, 32)])
def test_antidiagonal_rows_sum_to_one_over_causal_blocks(q_len, k_len, stride, block_size, alternate, sampled):
    q, k, _ = ref.make_qkv(q_len, 2, 4, 2, q_len, k_len, 8, spread=2.0)
    got = antidiagonal_block_mass(q, k, scale=0.35, stride=stride, block_size=block_size, alternate=alternate,
                                  sampled=sampled).double()
    valid = causal_block_validity(q_len, k_len, block_size)
    torch.testing.assert_close(got.sum(-1), torch.ones(got.shape[:-1], dtype=torch.float64), atol=1e-5, rtol=0)
    assert torch.equal(got[..., ~valid], torch.zeros_like(got[..., ~valid])), "mass on a block no query of the row can see"
    assert (got >= 0).all()


@pytest.mark.parametrize(
    "b,hkv,group,q_len,k_len,block_size,softcap",
    [(1, 1, 1, 48, 48, 16, None), (2, 2, 2, 45, 45, 8, None), (1, 1, 2, 20, 53, 16, None), (1, 1, 1, 37, 37, 8, 2.0)],
    ids=["square", "odd_gqa", "chunked", "softcap"],
)
def test_antidiagonal_stride_one_is_exact_dense_block_mass(b, hkv, group, q_len, k_len, block_size, softcap):
    """With stride 1 the antidiagonal of a 1x1 sub-block is the logit itself, so the estimate must be
    the exact block mass of the dense causal softmax (mean over rows of the mass in each block)."""
    hq = hkv * group
    q, k, _ = ref.make_qkv(k_len + 1, b, hq, hkv, q_len, k_len, 16, spread=2.0)
    probs = ref.dense_probs(q, k, scale=0.25, softcap=softcap)
    exact = ref.exact_block_mass(probs, q_len, k_len, block_size)
    # the loop reference and the dense definition agree (the relationship itself) ...
    loops = ref.antidiagonal_block_mass_reference(q, k, scale=0.25, stride=1, block_size=block_size, softcap=softcap)
    torch.testing.assert_close(loops, exact, atol=1e-12, rtol=1e-10)
    # ... and the op reproduces it
    got = antidiagonal_block_mass(q, k, scale=0.25, stride=1, block_size=block_size, softcap=softcap)
    torch.testing.assert_close(got.double(), exact, atol=ATOL, rtol=1e-5)


def test_antidiagonal_stride_one_across_the_internal_row_chunk():
    """1100 group rows (stride 1) span more than one of the op's internal row chunks (1024)."""
    q_len = k_len = 1100
    q, k, _ = ref.make_qkv(1100, 1, 1, 1, q_len, k_len, 8, spread=2.0)
    exact = ref.exact_block_mass(ref.dense_probs(q, k, scale=0.35), q_len, k_len, 64)
    got = antidiagonal_block_mass(q, k, scale=0.35, stride=1, block_size=64)
    torch.testing.assert_close(got.double(), exact, atol=ATOL, rtol=1e-5)


def test_antidiagonal_custom_kv_head_index():
    q, k, _ = ref.make_qkv(5, 1, 2, 3, 32, 40, 8, spread=2.0)
    kv_head_index = torch.tensor([2, 1])
    got = antidiagonal_block_mass(q, k, scale=0.35, stride=4, block_size=16, kv_head_index=kv_head_index)
    expected = ref.antidiagonal_block_mass_reference(q, k, scale=0.35, stride=4, block_size=16, kv_head_index=kv_head_index)
    torch.testing.assert_close(got.double(), expected, atol=ATOL, rtol=1e-5)


@pytest.mark.parametrize("offset", [300, 301, 302, 303])
def test_alternate_antidiagonals_see_a_copy_head_at_either_offset_parity(offset):
    """A head that copies from ``offset`` keys back (query q attends key q - offset, one sharp slash).
    XAttention's fixed antidiagonal (stride 8) only pairs queries and keys an odd distance apart: at an
    even offset its scores do not single out the source blocks (they are not its two largest). With
    alternating rows they are the two largest at either parity (half the rows see each slash, so the
    contrast is about half the fixed scoring's at odd offsets)."""
    length, block, stride = 1024, 128, 8
    g = torch.Generator().manual_seed(0)
    k = torch.nn.functional.normalize(torch.randn(1, 1, length, 64, generator=g), dim=-1)
    q = torch.zeros(1, 1, length, 64)
    q[0, 0, offset:] = 30.0 * k[0, 0, : length - offset]
    query_block = 5
    sources = sorted({(query_block * block - offset) // block, ((query_block + 1) * block - 1 - offset) // block})
    kw = dict(scale=1.0, stride=stride, block_size=block)
    fixed = antidiagonal_block_mass(q, k, **kw)[0, 0, query_block]
    alternating = antidiagonal_block_mass(q, k, **kw, alternate=True)[0, 0, query_block]
    assert len(sources) == 2
    assert sorted(alternating.topk(2).indices.tolist()) == sources
    assert (sorted(fixed.topk(2).indices.tolist()) == sources) == (offset % 2 == 1)


def test_sampled_scoring_tracks_a_spike_the_mean_logit_dilutes():
    """Every query attends one key per group of 8 strongly (a spike) plus a broad background: the mean
    of 8 logits dilutes the spike 8-fold in the exponent, so XAttention's scores leave most of the mass
    on the background blocks, while the sampled pairs' own softmax finds the spike's block, close to
    the exact block mass."""
    length, block, stride, d = 512, 64, 8, 64
    g = torch.Generator().manual_seed(3)
    k = torch.randn(1, 1, length, d, generator=g) * 0.3
    q = torch.randn(1, 1, length, d, generator=g) * 0.3
    spike = 70  # one key in block 1 every later query attends to
    direction = torch.nn.functional.normalize(torch.randn(d, generator=g), dim=0)
    k[0, 0, spike] += 8.0 * direction
    q[0, 0, spike + 1:] += 8.0 * direction
    kw = dict(scale=d**-0.5, stride=stride, block_size=block)
    exact = ref.exact_block_mass(ref.dense_probs(q, k, scale=d**-0.5), length, length, block)[0, 0]
    mean_logit = antidiagonal_block_mass(q, k, **kw)[0, 0]
    sampled = antidiagonal_block_mass(q, k, **kw, sampled=True)[0, 0].double()
    last = length // block - 1
    assert float(exact[last, 1]) > 0.7  # the spike's block holds most of the true mass (0.83)
    assert abs(float(sampled[last, 1] - exact[last, 1])) < 0.05
    assert float(mean_logit[last, 1]) < 0.3  # 0.16: the spike diluted into the background


def test_antidiagonal_rejects_block_size_not_multiple_of_stride():
    q, k, _ = ref.make_qkv(0, 1, 1, 1, 16, 16, 8)
    with pytest.raises(ValueError, match="multiple"):
        antidiagonal_block_mass(q, k, scale=1.0, stride=3, block_size=16)


# ------------------------------------------------------------------------------------------------
# pooled block probabilities


@pytest.mark.parametrize(
    "b,hkv,group,q_len,k_len,block_size,softcap",
    [
        (1, 1, 1, 64, 64, 16, None),
        (2, 2, 2, 61, 61, 16, None),  # last block short
        (1, 1, 3, 23, 77, 16, None),  # chunked
        (1, 2, 1, 1, 40, 8, None),  # decode
        (1, 1, 1, 45, 45, 64, None),  # one block
        (2, 1, 2, 50, 50, 8, 1.0),  # softcap
    ],
    ids=["square", "odd_gqa2", "chunked_gqa3", "decode", "single_block", "softcap"],
)
def test_pooled_block_probs_match_loop_reference(b, hkv, group, q_len, k_len, block_size, softcap):
    hq = hkv * group
    q, k, _ = ref.make_qkv(q_len + 2 * k_len, b, hq, hkv, q_len, k_len, 16, spread=3.0)
    got = pooled_block_probs(q, k, scale=0.25, block_size=block_size, softcap=softcap)
    expected = ref.pooled_block_probs_reference(q, k, scale=0.25, block_size=block_size, softcap=softcap)
    assert got.shape == expected.shape and got.dtype == torch.float32
    torch.testing.assert_close(got.double(), expected, atol=ATOL, rtol=1e-5)
    valid = causal_block_validity(q_len, k_len, block_size)
    torch.testing.assert_close(got.sum(-1).double(), torch.ones(got.shape[:-1], dtype=torch.float64), atol=1e-5, rtol=0)
    assert torch.equal(got[..., ~valid], torch.zeros_like(got[..., ~valid]))


def test_pooled_block_probs_custom_kv_head_index():
    q, k, _ = ref.make_qkv(6, 1, 3, 2, 40, 40, 16, spread=3.0)
    kv_head_index = torch.tensor([1, 0, 1])
    got = pooled_block_probs(q, k, scale=0.25, block_size=8, kv_head_index=kv_head_index)
    expected = ref.pooled_block_probs_reference(q, k, scale=0.25, block_size=8, kv_head_index=kv_head_index)
    torch.testing.assert_close(got.double(), expected, atol=ATOL, rtol=1e-5)


@pytest.mark.parametrize("op", ["vertical_slash_scores", "antidiagonal_block_mass", "pooled_block_probs"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
def test_estimates_accept_half_precision_inputs(op, dtype):
    """Half-precision q/k are scored in fp32: the result matches the reference on the same values."""
    q, k, _ = ref.make_qkv(1, 1, 2, 1, 40, 40, 16, dtype=dtype, spread=2.0)
    if op == "vertical_slash_scores":
        got = torch.stack(vertical_slash_scores(q, k, scale=0.25, last_queries=8))
        expected = torch.stack(ref.vertical_slash_scores_reference(q, k, scale=0.25, last_queries=8))
    elif op == "antidiagonal_block_mass":
        got = antidiagonal_block_mass(q, k, scale=0.25, stride=4, block_size=16)
        expected = ref.antidiagonal_block_mass_reference(q, k, scale=0.25, stride=4, block_size=16)
    else:
        got = pooled_block_probs(q, k, scale=0.25, block_size=16)
        expected = ref.pooled_block_probs_reference(q, k, scale=0.25, block_size=16)
    assert got.dtype == torch.float32
    torch.testing.assert_close(got.double(), expected, atol=1e-5, rtol=1e-4)
