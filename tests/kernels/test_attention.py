"""The three attention kernels (block-sparse, vertical-slash, dense) against a float64 masked-softmax
reference whose token mask is rebuilt from the index by Python loops (tests/reference.py)."""

from __future__ import annotations

import math
import random

import pytest
import torch

from sparseprefill.kernels import (
    block_sparse_attention,
    build_vertical_slash_index,
    dense_attention,
    fast_dense_attention,
    vertical_slash_attention,
)
from sparseprefill.kernels.dense import dense_attention_sdpa
from sparseprefill.kernels.dense.sdpa import sdpa_supports
from sparseprefill.kernels.indices import BlockSparseIndex, VerticalSlashIndex

from tests import reference as ref
from tests.reference import torch_single_thread  # noqa: F401  (autouse fixture)

TOL = {
    # The kernels compute in fp32 from the same (rounded) inputs the reference reads, so the only
    # error is fp32 arithmetic plus the final rounding of the output to the input dtype.
    torch.float32: dict(atol=2e-5, rtol=2e-5),
    torch.float16: dict(atol=2e-3, rtol=2e-3),
    torch.bfloat16: dict(atol=1.6e-2, rtol=1.6e-2),
}

KINDS = ["block_sparse", "vertical_slash_from_lines", "vertical_slash_direct"]


def assert_matches_reference(out: torch.Tensor, expected: torch.Tensor, dtype: torch.dtype, what: str) -> None:
    assert not torch.isnan(out).any(), f"{what}: output has NaN (an unwritten tile of the NaN-filled out?)"
    torch.testing.assert_close(out.double(), expected, **TOL[dtype], msg=lambda m: f"{what}: {m}")


def make_sparse_case(kind: str, rng: random.Random, *, b, hq, q_len, k_len, bq, bk, density):
    """(index, listed mask [B, Hq, Lq, Lk]) for a sparse kernel kind."""
    if kind == "block_sparse":
        index = ref.random_block_sparse_index(rng, b, hq, q_len, k_len, bq, bk, density)
        return index, ref.block_sparse_listed_mask(index)
    if kind == "vertical_slash_direct":
        index = ref.random_vertical_slash_index(rng, b, hq, q_len, k_len, bq, density)
        return index, ref.vertical_slash_listed_mask(index)
    if kind == "vertical_slash_from_lines":
        n_lines = max(1, int(density * k_len / 4))
        vi, vc, so, sc, verticals, slashes = ref.random_lines(rng, b, hq, k_len, n_lines, n_lines)
        index = build_vertical_slash_index(vi, vc, so, sc, q_len=q_len, k_len=k_len, block_size_q=bq)
        # The expected mask comes straight from the lines, not from the converted index.
        return index, ref.lines_mask(verticals, slashes, bq, q_len, k_len)
    raise AssertionError(kind)


def run_sparse(kind, q, k, v, index, **kwargs):
    fn = block_sparse_attention if kind == "block_sparse" else vertical_slash_attention
    return fn(q, k, v, index, **kwargs)


def check_sparse_kernel(
    kind: str,
    *,
    b: int = 1,
    hkv: int = 1,
    group: int = 1,
    q_len: int = 61,
    k_len: int | None = None,
    d: int = 32,
    bq: int = 16,
    bk: int = 16,
    density: float = 0.5,
    window: int | None = None,
    softcap: float | None = None,
    dtype: torch.dtype = torch.float32,
    spread: float = 1.0,
    seed: int = 0,
    strided_out: bool = False,
) -> None:
    k_len = q_len if k_len is None else k_len
    hq = hkv * group
    rng = random.Random(seed)
    q, k, v = ref.make_qkv(seed, b, hq, hkv, q_len, k_len, d, dtype, spread=spread)
    index, listed = make_sparse_case(kind, rng, b=b, hq=hq, q_len=q_len, k_len=k_len, bq=bq, bk=bk, density=density)
    scale = 1.0 / math.sqrt(d)
    expected = ref.attention_reference(q, k, v, scale=scale, listed=listed, window=window, softcap=softcap)
    if strided_out:
        buf = torch.full((b, q_len, hq, d), float("nan"), dtype=dtype)
        out = buf.transpose(1, 2)
    else:
        out = torch.full_like(q, float("nan"))
    result = run_sparse(kind, q, k, v, index, scale=scale, window=window, softcap=softcap, out=out)
    assert result.data_ptr() == out.data_ptr() and result.stride() == out.stride(), "kernel did not write into out="
    assert result.dtype == dtype
    assert_matches_reference(result, expected, dtype, f"{kind}")
    if strided_out:
        assert_matches_reference(buf.transpose(1, 2), expected, dtype, f"{kind} (via the [B, Lq, Hq, D] buffer)")


