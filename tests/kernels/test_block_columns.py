"""Single key columns in a block-sparse index: ``blocks_with_columns`` against its loop-per-block twin
and the key sets it must list; the block kernels (CPU reference; Triton in the interpreter on the CPU,
compiled on the GPU) attend blocks and columns exactly, count their pairs, and drop emptied heads."""

from __future__ import annotations

import random
from dataclasses import replace

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from sparseprefill.kernels import block_sparse_attention
from sparseprefill.kernels.block_sparse import block_sparse_block_recall, blocks_with_columns, blocks_with_columns_naive
from sparseprefill.kernels.geometry import query_block_bounds
from sparseprefill.kernels.recall import index_recall

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


def _real_columns(index, b, h, r) -> list[int]:
    return index.column_index[b, h, r, : int(index.column_count[b, h, r])].tolist()


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
def test_columns_are_the_visible_ones_outside_the_kept_blocks(seed, q_len, extra_keys, block_q, block_k, density,
                                                               n_columns, trim):
    blocks, vi, vc = _case(seed, 2, 3, q_len, q_len + extra_keys, block_q, block_k, density, n_columns)
    index = blocks_with_columns(blocks, vi, vc, trim=trim)
    twin = blocks_with_columns_naive(blocks, vi, vc)
    assert torch.equal(index.column_count, twin.column_count)
    assert torch.equal(index.block_count, blocks.block_count) and torch.equal(index.block_index, blocks.block_index)
    for b, h, r in torch.cartesian_prod(*(torch.arange(n) for n in blocks.block_count.shape)).tolist():
        columns = _real_columns(index, b, h, r)
        assert columns == _real_columns(twin, b, h, r) and columns == sorted(set(columns))
        kept = set(blocks.block_index[b, h, r, : int(blocks.block_count[b, h, r])].tolist())
        assert not {c // block_k for c in columns} & kept, "a key in a kept block and a column counts twice"
    assert torch.equal(ref.block_sparse_listed_mask(index), _expected_mask(blocks, vi, vc))
    assert torch.equal(index.to_dense_mask(), ref.block_sparse_listed_mask(index))
    expected_pairs = ref.pair_count(ref.block_sparse_listed_mask(index), index.q_len, index.k_len)
    assert torch.equal(index.computed_pairs(), expected_pairs)
    if not trim:
        assert index.column_index.shape[-1] == vi.shape[-1]


def test_refusals():
    blocks, vi, vc = _case(0, 1, 2, 64, 64, 16, 16, 0.5, 4)
    with pytest.raises(ValueError, match="columns cover"):
        blocks_with_columns(blocks, vi[:, :1], vc[:, :1])
    with pytest.raises(ValueError, match="already lists columns"):
        blocks_with_columns(blocks_with_columns(blocks, vi, vc), vi, vc)
    with pytest.raises(ValueError, match="both or neither"):
        replace(blocks, column_count=blocks.block_count)


CASES = [
    # (batch, q heads, kv heads, Lq, Lk, head_dim, block_q, block_k, window): odd lengths, GQA 1/3, Lq < Lk
    (1, 2, 2, 77, 77, 64, 16, 32, None),
    (2, 3, 1, 45, 120, 32, 32, 16, None),
    (1, 4, 2, 130, 130, 128, 32, 32, 40),
]


@pytest.mark.parametrize("case", CASES, ids=lambda c: f"B{c[0]}H{c[1]}/{c[2]}L{c[3]}x{c[4]}D{c[5]}w{c[8]}")
def test_block_kernels_attend_blocks_and_columns(case):
    b, hq, hkv, lq, lk, d, bq, bk, window = case
    blocks, vi, vc = _case(lq, b, hq, lq, lk, bq, bk, 0.3, 12)
    index = blocks_with_columns(blocks, vi, vc)
    q, k, v = ref.make_qkv(lq, b, hq, hkv, lq, lk, d, spread=2.0)
    kv_head_index = torch.arange(hq) // (hq // hkv)
    listed = _expected_mask(blocks, vi, vc)
    expected = ref.attention_reference(q, k, v, scale=d**-0.5, listed=listed, window=window,
                                       kv_head_index=kv_head_index)
    out = torch.full_like(q, float("nan"))
    block_sparse_attention(q, k, v, index, scale=d**-0.5, window=window, kv_head_index=kv_head_index, out=out)
    torch.testing.assert_close(out.double(), expected, atol=1e-5, rtol=1e-5)
    # The recall of the index counts the columns' mass too (the spot check reads it).
    rows = list(range(0, -(-lq // bq)))
    recall = block_sparse_block_recall(q, k, index, rows, scale=d**-0.5, kv_head_index=kv_head_index)
    probs = ref.dense_probs(q, k, scale=d**-0.5, kv_head_index=kv_head_index)
    per_row = (probs * listed).sum(-1)
    by_block = torch.stack([per_row[..., r * bq: (r + 1) * bq].mean(-1) for r in rows], dim=-1)
    torch.testing.assert_close(recall.double(), by_block.double(), atol=1e-5, rtol=1e-5)
    (recall_rows,) = index_recall([index], q, k, scale=d**-0.5, softcap=None, kv_head_index=kv_head_index)
    torch.testing.assert_close(recall_rows.double(), per_row.double(), atol=1e-5, rtol=1e-5)
    emptied = torch.zeros(b, hq, dtype=torch.bool)
    emptied[0, 0] = True
    assert int(index.without_heads(emptied).computed_pairs()[0, 0]) == 0

    pytest.importorskip("triton", reason="Triton is not importable on this machine")
    from sparseprefill.kernels.block_sparse.triton_attention import block_sparse_attention_triton

    dev = lambda t: t.to(DEVICE)  # noqa: E731
    on_device = replace(index, block_count=dev(index.block_count), block_index=dev(index.block_index),
                        column_count=dev(index.column_count), column_index=dev(index.column_index))
    out = torch.full_like(q, float("nan"), device=DEVICE)
    block_sparse_attention_triton(dev(q), dev(k), dev(v), on_device, scale=d**-0.5, window=window, softcap=None,
                                  kv_head_index=dev(kv_head_index), out=out)
    assert not torch.isnan(out).any(), "output has unwritten (NaN) elements"
    torch.testing.assert_close(out.double().cpu(), expected, atol=1e-4, rtol=1e-4)
