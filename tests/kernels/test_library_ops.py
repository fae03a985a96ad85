"""The registered ``torch.library`` ops: ``opcheck`` (schema, fake tensors, dispatch) and equality
with the public functions."""

from __future__ import annotations

import math

import pytest
import torch

from sparseprefill.kernels import build_vertical_slash_index, select_blocks
from sparseprefill.kernels import library  # registers the ops
from sparseprefill.kernels.block_sparse import block_sparse_attention, blocks_with_columns
from sparseprefill.kernels.common import compact
from sparseprefill.kernels.vertical_slash import vertical_slash_attention

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def _qkv(hq=4, hkv=2, lq=70, lk=90, d=32, seed=0):
    g = torch.Generator().manual_seed(seed)
    make = lambda *s: torch.randn(*s, generator=g).to(DEVICE)  # noqa: E731
    return make(1, hq, lq, d), make(1, hkv, lk, d), make(1, hkv, lk, d)


@pytest.mark.parametrize("window,softcap,columns", [(0, 0.0, False), (20, 0.0, False), (0, 30.0, False),
                                                    (20, 0.0, True)])
def test_block_sparse_op_passes_opcheck_and_matches(window, softcap, columns):
    q, k, v = _qkv()
    index = select_blocks(torch.rand(1, 4, 3, 3, device=DEVICE), q_len=70, k_len=90, block_size_q=32,
                          block_size_k=32, mass=0.7)
    if columns:
        picked = torch.tensor([3, 40, 41, 77], dtype=torch.int32, device=DEVICE).expand(1, 4, 4)
        index = blocks_with_columns(index, picked, torch.full((1, 4), 4, dtype=torch.int32, device=DEVICE))
    kvh = torch.arange(4, device=DEVICE) // 2
    out = torch.full_like(q, float("nan"))
    args = (q, k, v, index.block_count, index.block_index, kvh, out, 32, 32, 0.2, window, softcap,
            index.column_count, index.column_index)
    torch.library.opcheck(torch.ops.sparseprefill.block_sparse_attention.default, args)
    library.call_block_sparse(q, k, v, index, scale=0.2, window=window, softcap=softcap, kv_head_index=kvh, out=out)
    expected = block_sparse_attention(q, k, v, index, scale=0.2, window=window or None, softcap=softcap or None)
    torch.testing.assert_close(out, expected)


@pytest.mark.parametrize("column_layout", ["block", "head"])
def test_vertical_slash_op_passes_opcheck_and_matches(column_layout):
    q, k, v = _qkv(seed=1)
    vc, vi = compact((torch.rand(1, 4, 90) < 0.2).to(DEVICE))
    sc, so = compact((torch.rand(1, 4, 90) < 0.1).to(DEVICE))
    index = build_vertical_slash_index(vi, vc, so, sc, q_len=70, k_len=90, block_size_q=32,
                                       column_layout=column_layout)
    kvh = torch.arange(4, device=DEVICE) // 2
    out = torch.full_like(q, float("nan"))
    args = (q, k, v, index.range_count, index.range_start, index.range_end, index.column_count,
            index.column_index, kvh, out, 32, 0.2, 0, 0.0, 0, index.column_cover, index.ranges_per_head)
    torch.library.opcheck(torch.ops.sparseprefill.vertical_slash_attention.default, args)
    library.call_vertical_slash(q, k, v, index, scale=0.2, window=None, softcap=None, kv_head_index=kvh, out=out)
    torch.testing.assert_close(out, vertical_slash_attention(q, k, v, index, scale=0.2))


def test_ops_compile_without_graph_breaks():
    q, k, v = _qkv(seed=2)
    index = select_blocks(torch.rand(1, 4, 3, 3, device=DEVICE), q_len=70, k_len=90, block_size_q=32,
                          block_size_k=32, mass=0.7)
    kvh = torch.arange(4, device=DEVICE) // 2

    def attend(q, k, v, count, ids):
        out = torch.empty_like(q)
        torch.ops.sparseprefill.block_sparse_attention(q, k, v, count, ids, kvh, out, 32, 32, 0.2, 0, 0.0)
        return out * 2

    compiled = torch.compile(attend, fullgraph=True, backend="aot_eager")
    torch.testing.assert_close(compiled(q, k, v, index.block_count, index.block_index),
                               attend(q, k, v, index.block_count, index.block_index))