# ------------------------------------------------------------------------------------------------
# the reference itself, on hand-computed cases


def test_reference_conventions_on_hand_computed_cases():
    # bottom-right alignment: 2 queries over 3 keys sit at positions 1 and 2
    assert ref.causal_mask(2, 3).tolist() == [[True, True, False], [True, True, True]]
    # window 2: position 2 sees keys 1 and 2 only
    assert ref.causal_mask(1, 3, window=2).tolist() == [[False, True, True]]
    # one query, keys with logits 0 and ln 2 -> weights 1/3, 2/3; values 3 and 6 -> 5
    q = torch.ones(1, 1, 1, 1)
    k = torch.tensor([0.0, math.log(2.0)]).reshape(1, 1, 2, 1)
    v = torch.tensor([3.0, 6.0]).reshape(1, 1, 2, 1)
    assert abs(float(ref.attention_reference(q, k, v, scale=1.0)) - 5.0) < 1e-6  # k holds fp32 ln 2
    # softcap 1: logits tanh(0)=0 and tanh(ln 2)=0.6 -> weights 1/(1+e^0.6), e^0.6/(1+e^0.6)
    w1 = math.exp(0.6) / (1 + math.exp(0.6))
    assert abs(float(ref.attention_reference(q, k, v, scale=1.0, softcap=1.0)) - (3 * (1 - w1) + 6 * w1)) < 1e-6
    # a row whose only listed key is in its future gives 0
    listed = torch.tensor([[False, True]]).reshape(1, 1, 1, 2)
    q2 = torch.ones(1, 1, 1, 1)
    assert float(ref.attention_reference(q2, k[:, :, :2], v, scale=1.0, listed=listed)) == 6.0
    two_rows = ref.attention_reference(torch.ones(1, 1, 2, 1), k, v, scale=1.0, listed=torch.tensor([[False, True], [False, True]]).reshape(1, 1, 2, 2))
    assert two_rows.flatten().tolist() == [0.0, 6.0]
    # lines: Lq = Lk = 8, blocks of 4, verticals {1, 6}, slash {2}
    assert ref.lines_block_keys([1, 6], [2], 0, 4, 8, 8) == {0, 1}
    assert ref.lines_block_keys([1, 6], [2], 1, 4, 8, 8) == {1, 2, 3, 4, 5, 6}


# ------------------------------------------------------------------------------------------------
# sparse kernels: one axis at a time


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize(
    "q_len,bq,bk",
    [(77, 16, 16), (100, 32, 16), (99, 16, 32), (50, 128, 128), (1, 16, 16), (17, 16, 16), (130, 64, 32)],
    ids=["odd_77_bs16", "100_bq32_bk16", "99_bq16_bk32", "50_blocks_larger_than_len", "single_query", "17_one_past_block", "130_bq64_bk32"],
)
def test_sparse_kernel_odd_lengths_and_block_sizes(kind, q_len, bq, bk):
    check_sparse_kernel(kind, q_len=q_len, bq=bq, bk=bk)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("d", [64, 80, 128, 256])
def test_sparse_kernel_head_dims(kind, d):
    check_sparse_kernel(kind, q_len=45, d=d, seed=d)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("group", [1, 2, 4, 7])
def test_sparse_kernel_gqa_group_sizes(kind, group):
    check_sparse_kernel(kind, hkv=2, group=group, q_len=50, seed=group)


@pytest.mark.parametrize("kind", KINDS)
def test_sparse_kernel_batch_two_with_different_indices_per_row(kind):
    rng = random.Random(3)
    index, _ = make_sparse_case(kind, rng, b=2, hq=2, q_len=70, k_len=70, bq=16, bk=16, density=0.5)
    first = index.block_index if kind == "block_sparse" else index.range_start
    assert not torch.equal(first[0], first[1]), "test setup: the two batch rows should differ"
    check_sparse_kernel(kind, b=2, hkv=2, q_len=70, seed=3)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("q_len,k_len", [(37, 101), (1, 64), (64, 130), (16, 17)], ids=["37_of_101", "decode_1_of_64", "64_of_130", "16_of_17"])
