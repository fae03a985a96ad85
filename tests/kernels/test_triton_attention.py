"""Triton kernels vs their fp32 ``naive.py`` twins.

On the CPU the kernels run in Triton's interpreter (small shapes; fp32 and fp16 inputs, since the
interpreter gets bf16 arithmetic wrong). On the GPU machine the same tests run compiled, bf16
included. Outputs are pre-filled with NaN so an unwritten tile fails.
"""

from __future__ import annotations

import random

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
import torch

triton = pytest.importorskip("triton", reason="Triton is not importable on this machine")

from sparseprefill.kernels import build_vertical_slash_index, select_blocks  # noqa: E402
from sparseprefill.kernels.block_sparse.naive import block_sparse_attention_naive  # noqa: E402
from sparseprefill.kernels.block_sparse.triton_attention import block_sparse_attention_triton  # noqa: E402
from sparseprefill.kernels.common import compact  # noqa: E402
from sparseprefill.kernels.vertical_slash.naive import vertical_slash_attention_naive  # noqa: E402
from sparseprefill.kernels.vertical_slash.triton_attention import vertical_slash_attention_triton  # noqa: E402

from tests import reference  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
DTYPES = [torch.float32, torch.float16] + ([torch.bfloat16] if DEVICE == "cuda" else [])
# Relative error bounds (||out - ref|| / ||ref||): fp32 is ~1e-6 on both devices (the kernels' fp32 dots
# are full precision, not Triton's default TF32, which gave ~1e-3 here); half precision operands land
# between 1e-4 (fp16) and 1e-2 (bf16).
REL_TOL = {torch.float32: 1e-4, torch.float16: 2e-3, torch.bfloat16: 1e-2}

# (batch, q heads, kv heads, Lq, Lk, head_dim, block, window, softcap): odd lengths, GQA 1/2/7,
# chunked (Lq < Lk), head dims 64/80/128/256, window and soft-cap.
CASES = [
    (2, 4, 2, 77, 101, 64, 32, None, None),
    (1, 7, 1, 70, 70, 80, 32, None, None),
    (1, 2, 2, 100, 100, 128, 32, 17, None),
    (1, 2, 1, 90, 90, 256, 16, None, 30.0),
    (1, 3, 3, 33, 150, 64, 16, 40, 20.0),
    (1, 2, 1, 200, 200, 256, 128, None, None),  # head_dim 256 splits a 128-row block into 64-row programs
]


def _inputs(case, dtype, seed):
    b, hq, hkv, lq, lk, d, _, _, _ = case
    g = torch.Generator(device="cpu").manual_seed(seed)
    make = lambda *shape: torch.randn(*shape, generator=g).to(device=DEVICE, dtype=dtype)  # noqa: E731
    return make(b, hq, lq, d), make(b, hkv, lk, d), make(b, hkv, lk, d)