def test_vertical_slash_lines_op_passes_opcheck_matches_and_compiles():
    from sparseprefill.kernels.vertical_slash import vertical_slash_lines, vertical_slash_lines_attention

    q, k, v = _qkv(seed=3)
    vc, vi = compact((torch.rand(1, 4, 90) < 0.2).to(DEVICE))
    sc, so = compact((torch.rand(1, 4, 90) < 0.1).to(DEVICE))
    lines = vertical_slash_lines(vi, vc, so, sc, q_len=70, k_len=90, block_size_q=32)
    kvh = torch.arange(4, device=DEVICE) // 2
    out = torch.full_like(q, float("nan"))
    args = (q, k, v, vi, vc, so, sc, lines.block_pairs, kvh, out, 32, 0.2, 0, 0.0, True)
    torch.library.opcheck(torch.ops.sparseprefill.vertical_slash_lines_attention.default, args)
    library.call_vertical_slash_lines(q, k, v, lines, scale=0.2, window=None, softcap=None, kv_head_index=kvh,
                                      out=out, lines_sorted=True)
    expected_lines = vertical_slash_lines(vi, vc, so, sc, q_len=70, k_len=90, block_size_q=32)
    torch.testing.assert_close(out, vertical_slash_lines_attention(q, k, v, expected_lines, scale=0.2))
    assert torch.equal(lines.block_pairs, expected_lines.block_pairs)

    def attend(q, k, v, pairs):
        out = torch.empty_like(q)
        torch.ops.sparseprefill.vertical_slash_lines_attention(q, k, v, vi, vc, so, sc, pairs, kvh, out, 32, 0.2,
                                                               0, 0.0, True)
        return out * 2, pairs.sum()

    pairs = torch.empty_like(lines.block_pairs)
    compiled_out, compiled_pairs = torch.compile(attend, fullgraph=True, backend="aot_eager")(q, k, v, pairs)
    torch.testing.assert_close(compiled_out, 2 * out)
    assert int(compiled_pairs) == int(lines.block_pairs.sum())


@pytest.mark.parametrize("per_row", [False, True], ids=["block_means", "per_row"])
@pytest.mark.parametrize("columns", [False, True])
def test_block_recall_op_passes_opcheck_and_matches(columns, per_row):
    from sparseprefill.kernels.block_sparse import block_sparse_block_recall

    q, k, _ = _qkv(seed=3)
    index = select_blocks(torch.rand(1, 4, 3, 3, device=DEVICE), q_len=70, k_len=90, block_size_q=32,
                          block_size_k=32, mass=0.5)
    if columns:
        picked = torch.tensor([3, 40, 77], dtype=torch.int32, device=DEVICE).expand(1, 4, 3)
        index = blocks_with_columns(index, picked, torch.full((1, 4), 3, dtype=torch.int32, device=DEVICE))
    kvh = torch.arange(4, device=DEVICE) // 2
    # opcheck compares outputs without equal_nan: per row it checks whole blocks (0 and 1), whose rows all
    # lie inside the prompt; the partial block 2 (NaN past row 70) is compared below.
    args = (q, k, index.block_count, index.block_index, kvh, [0, 1] if per_row else [0, 2], 32, 32, 0.2, 0.0,
            index.column_count, index.column_index, per_row)
    torch.library.opcheck(torch.ops.sparseprefill.block_sparse_block_recall.default, args)
    got = library.call_block_sparse_block_recall(q, k, index, [0, 2], scale=0.2, softcap=None, kv_head_index=kvh,
                                                 per_row=per_row)
    expected = block_sparse_block_recall(q, k, index, [0, 2], scale=0.2, kv_head_index=kvh, per_row=per_row)
    assert got.shape == ((1, 4, 2, 32) if per_row else (1, 4, 2))
    torch.testing.assert_close(got, expected, equal_nan=True)  # per row: NaN on rows 70-95, past the prompt


@pytest.mark.parametrize("share", [0.0, 0.05])
def test_antidiagonal_estimate_op_passes_opcheck_with_fixed_shapes(share):
    from sparseprefill.patterns.antidiagonal import antidiagonal_estimate_op

    q, k, _ = _qkv(seed=4)
    kvh = torch.arange(4, device=DEVICE) // 2
    args = (q, k, kvh, 0.2, 0.0, 4, 16, 0.7, 1, 0, False, False, share)
    torch.library.opcheck(torch.ops.sparseprefill.antidiagonal_estimate.default, args)
    count, index, column_count, column_index = antidiagonal_estimate_op(*args)
    # Widths known from the shapes alone: every key block, and ceil(share * Lk) columns.
    assert index.shape == (1, 4, 5, 6) and column_index.shape == (1, 4, 5, math.ceil(share * 90))
    assert bool((count >= 1).all()) and (share > 0 or int(column_count.sum()) == 0)