def test_sparse_kernel_chunked_queries_are_last_key_positions(kind, q_len, k_len):
    check_sparse_kernel(kind, b=2, hkv=2, group=2, q_len=q_len, k_len=k_len, seed=q_len)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("window,q_len,k_len", [(1, 40, 40), (17, 61, 61), (24, 30, 90), (500, 50, 80)])
def test_sparse_kernel_sliding_window(kind, window, q_len, k_len):
    check_sparse_kernel(kind, window=window, q_len=q_len, k_len=k_len, density=0.7, seed=window)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("softcap", [2.0, 30.0])
def test_sparse_kernel_softcap(kind, softcap):
    # spread=6 makes logits large enough that soft-capping changes the result substantially.
    check_sparse_kernel(kind, softcap=softcap, spread=6.0, q_len=53, k_len=70, seed=int(softcap))


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=["fp32", "fp16", "bf16"])
def test_sparse_kernel_dtypes(kind, dtype):
    check_sparse_kernel(kind, dtype=dtype, b=2, hkv=2, group=2, q_len=45, k_len=83, d=64, window=40, seed=11)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_sparse_kernel_writes_every_row_of_strided_out(kind, dtype):
    """``out`` is ``buf.transpose(1, 2)`` of a NaN-filled ``[B, Lq, Hq, D]`` buffer."""
    check_sparse_kernel(kind, dtype=dtype, b=2, hkv=1, group=3, q_len=33, k_len=50, strided_out=True, seed=5)


@pytest.mark.parametrize("kind", KINDS)
def test_sparse_kernel_without_out_returns_fresh_tensor(kind):
    rng = random.Random(0)
    q, k, v = ref.make_qkv(0, 1, 2, 1, 40, 40, 16)
    index, listed = make_sparse_case(kind, rng, b=1, hq=2, q_len=40, k_len=40, bq=16, bk=16, density=0.6)
    result = run_sparse(kind, q, k, v, index, scale=0.25)
    assert result.shape == q.shape and result.dtype == q.dtype
    assert_matches_reference(result, ref.attention_reference(q, k, v, scale=0.25, listed=listed), torch.float32, kind)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("density", [0.0, 0.05, 1.0])
def test_sparse_kernel_extreme_densities(kind, density):
    check_sparse_kernel(kind, b=2, hkv=2, q_len=48, k_len=64, density=density, seed=int(density * 100))


@pytest.mark.parametrize("kind", KINDS)
def test_sparse_kernel_custom_kv_head_index_subset_of_query_heads(kind):
    """Three query heads (a subset of a larger model's heads) reading KV heads 3, 0, 3 of four."""
    b, hq, hkv, q_len, k_len, d = 2, 3, 4, 40, 55, 16
    q, k, v = ref.make_qkv(21, b, hq, hkv, q_len, k_len, d)
    kv_head_index = torch.tensor([3, 0, 3])
    index, listed = make_sparse_case(kind, random.Random(21), b=b, hq=hq, q_len=q_len, k_len=k_len, bq=16, bk=16, density=0.6)
    expected = ref.attention_reference(q, k, v, scale=0.3, listed=listed, kv_head_index=kv_head_index)
    out = torch.full_like(q, float("nan"))
    run_sparse(kind, q, k, v, index, scale=0.3, kv_head_index=kv_head_index, out=out)
    assert_matches_reference(out, expected, torch.float32, kind)
    # and it is not what the default mapping would give
    default = ref.attention_reference(q, k, v, scale=0.3, listed=listed, kv_head_index=torch.tensor([0, 1, 2]))
    assert (default - expected).abs().max() > 1e-2


# ------------------------------------------------------------------------------------------------
# rows that see nothing


