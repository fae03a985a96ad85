"""``blocks_with_columns_index`` (kept KV blocks + per-head columns -> one vertical-slash index) against
its loop-per-block twin and against the key sets it must list; the vertical-slash kernels attend it
exactly (CPU reference always; the Triton kernel in the interpreter or compiled on the GPU)."""

from __future__ import annotations

import random

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from sparseprefill.kernels import vertical_slash_attention
from sparseprefill.kernels.geometry import query_block_bounds
from sparseprefill.kernels.vertical_slash import blocks_with_columns_index, blocks_with_columns_index_naive

from tests import reference as ref
from tests.reference import torch_single_thread  # noqa: F401  (autouse fixture)

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def _case(seed: int, b: int, h: int, q_len: int, k_len: int, bq: int, bk: int, density: float, n_columns: int):
    rng = random.Random(seed)
    blocks = ref.random_block_sparse_index(rng, b, h, q_len, k_len, bq, bk, density)
    vi, vc, *_ = ref.random_lines(rng, b, h, k_len, n_columns, 0)
    return blocks, vi.to(torch.int32), vc.to(torch.int32)


def _expected_mask(blocks, vi, vc) -> torch.Tensor:
    """``[B, H, Lq, Lk]``: the block keys plus each head's real columns, for the rows of every query
    block whose last row can see the column."""
    mask = ref.block_sparse_listed_mask(blocks)
    _, last_row = query_block_bounds(blocks.q_len, blocks.k_len, blocks.block_size_q)
    for b in range(vc.shape[0]):
        for h in range(vc.shape[1]):
            for c in vi[b, h, : int(vc[b, h])].tolist():
                for r, last in enumerate(last_row.tolist()):
                    if c <= last:
                        rows = ref.block_rows(r, blocks.block_size_q, blocks.q_len)
                        mask[b, h, rows.start: rows.stop, c] = True
    return mask


@settings(max_examples=60, deadline=None, suppress_health_check=list(HealthCheck))
@given(
    seed=st.integers(0, 2**31 - 1),
    q_len=st.integers(1, 150),
    extra_keys=st.sampled_from([0, 0, 13, 70]),
    block_q=st.sampled_from([16, 32]),
    block_k=st.sampled_from([16, 32, 64]),
    density=st.sampled_from([0.0, 0.2, 0.6, 1.0]),
    n_columns=st.sampled_from([0, 1, 9, 40]),
    trim=st.booleans(),
)
def test_index_lists_the_blocks_and_the_visible_columns_once(seed, q_len, extra_keys, block_q, block_k, density,
                                                              n_columns, trim):
    blocks, vi, vc = _case(seed, 2, 3, q_len, q_len + extra_keys, block_q, block_k, density, n_columns)
    index = blocks_with_columns_index(blocks, vi, vc, trim=trim)
    assert index.lists_same_entries(blocks_with_columns_index_naive(blocks, vi, vc))
    assert torch.equal(ref.vertical_slash_listed_mask(index), _expected_mask(blocks, vi, vc))
    assert int(ref.vertical_slash_key_multiplicity(index).max()) <= 1, "a key listed twice would count twice"
    # Runs of consecutive blocks are one range: no range ends where the next one starts.
    for row in zip(index.range_count.flatten().tolist(), index.range_start.flatten(0, 2).tolist(),
                   index.range_end.flatten(0, 2).tolist()):
        count, starts, ends = row
        assert all(ends[i] < starts[i + 1] for i in range(count - 1))
    if not trim:
        assert index.range_start.shape[-1] == blocks.block_index.shape[-1]
        assert index.column_index.shape[-1] == vi.shape[-1]


def test_refuses_columns_of_other_heads():
    blocks, vi, vc = _case(0, 1, 2, 64, 64, 16, 16, 0.5, 4)
    with pytest.raises(ValueError, match="columns cover"):
        blocks_with_columns_index(blocks, vi[:, :1], vc[:, :1])


@pytest.mark.parametrize("case", [
    # (batch, q heads, kv heads, Lq, Lk, head_dim, block_q, block_k): odd lengths, GQA 1/3, Lq < Lk
    (1, 2, 2, 77, 77, 64, 16, 32),
    (2, 3, 1, 45, 120, 32, 32, 16),
    (1, 4, 2, 130, 130, 128, 32, 32),
])
def test_vertical_slash_kernel_attends_exactly_the_listed_keys(case):
    b, hq, hkv, lq, lk, d, bq, bk = case
    blocks, vi, vc = _case(lq, b, hq, lq, lk, bq, bk, 0.3, 12)
    index = blocks_with_columns_index(blocks, vi, vc)
    q, k, v = ref.make_qkv(lq, b, hq, hkv, lq, lk, d, spread=2.0)
    kv_head_index = torch.arange(hq) // (hq // hkv)
    expected = ref.attention_reference(q, k, v, scale=d**-0.5, listed=_expected_mask(blocks, vi, vc),
                                       kv_head_index=kv_head_index)
    out = torch.full_like(q, float("nan"))
    vertical_slash_attention(q, k, v, index, scale=d**-0.5, kv_head_index=kv_head_index, out=out)
    torch.testing.assert_close(out.double(), expected, atol=1e-5, rtol=1e-5)
    pytest.importorskip("triton", reason="Triton is not importable on this machine")
    from sparseprefill.kernels.vertical_slash.triton_attention import vertical_slash_attention_triton

    dev = lambda t: t.to(DEVICE)  # noqa: E731
    on_device = blocks_with_columns_index(
        type(blocks)(block_count=dev(blocks.block_count), block_index=dev(blocks.block_index),
                     block_size_q=bq, block_size_k=bk, q_len=lq, k_len=lk), dev(vi), dev(vc))
    out = torch.full_like(q, float("nan"), device=DEVICE)
    vertical_slash_attention_triton(dev(q), dev(k), dev(v), on_device, scale=d**-0.5, window=None, softcap=None,
                                    kv_head_index=dev(kv_head_index), out=out)
    assert not torch.isnan(out).any(), "output has unwritten (NaN) elements"
    torch.testing.assert_close(out.double().cpu(), expected, atol=1e-4, rtol=1e-4)
