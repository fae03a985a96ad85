"""The Triton block-recall kernel (``vertical_slash/triton_recall.py``) against its reference
(``recall.window_recall`` over each checked block): fresh random inputs, odd and chunked lengths,
several head dims, GQA ratios, block sizes and soft-capping, on the CPU interpreter and the GPU."""

from __future__ import annotations

import pytest
import torch

triton = pytest.importorskip("triton", reason="Triton is not importable on this machine")

from sparseprefill.kernels.common import compact  # noqa: E402
from sparseprefill.kernels.recall import window_recall  # noqa: E402
from sparseprefill.kernels.vertical_slash import build_vertical_slash_index  # noqa: E402
from sparseprefill.kernels.vertical_slash.triton_recall import block_recall_triton  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
DTYPES = [torch.float32, torch.float16] + ([torch.bfloat16] if DEVICE == "cuda" else [])
ABS_TOL = {torch.float32: 2e-5, torch.float16: 2e-3, torch.bfloat16: 1e-2}
SPLIT_KEYS = 64  # keys per program when the tests split them: several parts on these short inputs

# (batch, q heads, kv heads, Lq, Lk, head_dim, block, softcap, column share, diagonal share)
CASES = [
    (2, 4, 2, 77, 101, 64, 32, None, 0.2, 0.1),
    (1, 7, 1, 70, 70, 80, 32, None, 0.1, 0.3),
    (1, 2, 2, 130, 130, 128, 64, None, 0.05, 0.02),
    (1, 2, 1, 90, 90, 256, 16, 30.0, 0.2, 0.2),
    (1, 3, 3, 33, 150, 64, 16, 20.0, 0.1, 0.1),
    (1, 2, 1, 161, 161, 64, 64, None, 0.0, 0.0),  # nothing listed: recall 0 (diagonal rows aside)
    (1, 2, 1, 161, 161, 64, 64, None, 1.0, 1.0),  # everything listed: recall 1
]


def _window_recall_per_block(index, q, k, blocks, kw) -> torch.Tensor:
    """The reference: ``window_recall`` in fp32 over each checked block's rows, meaned -> ``[B, H, nb]``."""
    block, q_len = index.block_size_q, q.shape[2]
    return torch.stack([
        window_recall([index], q.float(), k.float(), r * block, min(r * block + block, q_len), **kw)[0].mean(-1)
        for r in blocks.tolist()
    ], dim=-1)