def _empty_block_sparse(b, h, q_len, k_len, bs, ids_per_block):
    rq = -(-q_len // bs)
    width = max(1, max(len(x) for x in ids_per_block))
    count = torch.zeros(b, h, rq, dtype=torch.int32)
    index = torch.full((b, h, rq, width), -1, dtype=torch.int32)
    for r, ids in enumerate(ids_per_block):
        count[:, :, r] = len(ids)
        if ids:
            index[:, :, r, : len(ids)] = torch.tensor(ids, dtype=torch.int32)
    return BlockSparseIndex(block_count=count, block_index=index, block_size_q=bs, block_size_k=bs, q_len=q_len, k_len=k_len)


def test_block_sparse_rows_with_no_listed_or_no_visible_keys_are_zero():
    # block 0 lists nothing, block 1 lists only a future block, block 2 lists its own diagonal block
    q, k, v = ref.make_qkv(1, 1, 2, 1, 40, 40, 8)
    index = _empty_block_sparse(1, 2, 40, 40, 16, [[], [2], [2]])
    out = torch.full_like(q, float("nan"))
    block_sparse_attention(q, k, v, index, scale=0.5, out=out)
    assert torch.equal(out[:, :, :32], torch.zeros_like(out[:, :, :32])), "rows that see no key must be exactly 0"
    listed = ref.block_sparse_listed_mask(index)
    assert_matches_reference(out, ref.attention_reference(q, k, v, scale=0.5, listed=listed), torch.float32, "block_sparse")


def test_vertical_slash_rows_with_no_listed_or_no_visible_keys_are_zero():
    q_len = k_len = 40
    rq = 3
    z = lambda *s: torch.zeros(*s, dtype=torch.int32)  # noqa: E731
    rc, rs, re_ = z(1, 2, rq), z(1, 2, rq, 1), z(1, 2, rq, 1)
    cc, ci = z(1, 2, rq), z(1, 2, rq, 1)
    rc[:, :, 1], rs[:, :, 1], re_[:, :, 1] = 1, 35, 40  # block 1 (rows 16..31): only future keys
    cc[:, :, 2], ci[:, :, 2] = 1, 39  # block 2 (rows 32..39): column 39, visible to row 39 only
    index = VerticalSlashIndex(rc, rs, re_, cc, ci, block_size_q=16, q_len=q_len, k_len=k_len)
    q, k, v = ref.make_qkv(2, 1, 2, 1, q_len, k_len, 8)
    out = torch.full_like(q, float("nan"))
    vertical_slash_attention(q, k, v, index, scale=0.5, out=out)
    assert torch.equal(out[:, :, :39], torch.zeros_like(out[:, :, :39])), "rows that see no key must be exactly 0"
    torch.testing.assert_close(out[:, :, 39], v[:, :, 39].expand_as(out[:, :, 39]))


@pytest.mark.parametrize("kind", ["block_sparse", "vertical_slash_direct"])
def test_sparse_kernel_window_can_hide_every_listed_key(kind):
    """A window of 4 with an index listing only key block 0: rows past position ~20 see nothing."""
    q, k, v = ref.make_qkv(4, 1, 1, 1, 48, 48, 8)
    if kind == "block_sparse":
        index = _empty_block_sparse(1, 1, 48, 48, 16, [[0], [0], [0]])
        listed = ref.block_sparse_listed_mask(index)
        fn = block_sparse_attention
    else:
        c = lambda x: torch.tensor(x, dtype=torch.int32).reshape(1, 1, 3)  # noqa: E731
        t = lambda x: torch.tensor(x, dtype=torch.int32).reshape(1, 1, 3, 1)  # noqa: E731
        index = VerticalSlashIndex(c([1, 1, 1]), t([0, 0, 0]), t([16, 16, 16]), c([0, 0, 0]), t([0, 0, 0]), 16, 48, 48)
        listed = ref.vertical_slash_listed_mask(index)
        fn = vertical_slash_attention
    out = torch.full_like(q, float("nan"))
    fn(q, k, v, index, scale=0.5, window=4, out=out)
    assert torch.equal(out[:, :, 19:], torch.zeros_like(out[:, :, 19:]))
    assert_matches_reference(out, ref.attention_reference(q, k, v, scale=0.5, listed=listed, window=4), torch.float32, kind)


def test_sparse_kernels_actually_drop_keys():
    """Sanity of the comparison itself: a sparse index gives a result far from dense attention, so
    the reference comparisons above would notice a kernel that ignored the index."""
    q, k, v = ref.make_qkv(8, 1, 2, 1, 64, 64, 16, spread=2.0)
    index = ref.random_block_sparse_index(random.Random(8), 1, 2, 64, 64, 16, 16, 0.4)
    sparse = block_sparse_attention(q, k, v, index, scale=0.25)
    dense, _ = dense_attention(q, k, v, scale=0.25)
    assert (sparse - dense).abs().max() > 0.1


def test_vertical_slash_kernel_on_converted_index_without_verticals_and_unreached_block():
    """No vertical lines at all (``vertical_index`` of width 0) and one slash (d=40) that does not
    reach query block 0: the converter yields a width-0 ``column_index`` and block 0 has no range,
    so block 0 gathers zero keys. Its rows must come out as 0, not raise."""
    q_len = k_len = 64
    index = build_vertical_slash_index(
        torch.zeros(1, 1, 0, dtype=torch.long), torch.zeros(1, 1, dtype=torch.long),
        torch.tensor([[[40]]]), torch.tensor([[1]]), q_len=q_len, k_len=k_len, block_size_q=16,
    )
    q, k, v = ref.make_qkv(0, 1, 1, 1, q_len, k_len, 8)
    out = torch.full_like(q, float("nan"))
    vertical_slash_attention(q, k, v, index, scale=0.5, out=out)
    expected = ref.attention_reference(q, k, v, scale=0.5, listed=ref.lines_mask([[[]]], [[[40]]], 16, q_len, k_len))
    assert_matches_reference(out, expected, torch.float32, "vertical_slash")


def test_vertical_slash_kernel_handles_empty_range_and_column_tensors():
    """An index whose range/column tensors have width 0 (no lines at all) is a legal shape: every
    row sees nothing and must output 0."""
    z = lambda *s: torch.zeros(*s, dtype=torch.int32)  # noqa: E731
    index = VerticalSlashIndex(z(1, 1, 2), z(1, 1, 2, 0), z(1, 1, 2, 0), z(1, 1, 2), z(1, 1, 2, 0), 16, 20, 20)
    q, k, v = ref.make_qkv(0, 1, 1, 1, 20, 20, 8)
    out = vertical_slash_attention(q, k, v, index, scale=0.5)
    assert torch.equal(out, torch.zeros_like(out))


def test_block_sparse_kernel_handles_empty_block_index_tensor():
    z = lambda *s: torch.zeros(*s, dtype=torch.int32)  # noqa: E731
    index = BlockSparseIndex(z(1, 1, 2), z(1, 1, 2, 0), 16, 16, 20, 20)
    q, k, v = ref.make_qkv(0, 1, 1, 1, 20, 20, 8)
    out = block_sparse_attention(q, k, v, index, scale=0.5)
    assert torch.equal(out, torch.zeros_like(out))


# ------------------------------------------------------------------------------------------------
# dense attention


@pytest.mark.parametrize(
    "b,hkv,group,q_len,k_len,d,window,softcap,spread",
    [
        (1, 1, 1, 77, 77, 64, None, None, 1.0),
        (2, 2, 2, 33, 90, 80, None, None, 1.0),
        (1, 2, 4, 50, 50, 128, 9, None, 1.0),
        (2, 1, 7, 21, 60, 256, None, 3.0, 4.0),
        (1, 3, 1, 1, 31, 32, 8, 10.0, 4.0),
        (2, 2, 1, 40, 41, 16, 1, None, 1.0),
    ],
    ids=["odd_len_d64", "chunked_gqa2_d80", "window9_gqa4_d128", "softcap_gqa7_d256", "decode_window_softcap", "window1_self_only"],
)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=["fp32", "fp16", "bf16"])
def test_dense_attention_matches_reference(b, hkv, group, q_len, k_len, d, window, softcap, spread, dtype):
    q, k, v = ref.make_qkv(q_len + d, b, hkv * group, hkv, q_len, k_len, d, dtype, spread=spread)
    scale = d**-0.5
    expected, probs = ref.attention_reference(q, k, v, scale=scale, window=window, softcap=softcap, return_probs=True)
    out = torch.full_like(q, float("nan"))
    result, weights = dense_attention(q, k, v, scale=scale, window=window, softcap=softcap, out=out, return_weights=True)
    assert result.data_ptr() == out.data_ptr()
    assert_matches_reference(result, expected, dtype, "dense_attention")
    torch.testing.assert_close(weights.double(), probs, atol=1e-5, rtol=1e-5)