def _rel_err(out, ref):
    assert not torch.isnan(out).any(), "output has unwritten (NaN) elements"
    return float((out.float() - ref).norm() / ref.norm().clamp_min(1e-30))


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("case", CASES, ids=lambda c: f"B{c[0]}H{c[1]}/{c[2]}L{c[3]}x{c[4]}D{c[5]}bs{c[6]}w{c[7]}c{c[8]}")
def test_block_sparse_triton_matches_naive(case, dtype):
    b, hq, hkv, lq, lk, d, block, window, softcap = case
    q, k, v = _inputs(case, dtype, seed=CASES.index(case))
    scores = torch.rand(b, hq, -(-lq // block), -(-lk // block), device=DEVICE)
    index = select_blocks(scores, q_len=lq, k_len=lk, block_size_q=block, block_size_k=block, mass=0.6)
    kv_head_index = torch.arange(hq, device=DEVICE) // (hq // hkv)
    kwargs = dict(scale=d**-0.5, window=window, softcap=softcap, kv_head_index=kv_head_index)
    ref = block_sparse_attention_naive(q, k, v, index, out=torch.full(q.shape, float("nan"), device=DEVICE), **kwargs)
    out = block_sparse_attention_triton(q, k, v, index, out=torch.full_like(q, float("nan")), **kwargs)
    assert _rel_err(out, ref) < REL_TOL[dtype]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("case", CASES, ids=lambda c: f"B{c[0]}H{c[1]}/{c[2]}L{c[3]}x{c[4]}D{c[5]}bs{c[6]}w{c[7]}c{c[8]}")
def test_vertical_slash_triton_matches_naive(case, dtype):
    b, hq, hkv, lq, lk, d, block, window, softcap = case
    q, k, v = _inputs(case, dtype, seed=CASES.index(case) + 101)
    g = torch.Generator(device="cpu").manual_seed(7)
    vertical_count, vertical_index = compact((torch.rand(b, hq, lk, generator=g) < 0.2).to(DEVICE))
    slash_count, slash_offset = compact((torch.rand(b, hq, lk, generator=g) < 0.1).to(DEVICE))
    index = build_vertical_slash_index(vertical_index, vertical_count, slash_offset, slash_count,
                                       q_len=lq, k_len=lk, block_size_q=block)
    kv_head_index = torch.arange(hq, device=DEVICE) // (hq // hkv)
    kwargs = dict(scale=d**-0.5, window=window, softcap=softcap, kv_head_index=kv_head_index)
    ref = vertical_slash_attention_naive(q, k, v, index, out=torch.full(q.shape, float("nan"), device=DEVICE), **kwargs)
    out = vertical_slash_attention_triton(q, k, v, index, out=torch.full_like(q, float("nan")), **kwargs)
    assert _rel_err(out, ref) < REL_TOL[dtype]


def test_triton_writes_into_strided_out_view():
    case = CASES[0]
    b, hq, hkv, lq, lk, d, block, _, _ = case
    q, k, v = _inputs(case, torch.float32, seed=3)
    index = select_blocks(torch.rand(b, hq, -(-lq // block), -(-lk // block), device=DEVICE), q_len=lq, k_len=lk,
                          block_size_q=block, block_size_k=block, mass=0.8)
    kv_head_index = torch.arange(hq, device=DEVICE) // (hq // hkv)
    buffer = torch.full((b, lq, hq, d), float("nan"), device=DEVICE)
    out = block_sparse_attention_triton(q, k, v, index, scale=d**-0.5, window=None, softcap=None,
                                        kv_head_index=kv_head_index, out=buffer.transpose(1, 2))
    ref = block_sparse_attention_naive(q, k, v, index, scale=d**-0.5, window=None, softcap=None,
                                       kv_head_index=kv_head_index, out=torch.empty_like(q))
    assert _rel_err(out, ref) < REL_TOL[torch.float32]
    assert out.data_ptr() == buffer.data_ptr()


@pytest.mark.parametrize("case", CASES, ids=lambda c: f"B{c[0]}H{c[1]}/{c[2]}L{c[3]}x{c[4]}D{c[5]}c{c[8]}")
@pytest.mark.parametrize("last_queries", [64, 20])
def test_line_scores_triton_match_naive(case, last_queries):
    from sparseprefill.kernels.vertical_slash.naive import vertical_slash_scores_naive
    from sparseprefill.kernels.vertical_slash.triton_estimate import vertical_slash_scores_triton

    b, hq, hkv, lq, lk, d, _, _, softcap = case
    q, k, _ = _inputs(case, torch.float32, seed=CASES.index(case) + 201)
    kv_head_index = torch.arange(hq, device=DEVICE) // (hq // hkv)
    kwargs = dict(scale=d**-0.5, last_queries=last_queries, softcap=softcap, kv_head_index=kv_head_index)
    vertical_ref, slash_ref = vertical_slash_scores_naive(q, k, **kwargs)
    vertical, slash = vertical_slash_scores_triton(q, k, **kwargs)
    # Probabilities (sums of at most 64 rows, each summing to 1): absolute error of fp32 rounding (full
    # fp32 dots on both devices), plus atomic summation order on the GPU.
    atol = 1e-6 if DEVICE == "cpu" else 1e-5
    torch.testing.assert_close(vertical, vertical_ref, atol=atol, rtol=0)
    torch.testing.assert_close(slash, slash_ref, atol=atol, rtol=0)


def _canonical(index):
    rows = []
    for b in range(index.range_count.shape[0]):
        for h in range(index.range_count.shape[1]):
            for r in range(index.range_count.shape[2]):
                n, c = int(index.range_count[b, h, r]), int(index.column_count[b, h, r])
                rows.append((index.range_start[b, h, r, :n].tolist(), index.range_end[b, h, r, :n].tolist(),
                             index.column_index[b, h, r, :c].tolist()))
    return rows


@pytest.mark.parametrize(
    "b,h,lq,lk,block,p_vertical,p_slash",
    [(2, 3, 77, 101, 16, 0.2, 0.1), (1, 2, 130, 200, 32, 0.05, 0.3), (1, 1, 64, 64, 16, 0.0, 0.05),
     (1, 2, 40, 300, 16, 0.5, 0.02), (2, 2, 100, 100, 32, 0.3, 0.0), (1, 2, 257, 257, 64, 0.1, 0.1)],
)
@pytest.mark.parametrize("head_runs", [False, True], ids=["visible_diagonals", "head_runs"])
def test_index_conversion_triton_matches_naive(b, h, lq, lk, block, p_vertical, p_slash, head_runs):
    from sparseprefill.kernels.vertical_slash.naive import build_vertical_slash_index_naive
    from sparseprefill.kernels.vertical_slash.triton_index import build_vertical_slash_index_triton

    g = torch.Generator(device="cpu").manual_seed(lq * 31 + lk)
    vertical_count, vertical_index = compact((torch.rand(b, h, lk, generator=g) < p_vertical).to(DEVICE))
    slash_count, slash_offset = compact((torch.rand(b, h, lk, generator=g) < p_slash).to(DEVICE))
    args = (vertical_index.long(), vertical_count, slash_offset.long(), slash_count)
    expected = build_vertical_slash_index_naive(*args, q_len=lq, k_len=lk, block_size_q=block)
    got = build_vertical_slash_index_triton(*args, q_len=lq, k_len=lk, block_size_q=block, head_runs=head_runs)
    assert _canonical(got) == _canonical(expected)
    # compact() lists ascending lines, as select_lines does: the builder may skip its sort then.
    presorted = build_vertical_slash_index_triton(*args, q_len=lq, k_len=lk, block_size_q=block, slashes_sorted=True,
                                                  head_runs=head_runs)
    assert _canonical(presorted) == _canonical(expected)
    assert torch.equal(presorted.block_pairs, got.block_pairs)
    # The kernel's own pair count (block_pairs) against the closed form over the naive lists.
    assert got.block_pairs is not None and expected.block_pairs is None
    assert torch.equal(got.computed_pairs(), expected.computed_pairs())


@st.composite
def _line_cases(draw, max_k_len: int, blocks: list[int], max_vertical: int, max_slash: int):
    """``(q_len, k_len, block, (vertical_index, vertical_count, slash_offset, slash_count))``: random
    unsorted line lists with garbage padding (``reference.random_lines``, 2 x 2 heads) on ``DEVICE``."""
    k_len = draw(st.integers(1, max_k_len))
    q_len = max(1, round(draw(st.floats(0.0, 1.0)) * k_len))
    block = draw(st.sampled_from(blocks))
    n_vertical, n_slash = draw(st.integers(0, max_vertical)), draw(st.integers(0, max_slash))
    vi, vc, so, sc, _, _ = reference.random_lines(random.Random(draw(st.integers(0, 2**16))), 2, 2, k_len,
                                                  n_vertical, n_slash)
    return q_len, k_len, block, tuple(t.to(DEVICE) for t in (vi, vc, so, sc))


# Index-builder properties: deterministic examples (the interpreter is slow, so no shrinking database).
INDEX_PROPERTY = dict(deadline=None, derandomize=True, database=None, suppress_health_check=[HealthCheck.too_slow])


@settings(max_examples=80, **INDEX_PROPERTY)
@given(_line_cases(max_k_len=160, blocks=[1, 3, 8, 16, 32, 64], max_vertical=40, max_slash=40))
def test_index_conversion_triton_matches_naive_on_unsorted_lines(case):
    """Unsorted offsets and garbage padding (the public contract): the launcher must sort them."""
    from sparseprefill.kernels.vertical_slash.naive import build_vertical_slash_index_naive
    from sparseprefill.kernels.vertical_slash.triton_index import build_vertical_slash_index_triton

    q_len, k_len, block, args = case
    expected = build_vertical_slash_index_naive(*args, q_len=q_len, k_len=k_len, block_size_q=block)
    for head_runs in (False, True):  # full-width blocks from visible diagonals or from the head's runs
        got = build_vertical_slash_index_triton(*args, q_len=q_len, k_len=k_len, block_size_q=block,
                                                head_runs=head_runs)
        assert _canonical(got) == _canonical(expected), head_runs
        assert got.lists_same_entries(expected) and expected.lists_same_entries(got)
        assert torch.equal(got.block_pairs.sum(-1), expected.computed_pairs()), head_runs


@pytest.mark.gpu
@pytest.mark.skipif(DEVICE != "cuda", reason="needs a CUDA device (the table alone is 11 GB)")
def test_vertical_slash_index_past_two_billion_entries():
    # At 128K a head that keeps ~100K columns makes a [B, H, blocks, columns] table of 14 x 2048 x
    # 100K = 2.9e9 entries: int32 head offsets overflowed there (an illegal memory access on the real
    # model's pass-key prompts). Heads 11-13 lie past 2^31 entries; check their rows exactly.
    hq, hkv, length, d, block, n_columns, local = 14, 2, 131072 - 37, 64, 64, 100_000, 64
    g = torch.Generator(device="cpu").manual_seed(0)
    q, k, v = (torch.randn(1, h, length, d, generator=g).to(DEVICE, torch.bfloat16) for h in (hq, hkv, hkv))
    columns = torch.arange(n_columns, device=DEVICE, dtype=torch.int32).expand(1, hq, -1).contiguous()
    diagonals = torch.arange(local, device=DEVICE, dtype=torch.int32).expand(1, hq, -1).contiguous()
    index = build_vertical_slash_index(
        columns, torch.full((1, hq), n_columns, device=DEVICE), diagonals, torch.full((1, hq), local, device=DEVICE),
        q_len=length, k_len=length, block_size_q=block)
    assert index.column_index.numel() > 2**31
    kv_head = torch.arange(hq, device=DEVICE) // (hq // hkv)
    out = torch.full_like(q, float("nan"))
    vertical_slash_attention_triton(q, k, v, index, scale=d**-0.5, window=None, softcap=None, kv_head_index=kv_head,
                                    out=out)
    errors = []
    for head in (0, 11, 13):
        for row in (5, 70_000, length - 1):
            # The index is per query block: diagonals 0..local-1 give every row of the block the keys
            # [block start - local + 1, block end], of which the causal mask keeps those <= row.
            band = torch.arange(max(0, (row // block) * block - local + 1), row + 1)
            keys = torch.unique(torch.cat([torch.arange(min(row + 1, n_columns)), band])).to(DEVICE)
            kh = int(kv_head[head])
            s = (q[0, head, row].float() @ k[0, kh, keys].float().T) * d**-0.5
            ref = torch.softmax(s, -1) @ v[0, kh, keys].float()
            errors.append((head, row, _rel_err(out[0, head, row], ref)))
    assert all(err < REL_TOL[torch.bfloat16] for _, _, err in errors), errors


def _check_pieces(pieces, whole, max_keys):
    """``pieces`` lists exactly ``whole``'s keys with no range wider than ``max_keys``, within its
    capacity, sorted and disjoint; columns and pair counts unchanged."""
    assert pieces.max_range_keys == max_keys
    assert int(pieces.range_count.max()) <= pieces.range_start.shape[-1], "piece count past the table's capacity"
    valid = pieces.range_valid()
    widths = torch.where(valid, pieces.range_end - pieces.range_start, 1)
    assert int(widths.min()) >= 1 and int(widths.max()) <= max_keys
    later = torch.where(valid[..., 1:], pieces.range_start[..., 1:], 2**30)
    assert bool((later >= torch.where(valid[..., :-1], pieces.range_end[..., :-1], -1)).all()), "pieces overlap"
    assert torch.equal(pieces.to_dense_mask(), whole.to_dense_mask())
    assert torch.equal(pieces.computed_pairs(), whole.computed_pairs())


@settings(max_examples=60, **INDEX_PROPERTY)
@given(_line_cases(max_k_len=200, blocks=[1, 8, 16, 64], max_vertical=20, max_slash=60),
       st.sampled_from([1, 5, 16, 32, 64]))
def test_range_pieces_triton_match_naive(case, max_keys):
    """The builder's range split (plan bound, then one program per index row) against
    ``split_ranges_naive`` of the naive index: same pieces in the same order, within capacity."""
    from sparseprefill.kernels.vertical_slash.naive import build_vertical_slash_index_naive, split_ranges_naive
    from sparseprefill.kernels.vertical_slash.triton_index import build_vertical_slash_index_triton

    q_len, k_len, block, args = case
    whole = build_vertical_slash_index_naive(*args, q_len=q_len, k_len=k_len, block_size_q=block)
    expected = split_ranges_naive(whole, max_keys)
    got = build_vertical_slash_index_triton(*args, q_len=q_len, k_len=k_len, block_size_q=block,
                                            max_range_keys=max_keys)
    assert _canonical(got) == _canonical(expected)
    _check_pieces(got, whole, max_keys)
    assert torch.equal(got.block_pairs.sum(-1), whole.computed_pairs())


def test_range_pieces_naive_on_dense_bands():
    """Every diagonal kept: one range per block, cut into ceil(width / max_keys) pieces."""
    from sparseprefill.kernels.vertical_slash.naive import build_vertical_slash_index_naive, split_ranges_naive

    length, block, max_keys = 150, 32, 20
    diagonals = torch.arange(length)[None, None]
    whole = build_vertical_slash_index_naive(torch.zeros(1, 1, 1, dtype=torch.long), torch.zeros(1, 1, dtype=torch.long),
                                             diagonals, torch.full((1, 1), length), q_len=length, k_len=length,
                                             block_size_q=block)
    pieces = split_ranges_naive(whole, max_keys)
    ends = torch.clamp((torch.arange(5) + 1) * block, max=length)
    assert pieces.range_count[0, 0].tolist() == [-(-int(e) // max_keys) for e in ends]
    _check_pieces(pieces, whole, max_keys)
    with pytest.raises(ValueError, match="max_keys must be >= 1"):
        split_ranges_naive(whole, 0)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("case", CASES, ids=lambda c: f"B{c[0]}H{c[1]}/{c[2]}L{c[3]}x{c[4]}D{c[5]}bs{c[6]}w{c[7]}c{c[8]}")
def test_vertical_slash_triton_on_range_pieces_matches_naive(case, dtype):
    """The kernel's flat range loop (ranges cut to its key tile) against the reference on the
    uncut index: the same keys, so the same output."""
    from sparseprefill.kernels.vertical_slash import range_piece_keys, split_ranges_naive

    b, hq, hkv, lq, lk, d, block, window, softcap = case
    q, k, v = _inputs(case, dtype, seed=31 * lq + d)
    g = torch.Generator(device="cpu").manual_seed(lk)
    vertical_count, vertical_index = compact((torch.rand(b, hq, lk, generator=g) < 0.1).to(DEVICE))
    slash_count, slash_offset = compact((torch.rand(b, hq, lk, generator=g) < 0.3).to(DEVICE))
    whole = build_vertical_slash_index(vertical_index, vertical_count, slash_offset, slash_count, q_len=lq, k_len=lk,
                                       block_size_q=block)
    max_keys = range_piece_keys(d, block, q.element_size())
    pieces = build_vertical_slash_index(vertical_index, vertical_count, slash_offset, slash_count, q_len=lq,
                                        k_len=lk, block_size_q=block, max_range_keys=max_keys)
    assert torch.equal(pieces.to_dense_mask(), split_ranges_naive(whole, max_keys).to_dense_mask())
    kvh = torch.arange(hq, device=DEVICE) // (hq // hkv)
    kw = dict(scale=d**-0.5, window=window, softcap=softcap, kv_head_index=kvh)
    out = torch.full_like(q, float("nan"))
    vertical_slash_attention_triton(q, k, v, pieces, out=out, **kw)
    ref = vertical_slash_attention_naive(q.float(), k.float(), v.float(), whole, out=torch.empty_like(q, dtype=torch.float32), **kw)
    assert _rel_err(out, ref) < REL_TOL[dtype]


# (batch, q heads, kv heads, Lq, Lk, head_dim, block, window, softcap): bands of up to ~300 keys.
def _check_both_vertical_slash_kernels(q, k, v, index, line_args, block, kw, **kernel_options):
    """The index kernel on ``index`` and the fused kernel on the same lines, each with
    ``kernel_options``, against the naive attention of ``index`` (fp32 tolerance, NaN-filled outputs)."""
    from sparseprefill.kernels.vertical_slash import vertical_slash_lines
    from sparseprefill.kernels.vertical_slash.triton_lines import vertical_slash_lines_attention_triton

    ref = vertical_slash_attention_naive(q, k, v, index, out=torch.empty_like(q), **kw)
    out = vertical_slash_attention_triton(q, k, v, index, out=torch.full_like(q, float("nan")), **kernel_options,
                                          **kw)
    assert _rel_err(out, ref) < REL_TOL[torch.float32]
    lines = vertical_slash_lines(*line_args, q_len=q.shape[2], k_len=k.shape[2], block_size_q=block)
    fused = vertical_slash_lines_attention_triton(q, k, v, lines, out=torch.full_like(q, float("nan")),
                                                  **kernel_options, **kw)
    assert _rel_err(fused, ref) < REL_TOL[torch.float32]


WIDE_TILE_CASES = [
    (1, 2, 1, 290, 290, 64, 32, None, None),
    (1, 2, 2, 257, 300, 128, 64, None, None),
    (1, 3, 1, 280, 280, 64, 32, 100, 20.0),
]


@pytest.mark.parametrize("wide_key_tile", [0, 16, 64, 128])
@pytest.mark.parametrize("case", WIDE_TILE_CASES, ids=lambda c: f"L{c[3]}x{c[4]}D{c[5]}bs{c[6]}w{c[7]}c{c[8]}")
def test_vertical_slash_triton_wide_range_tiles_match_naive(case, wide_key_tile):
    """Ranges walked as whole ``wide_key_tile``-key tiles, then narrow ones, in both vertical-slash
    kernels: dense bands make ranges long enough for several wide tiles and a partial rest."""

    b, hq, hkv, lq, lk, d, block, window, softcap = case
    q, k, v = _inputs(case, torch.float32, seed=7 * lq + wide_key_tile)
    g = torch.Generator(device="cpu").manual_seed(lk + wide_key_tile)
    vertical_count, vertical_index = compact((torch.rand(b, hq, lk, generator=g) < 0.1).to(DEVICE))
    slash_count, slash_offset = compact((torch.rand(b, hq, lk, generator=g) < 0.6).to(DEVICE))
    line_args = (vertical_index, vertical_count, slash_offset, slash_count)
    index = build_vertical_slash_index(*line_args, q_len=lq, k_len=lk, block_size_q=block)
    assert int((index.range_end - index.range_start).max()) > wide_key_tile + 32, "bands too short"
    kvh = torch.arange(hq, device=DEVICE) // (hq // hkv)
    kw = dict(scale=d**-0.5, window=window, softcap=softcap, kv_head_index=kvh)
    _check_both_vertical_slash_kernels(q, k, v, index, line_args, block, kw, wide_key_tile=wide_key_tile)


@pytest.mark.parametrize("bad", [48, 8])
def test_vertical_slash_wide_tile_must_be_a_triton_tile(bad):
    from sparseprefill.kernels.vertical_slash.triton_attention import vertical_slash_launch

    q = torch.zeros(1, 1, 4, 64, device=DEVICE)
    with pytest.raises(ValueError, match=f"power of two >= 16.*got {bad}"):
        vertical_slash_launch(q, 64, 1.0, None, None, wide_key_tile=bad)


# (batch, q heads, kv heads, Lq, Lk, head_dim, block, window, softcap): long enough for many tiles per
# row, a window (rows that start with fully masked tiles) and a soft-cap.
RESCALE_CASES = [
    (1, 2, 1, 260, 260, 64, 32, None, None),
    (1, 2, 2, 193, 230, 128, 64, 70, None),
    (1, 3, 1, 240, 240, 64, 32, None, 20.0),
]


def _rising_logit_inputs(case, seed):
    """q, k, v whose logits grow along the keys (later keys score up to ~4x the earlier ones), so a row's
    running max keeps rising from tile to tile by more than a small slack and less than a large one."""
    q, k, v = _inputs(case, torch.float32, seed)
    ramp = 1.0 + 3.0 * torch.arange(k.shape[2], device=DEVICE, dtype=torch.float32) / k.shape[2]
    return 3.0 * q, k * ramp[:, None], v


@pytest.mark.parametrize("rescale_slack", [0.0, 0.5, 8.0, 15.0])
@pytest.mark.parametrize("case", RESCALE_CASES, ids=lambda c: f"L{c[3]}x{c[4]}D{c[5]}bs{c[6]}w{c[7]}c{c[8]}")
def test_lazy_rescale_matches_naive(case, rescale_slack):
    """The online softmax's lazy rescale (``rescale_slack``) gives the reference softmax in the three
    prefill kernels: vertical-slash on its index and from lines, and block-sparse with columns."""
    from sparseprefill.kernels.block_sparse.columns import blocks_with_columns

    b, hq, hkv, lq, lk, d, block, window, softcap = case
    q, k, v = _rising_logit_inputs(case, seed=lq + int(4 * rescale_slack))
    g = torch.Generator(device="cpu").manual_seed(lk)
    vertical_count, vertical_index = compact((torch.rand(b, hq, lk, generator=g) < 0.15).to(DEVICE))
    slash_count, slash_offset = compact((torch.rand(b, hq, lk, generator=g) < 0.3).to(DEVICE))
    line_args = (vertical_index, vertical_count, slash_offset, slash_count)
    kvh = torch.arange(hq, device=DEVICE) // (hq // hkv)
    kw = dict(scale=d**-0.5, window=window, softcap=softcap, kv_head_index=kvh)

    index = build_vertical_slash_index(*line_args, q_len=lq, k_len=lk, block_size_q=block)
    _check_both_vertical_slash_kernels(q, k, v, index, line_args, block, kw, rescale_slack=rescale_slack)

    scores = torch.rand(b, hq, -(-lq // block), -(-lk // block), generator=g).to(DEVICE)
    blocks = select_blocks(scores, q_len=lq, k_len=lk, block_size_q=block, block_size_k=block, mass=0.5)
    blocks = blocks_with_columns(blocks, vertical_index, vertical_count)
    ref = block_sparse_attention_naive(q, k, v, blocks, out=torch.empty_like(q), **kw)
    out = block_sparse_attention_triton(q, k, v, blocks, out=torch.full_like(q, float("nan")),
                                        rescale_slack=rescale_slack, **kw)
    assert _rel_err(out, ref) < REL_TOL[torch.float32]


@pytest.mark.parametrize("bad", [-1.0, 16.0])
def test_rescale_slack_out_of_range_is_refused(bad):
    from sparseprefill.kernels.triton_common import checked_rescale_slack

    with pytest.raises(ValueError, match=r"rescale_slack must lie in \[0, 15\].*got"):
        checked_rescale_slack(bad)


@pytest.mark.parametrize("pieces", [False, True], ids=["whole", "pieces"])
@pytest.mark.parametrize("case", CASES, ids=lambda c: f"B{c[0]}H{c[1]}/{c[2]}L{c[3]}x{c[4]}D{c[5]}bs{c[6]}w{c[7]}c{c[8]}")
def test_vertical_slash_range_tiles_by_tensor_descriptor_match_naive(case, pieces):
    """``range_tma``: range tiles through tensor descriptors (zero-filled past Lk and past D: head dims
    80 and 256 pad their lanes), whole bands and range pieces, against the naive twin."""
    b, hq, hkv, lq, lk, d, block, window, softcap = case
    q, k, v = _inputs(case, torch.float32, seed=11 * lq + pieces)
    g = torch.Generator(device="cpu").manual_seed(lk)
    vertical_count, vertical_index = compact((torch.rand(b, hq, lk, generator=g) < 0.1).to(DEVICE))
    slash_count, slash_offset = compact((torch.rand(b, hq, lk, generator=g) < 0.3).to(DEVICE))
    index = build_vertical_slash_index(vertical_index, vertical_count, slash_offset, slash_count, q_len=lq, k_len=lk,
                                       block_size_q=block, max_range_keys=32 if pieces else None)
    kvh = torch.arange(hq, device=DEVICE) // (hq // hkv)
    kw = dict(scale=d**-0.5, window=window, softcap=softcap, kv_head_index=kvh)
    ref = vertical_slash_attention_naive(q, k, v, index, out=torch.empty_like(q), **kw)
    out = vertical_slash_attention_triton(q, k, v, index, out=torch.full_like(q, float("nan")), range_tma=True, **kw)
    assert _rel_err(out, ref) < REL_TOL[torch.float32]


@pytest.mark.parametrize("option", ["range_tma", "block_tma"])
def test_tma_key_tiles_refuse_unaligned_strides(option):
    q, k, v = _inputs(CASES[0], torch.float32, seed=3)
    k = torch.zeros(*k.shape[:-1], 66, device=DEVICE)[..., :64]  # row stride 66 fp32 = 264 bytes, not 16-byte
    b, hq, hkv, lq, lk, d, block, _, _ = CASES[0]
    kw = dict(scale=d**-0.5, window=None, softcap=None, kv_head_index=torch.arange(hq, device=DEVICE) // (hq // hkv))
    with pytest.raises(ValueError, match=rf"{option} needs K/V.*got strides \(13332, 6666, 66, 1\)"):
        if option == "range_tma":
            count, lines = compact(torch.ones(b, hq, 3, dtype=torch.bool, device=DEVICE))
            index = build_vertical_slash_index(lines, count, lines, count, q_len=lq, k_len=lk, block_size_q=block)
            vertical_slash_attention_triton(q, k, v, index, out=torch.empty_like(q), range_tma=True, **kw)
        else:
            scores = torch.rand(b, hq, -(-lq // block), -(-lk // block), device=DEVICE)
            index = select_blocks(scores, q_len=lq, k_len=lk, block_size_q=block, block_size_k=block, mass=0.5)
            block_sparse_attention_triton(q, k, v, index, out=torch.empty_like(q), block_tma=True, **kw)


def test_default_range_tiles_take_tma_only_where_it_can_address_kv():
    """The shipped policy: whole bands load by tensor descriptor where TMA can address K/V (Hopper or the
    interpreter), and fall back to pointers, with the same output, where it cannot; range pieces keep
    pointers."""
    from sparseprefill.kernels.triton_common import tma_by_default
    from sparseprefill.kernels.vertical_slash import triton_attention as module

    case = CASES[0]
    b, hq, hkv, lq, lk, d, block, _, _ = case
    q, k, v = _inputs(case, torch.float32, seed=8)
    strided = torch.zeros(*k.shape[:-1], 66, device=DEVICE)[..., :64]
    strided.copy_(k)
    assert tma_by_default(k, v) == (DEVICE == "cpu" or torch.cuda.get_device_capability()[0] >= 9)
    assert not tma_by_default(strided, v)
    g = torch.Generator(device="cpu").manual_seed(2)
    vertical_count, vertical_index = compact((torch.rand(b, hq, lk, generator=g) < 0.1).to(DEVICE))
    slash_count, slash_offset = compact((torch.rand(b, hq, lk, generator=g) < 0.3).to(DEVICE))
    index = build_vertical_slash_index(vertical_index, vertical_count, slash_offset, slash_count, q_len=lq, k_len=lk,
                                       block_size_q=block)
    kw = dict(scale=d**-0.5, window=None, softcap=None, kv_head_index=torch.arange(hq, device=DEVICE) // (hq // hkv))
    ref = vertical_slash_attention_naive(q, k, v, index, out=torch.empty_like(q), **kw)
    taken = []
    original = module.key_tile_descriptor
    module.key_tile_descriptor = lambda *args: taken.append(args[-1]) or original(*args)
    try:
        for keys in (k, strided):
            out = vertical_slash_attention_triton(q, keys, v, index, out=torch.full_like(q, float("nan")), **kw)
            assert _rel_err(out, ref) < REL_TOL[torch.float32]
    finally:
        module.key_tile_descriptor = original
    assert taken == (["range_tma", "range_tma"] if module.VERTICAL_SLASH_RANGE_TMA and tma_by_default(k, v) else [])


@pytest.mark.parametrize("case", CASES, ids=lambda c: f"B{c[0]}H{c[1]}/{c[2]}L{c[3]}x{c[4]}D{c[5]}bs{c[6]}w{c[7]}c{c[8]}")
def test_block_sparse_tiles_by_tensor_descriptor_match_naive(case):
    """``block_tma``: the block kernel's K/V tiles through tensor descriptors, with per-block columns
    (pointer loads) after them, against the naive twin."""
    from sparseprefill.kernels.block_sparse.columns import blocks_with_columns

    b, hq, hkv, lq, lk, d, block, window, softcap = case
    q, k, v = _inputs(case, torch.float32, seed=13 * lq)
    g = torch.Generator(device="cpu").manual_seed(lk)
    scores = torch.rand(b, hq, -(-lq // block), -(-lk // block), generator=g).to(DEVICE)
    index = select_blocks(scores, q_len=lq, k_len=lk, block_size_q=block, block_size_k=block, mass=0.6)
    vertical_count, vertical_index = compact((torch.rand(b, hq, lk, generator=g) < 0.05).to(DEVICE))
    index = blocks_with_columns(index, vertical_index, vertical_count)
    kvh = torch.arange(hq, device=DEVICE) // (hq // hkv)
    kw = dict(scale=d**-0.5, window=window, softcap=softcap, kv_head_index=kvh)
    ref = block_sparse_attention_naive(q, k, v, index, out=torch.empty_like(q), **kw)
    out = block_sparse_attention_triton(q, k, v, index, out=torch.full_like(q, float("nan")), block_tma=True, **kw)
    assert _rel_err(out, ref) < REL_TOL[torch.float32]