def _case_id(c):
    return f"B{c[0]}H{c[1]}/{c[2]}L{c[3]}x{c[4]}D{c[5]}bs{c[6]}c{c[7]}v{c[8]}s{c[9]}"


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("case", CASES, ids=_case_id)
def test_block_recall_kernel_matches_window_recall(case, dtype):
    b, hq, hkv, lq, lk, d, block, softcap, column_share, diagonal_share = case
    g = torch.Generator(device="cpu").manual_seed(hash(case) % 2**31)
    make = lambda *shape: (2 * torch.randn(*shape, generator=g)).to(device=DEVICE, dtype=dtype)  # noqa: E731
    q, k = make(b, hq, lq, d), make(b, hkv, lk, d)
    vertical_count, vertical_index = compact(torch.rand(b, hq, lk, generator=g) < column_share)
    slash_count, slash_offset = compact(torch.rand(b, hq, lk, generator=g) < diagonal_share)
    index = build_vertical_slash_index(*(t.to(DEVICE) for t in (vertical_index, vertical_count, slash_offset,
                                                                  slash_count)), q_len=lq, k_len=lk, block_size_q=block)
    kv_head_index = torch.arange(hq, device=DEVICE) // (hq // hkv)
    n_blocks = -(-lq // block)
    blocks = torch.tensor(sorted({0, n_blocks // 2, n_blocks - 1}), device=DEVICE)
    kw = dict(scale=d**-0.5, softcap=softcap, kv_head_index=kv_head_index)
    got = block_recall_triton(q, k, index, blocks, **kw)
    assert not torch.isnan(got).any()
    torch.testing.assert_close(got, _window_recall_per_block(index, q, k, blocks, kw), atol=ABS_TOL[dtype], rtol=0)
    if column_share == diagonal_share == 1.0:
        torch.testing.assert_close(got, torch.ones_like(got), atol=ABS_TOL[dtype], rtol=0)
    # The keys split over programs (SPLIT_KEYS: 2-3 parts here) and folded: the same recall.
    split = block_recall_triton(q, k, index, blocks, split_keys=SPLIT_KEYS, **kw)
    torch.testing.assert_close(split, got, atol=1e-5, rtol=0)


def test_block_recall_kernel_with_no_blocks():
    q = torch.randn(1, 2, 64, 64, device=DEVICE)
    index = build_vertical_slash_index(*(t.to(DEVICE) for t in (
        torch.zeros(1, 2, 1, dtype=torch.int32), torch.zeros(1, 2, dtype=torch.int32),
        torch.zeros(1, 2, 1, dtype=torch.int32), torch.ones(1, 2, dtype=torch.int32))),
        q_len=64, k_len=64, block_size_q=64)
    got = block_recall_triton(q, q, index, torch.tensor([], dtype=torch.long), scale=0.125, softcap=None,
                              kv_head_index=torch.arange(2, device=DEVICE))
    assert got.shape == (1, 2, 0)


# (batch, q heads, kv heads, Lq, Lk, head_dim, block, softcap, mass)
BLOCK_CASES = [
    (2, 4, 2, 77, 101, 64, 16, None, 0.5),
    (1, 7, 1, 130, 130, 80, 32, None, 0.8),
    (1, 2, 2, 150, 150, 128, 64, 30.0, 0.3),
    (1, 3, 3, 33, 150, 64, 16, None, 0.6),
    (1, 2, 1, 161, 161, 64, 32, None, 1.0),  # every visible block kept: recall 1
]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("case", BLOCK_CASES, ids=lambda c: f"B{c[0]}H{c[1]}/{c[2]}L{c[3]}x{c[4]}D{c[5]}bs{c[6]}c{c[7]}m{c[8]}")
def test_block_sparse_recall_kernel_matches_window_recall(case, dtype):
    """A block-sparse index's checked rows, as ranges through the same kernel (``rows_per_check``)."""
    from sparseprefill.kernels import select_blocks
    from sparseprefill.kernels.block_sparse.triton_recall import block_sparse_recall_triton

    b, hq, hkv, lq, lk, d, block, softcap, mass = case
    g = torch.Generator(device="cpu").manual_seed(hash(case) % 2**31)
    make = lambda *shape: (2 * torch.randn(*shape, generator=g)).to(device=DEVICE, dtype=dtype)  # noqa: E731
    q, k = make(b, hq, lq, d), make(b, hkv, lk, d)
    n_q, n_k = -(-lq // block), -(-lk // block)
    index = select_blocks(torch.rand(b, hq, n_q, n_k, generator=g).to(DEVICE), q_len=lq, k_len=lk,
                          block_size_q=block, block_size_k=block, mass=mass, sink_blocks=0)
    kv_head_index = torch.arange(hq, device=DEVICE) // (hq // hkv)
    blocks = torch.tensor(sorted({0, n_q // 2, n_q - 1}))
    kw = dict(scale=d**-0.5, softcap=softcap, kv_head_index=kv_head_index)
    got = block_sparse_recall_triton(q, k, index, blocks, **kw)
    assert not torch.isnan(got).any()
    torch.testing.assert_close(got, _window_recall_per_block(index, q, k, blocks, kw), atol=ABS_TOL[dtype], rtol=0)
    if mass == 1.0:
        torch.testing.assert_close(got, torch.ones_like(got), atol=ABS_TOL[dtype], rtol=0)
    # Each row's recall (the spot check's quantile): the naive twin's rows, NaN exactly past the prompt.
    from sparseprefill.kernels.vertical_slash.naive import block_recall_naive

    torch.testing.assert_close(block_sparse_recall_triton(q, k, index, blocks, split_keys=SPLIT_KEYS, **kw), got,
                               atol=1e-5, rtol=0)
    rows = block_sparse_recall_triton(q, k, index, blocks, per_row=True, split_keys=SPLIT_KEYS, **kw)
    expected = block_recall_naive(q.float(), k.float(), index, blocks, per_row=True, **kw)
    assert rows.shape == (b, hq, blocks.numel(), block)
    outside = (blocks[:, None] * block + torch.arange(block) >= lq).to(DEVICE).expand_as(rows)
    assert torch.equal(torch.isnan(rows), outside) and torch.equal(torch.isnan(expected), outside)
    torch.testing.assert_close(rows[~outside], expected[~outside], atol=ABS_TOL[dtype], rtol=0)
    torch.testing.assert_close(rows.nanmean(-1), got, atol=1e-5, rtol=0)


def test_a_split_that_is_not_a_multiple_of_the_key_tiles_is_refused():
    q = torch.randn(1, 2, 64, 64, device=DEVICE)
    index = build_vertical_slash_index(*(t.to(DEVICE) for t in (
        torch.zeros(1, 2, 1, dtype=torch.int32), torch.zeros(1, 2, dtype=torch.int32),
        torch.zeros(1, 2, 1, dtype=torch.int32), torch.ones(1, 2, dtype=torch.int32))), q_len=64, k_len=64,
        block_size_q=64)
    with pytest.raises(ValueError, match="split_keys must be a positive multiple of the key tiles"):
        block_recall_triton(q, q, index, torch.tensor([0]), scale=0.125, softcap=None,
                            kv_head_index=torch.arange(2, device=DEVICE), split_keys=48)