def test_dense_attention_key_padding_mask_and_strided_out():
    b, hq, hkv, q_len, k_len, d = 2, 4, 2, 30, 45, 16
    q, k, v = ref.make_qkv(9, b, hq, hkv, q_len, k_len, d)
    pad = torch.ones(b, k_len, dtype=torch.bool)
    pad[0, :10] = False  # left padding of row 0
    pad[1, 20:25] = False
    expected, probs = ref.attention_reference(q, k, v, scale=0.25, key_padding_mask=pad, return_probs=True)
    buf = torch.full((b, q_len, hq, d), float("nan"))
    result, weights = dense_attention(q, k, v, scale=0.25, key_padding_mask=pad, out=buf.transpose(1, 2), return_weights=True)
    assert_matches_reference(buf.transpose(1, 2), expected, torch.float32, "dense_attention padded")
    torch.testing.assert_close(weights.double(), probs, atol=1e-6, rtol=1e-6)


def test_dense_attention_fully_padded_rows_are_zero():
    q, k, v = ref.make_qkv(1, 1, 2, 1, 10, 10, 8)
    pad = torch.ones(1, 10, dtype=torch.bool)
    pad[0, :6] = False  # rows 0..5 see only padding
    out, weights = dense_attention(q, k, v, scale=0.3, key_padding_mask=pad, return_weights=True)
    assert torch.equal(out[:, :, :6], torch.zeros_like(out[:, :, :6]))
    assert torch.equal(weights[:, :, :6], torch.zeros_like(weights[:, :, :6]))
    assert not torch.isnan(out).any()


def test_dense_attention_chunking_over_many_query_rows():
    """More rows than the kernel's internal query chunk (512)."""
    q, k, v = ref.make_qkv(5, 1, 1, 1, 530, 600, 8)
    out = torch.full_like(q, float("nan"))
    dense_attention(q, k, v, scale=0.3, window=100, out=out)
    assert_matches_reference(out, ref.attention_reference(q, k, v, scale=0.3, window=100), torch.float32, "dense")


@pytest.mark.parametrize(
    "hkv,group,q_len,k_len,d",
    [(1, 1, 77, 77, 64), (2, 7, 90, 90, 64), (2, 2, 33, 90, 80), (1, 4, 1, 31, 128), (3, 1, 129, 200, 256)],
    ids=["odd_len_d64", "gqa7_d64", "chunk_gqa2_d80", "one_query_d128", "chunk_d256"],
)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_dense_attention_sdpa_matches_reference(hkv, group, q_len, k_len, d, dtype):
    """The GPU's fast dense path (SDPA) computes the reference's attention, bottom-right aligned, with
    GQA, into a strided out (CPU SDPA here: the same function the GPU path calls)."""
    b = 2
    q, k, v = ref.make_qkv(q_len * 7 + d, b, hkv * group, hkv, q_len, k_len, d, dtype)
    scale = d**-0.5
    buf = torch.full((b, q_len, hkv * group, d), float("nan"), dtype=dtype)
    result = dense_attention_sdpa(q, k, v, scale=scale, out=buf.transpose(1, 2))
    assert result.data_ptr() == buf.data_ptr()
    assert_matches_reference(buf.transpose(1, 2), ref.attention_reference(q, k, v, scale=scale), dtype,
                             "dense_attention_sdpa")


def test_fast_dense_attention_keeps_the_reference_where_sdpa_cannot_express_the_call():
    """Soft-cap, a window shorter than the keys and key padding are not SDPA calls: ``sdpa_supports``
    refuses them, and ``fast_dense_attention`` (the reference on the CPU anyway) equals the reference."""
    assert sdpa_supports(64, 64, window=None, softcap=None, key_padding_mask=None)
    assert sdpa_supports(64, 64, window=64, softcap=None, key_padding_mask=None)  # the window sees every key
    assert not sdpa_supports(64, 64, window=63, softcap=None, key_padding_mask=None)
    assert not sdpa_supports(64, 64, window=None, softcap=30.0, key_padding_mask=None)
    assert not sdpa_supports(64, 64, window=None, softcap=None, key_padding_mask=torch.ones(1, 64, dtype=torch.bool))
    assert not sdpa_supports(1 << 14, 1 << 15, window=None, softcap=None, key_padding_mask=None)  # mask too big
    q, k, v = ref.make_qkv(3, 1, 4, 2, 40, 50, 32)
    out = torch.full_like(q, float("nan"))
    fast_dense_attention(q, k, v, scale=0.2, window=9, softcap=5.0, out=out)
    assert_matches_reference(out, ref.attention_reference(q, k, v, scale=0.2, window=9, softcap=5.0), torch.float32,
                             "fast_dense_attention")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_fast_dense_attention_on_the_gpu_runs_sdpa_and_matches_reference():
    q, k, v = (t.cuda() for t in ref.make_qkv(11, 1, 8, 2, 300, 300, 64, torch.bfloat16))
    out = torch.full_like(q, float("nan"))
    fast_dense_attention(q, k, v, scale=0.125, out=out)
    assert_matches_reference(out.cpu(), ref.attention_reference(q.cpu(), k.cpu(), v.cpu(), scale=0.125), torch.bfloat16,
                             "fast_dense_attention cuda")


# ------------------------------------------------------------------------------------------------
# argument checks


def test_sparse_kernels_reject_an_index_for_other_shapes():
    q, k, v = ref.make_qkv(0, 1, 2, 1, 32, 40, 8)
    wrong_len = ref.random_block_sparse_index(random.Random(0), 1, 2, 32, 41, 16, 16, 0.5)
    wrong_heads = ref.random_block_sparse_index(random.Random(0), 1, 3, 32, 40, 16, 16, 0.5)
    for index in (wrong_len, wrong_heads):
        with pytest.raises(ValueError):
            block_sparse_attention(q, k, v, index, scale=1.0)
    vs_wrong = ref.random_vertical_slash_index(random.Random(0), 2, 2, 32, 40, 16, 0.5)
    with pytest.raises(ValueError):
        vertical_slash_attention(q, k, v, vs_wrong, scale=1.0)


def test_kernels_reject_more_queries_than_keys_and_bad_kv_head_index():
    q, k, v = ref.make_qkv(0, 1, 2, 1, 32, 40, 8)
    index = ref.random_block_sparse_index(random.Random(0), 1, 2, 32, 40, 16, 16, 0.5)
    with pytest.raises(ValueError):
        block_sparse_attention(q, k, v, index, scale=1.0, kv_head_index=torch.tensor([0, 1]))  # only 1 KV head
    with pytest.raises(ValueError):
        block_sparse_attention(q, k, v, index, scale=1.0, kv_head_index=torch.tensor([0]))  # wrong length
    long_q, _, _ = ref.make_qkv(0, 1, 2, 1, 41, 40, 8)
    with pytest.raises(ValueError):
        dense_attention(long_q, k, v, scale=1.0)
    with pytest.raises(ValueError):
        dense_attention(q[:, :1].repeat(1, 3, 1, 1), k.repeat(1, 2, 1, 1), v.repeat(1, 2, 1, 1), scale=1.0)  # 3 % 2


def test_index_dataclasses_reject_inconsistent_shapes():
    z = lambda *s: torch.zeros(*s, dtype=torch.int32)  # noqa: E731
    with pytest.raises(ValueError):
        BlockSparseIndex(z(1, 1, 2), z(1, 1, 3, 1), 16, 16, 20, 20)  # block_index vs block_count
    with pytest.raises(ValueError):
        BlockSparseIndex(z(1, 1, 3), z(1, 1, 3, 1), 16, 16, 20, 20)  # 3 query blocks for Lq=20
    with pytest.raises(TypeError):
        BlockSparseIndex(z(1, 1, 2).float(), z(1, 1, 2, 1), 16, 16, 20, 20)
    with pytest.raises(ValueError):
        VerticalSlashIndex(z(1, 1, 2), z(1, 1, 2, 1), z(1, 1, 2, 2), z(1, 1, 2), z(1, 1, 2, 1), 16, 20, 20)


@pytest.mark.parametrize("kind", KINDS + ["dense"])
def test_kernels_accept_non_contiguous_hf_layout_inputs(kind):
    """q/k/v as ``transpose(1, 2)`` views of ``[B, L, H, D]`` buffers, as transformers produces."""
    b, hq, hkv, q_len, k_len, d = 2, 4, 2, 37, 60, 16
    q0, k0, v0 = ref.make_qkv(31, b, hq, hkv, q_len, k_len, d)
    q, k, v = (t.transpose(1, 2).contiguous().transpose(1, 2) for t in (q0, k0, v0))
    assert not q.is_contiguous()
    if kind == "dense":
        listed = None
        out, _ = dense_attention(q, k, v, scale=0.25, window=20)
    else:
        index, listed = make_sparse_case(kind, random.Random(31), b=b, hq=hq, q_len=q_len, k_len=k_len, bq=16, bk=16, density=0.5)
        out = run_sparse(kind, q, k, v, index, scale=0.25, window=20)
    expected = ref.attention_reference(q0, k0, v0, scale=0.25, listed=listed, window=20)
    assert_matches_reference(out, expected, torch.float32, kind)
