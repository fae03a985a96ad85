"""The fused vertical-slash kernel (``triton_lines.py``: ranges and columns derived from per-head lines
inside the kernel) against its fp32 twin (the per-block index of the same lines, attended exactly).

Outputs are pre-filled with NaN and the pair counts with -1, so an unwritten tile or block fails. The
lines are drawn to hit every case of the range derivation: runs below ``p0``, runs reaching ``p0``
(clipped at key 0), runs cut by visibility, neighbours exactly one block apart (touching bands),
columns inside bands, repeated and unsorted lines, odd lengths, chunked queries and GQA.
"""

from __future__ import annotations

import pytest
import torch

triton = pytest.importorskip("triton", reason="Triton is not importable on this machine")

from sparseprefill.kernels.common import compact  # noqa: E402
from sparseprefill.kernels.vertical_slash import (  # noqa: E402
    build_vertical_slash_index,
    vertical_slash_lines,
    vertical_slash_lines_attention,
    vertical_slash_lines_attention_naive,
)
from sparseprefill.kernels.vertical_slash.triton_lines import (  # noqa: E402
    plan_lines,
    vertical_slash_lines_attention_triton,
)

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
DTYPES = [torch.float32, torch.float16] + ([torch.bfloat16] if DEVICE == "cuda" else [])
REL_TOL = {torch.float32: 1e-4, torch.float16: 2e-3, torch.bfloat16: 1e-2}

# (batch, q heads, kv heads, Lq, Lk, head_dim, block, window, softcap, column share, diagonal share)
CASES = [
    (2, 4, 2, 77, 101, 64, 32, None, None, 0.2, 0.1),
    (1, 7, 1, 70, 70, 80, 32, None, None, 0.1, 0.3),
    (1, 2, 2, 100, 100, 128, 32, 17, None, 0.3, 0.05),
    (1, 2, 1, 90, 90, 256, 16, None, 30.0, 0.2, 0.2),
    (1, 3, 3, 33, 150, 64, 16, 40, 20.0, 0.1, 0.1),
    (1, 2, 1, 200, 200, 256, 128, None, None, 0.05, 0.02),  # 128-row blocks over 64-row programs
    (1, 2, 1, 161, 161, 64, 16, None, None, 0.5, 0.6),  # dense lines: long merged runs, clipped bands
]


def _case_id(c):
    return f"B{c[0]}H{c[1]}/{c[2]}L{c[3]}x{c[4]}D{c[5]}bs{c[6]}w{c[7]}c{c[8]}v{c[9]}s{c[10]}"


def _inputs(case, dtype, seed):
    b, hq, hkv, lq, lk, d = case[:6]
    g = torch.Generator(device="cpu").manual_seed(seed)
    make = lambda *shape: torch.randn(*shape, generator=g).to(device=DEVICE, dtype=dtype)  # noqa: E731
    return make(b, hq, lq, d), make(b, hkv, lk, d), make(b, hkv, lk, d)


def _random_lines(b, h, lk, column_share, diagonal_share, seed):
    g = torch.Generator(device="cpu").manual_seed(seed)
    vertical_count, vertical_index = compact(torch.rand(b, h, lk, generator=g) < column_share)
    slash_count, slash_offset = compact(torch.rand(b, h, lk, generator=g) < diagonal_share)
    return (t.to(DEVICE) for t in (vertical_index, vertical_count, slash_offset, slash_count))


def _rel_err(out, ref):
    assert not torch.isnan(out).any(), "output has unwritten (NaN) elements"
    return float((out.float() - ref.float()).norm() / ref.float().norm().clamp_min(1e-30))


def _run_both(case, dtype, lines_args, seed, lines_sorted=True):
    b, hq, hkv, lq, lk, d, block, window, softcap = case[:9]
    q, k, v = _inputs(case, dtype, seed)
    kv_head_index = torch.arange(hq, device=DEVICE) // (hq // hkv)
    kwargs = dict(scale=d**-0.5, window=window, softcap=softcap, kv_head_index=kv_head_index)
    ref_lines = vertical_slash_lines(*lines_args, q_len=lq, k_len=lk, block_size_q=block)
    ref = vertical_slash_lines_attention_naive(
        q.float(), k.float(), v.float(), ref_lines, out=torch.full(q.shape, float("nan"), device=DEVICE), **kwargs)
    lines = vertical_slash_lines(*lines_args, q_len=lq, k_len=lk, block_size_q=block)
    lines.block_pairs.fill_(-1)
    out = vertical_slash_lines_attention_triton(q, k, v, lines, out=torch.full_like(q, float("nan")),
                                                lines_sorted=lines_sorted, **kwargs)
    return out, ref, lines, ref_lines


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("case", CASES, ids=_case_id)
def test_lines_kernel_matches_naive(case, dtype):
    b, hq, _, _, lk = case[:5]
    lines_args = _random_lines(b, hq, lk, case[9], case[10], seed=CASES.index(case) + 11)
    out, ref, lines, ref_lines = _run_both(case, dtype, tuple(lines_args), seed=CASES.index(case))
    assert _rel_err(out, ref) < REL_TOL[dtype]
    assert torch.equal(lines.block_pairs, ref_lines.block_pairs), "per-block computed pairs differ"


def _shuffled(lines, counts, seed, repeat_first):
    """Each row's real entries in a random order (optionally the first one listed twice), -1 after."""
    g = torch.Generator(device="cpu").manual_seed(seed)
    rows, new_counts = [], []
    for row, count in zip(lines.reshape(-1, lines.shape[-1]).tolist(), counts.reshape(-1).tolist()):
        real = [row[i] for i in torch.randperm(count, generator=g).tolist()]
        if repeat_first and real:
            real.append(real[0])
        rows.append(real)
        new_counts.append(len(real))
    width = max(max(new_counts), 1)
    padded = torch.tensor([r + [-1] * (width - len(r)) for r in rows], dtype=torch.int32, device=DEVICE)
    return padded.reshape(*lines.shape[:-1], width), torch.tensor(new_counts, device=DEVICE).reshape(counts.shape)


@pytest.mark.parametrize("case", [CASES[0], CASES[4], CASES[6]], ids=_case_id)
def test_lines_kernel_sorts_unsorted_repeated_lines(case):
    """The contract of ``build_vertical_slash_index``: lines in any order; the GPU path sorts them
    (``lines_sorted=False``) and drops a repeated column, so the result is that of the sorted lines."""
    b, hq, _, _, lk = case[:5]
    vertical_index, vertical_count, slash_offset, slash_count = _random_lines(b, hq, lk, case[9], case[10], seed=5)
    shuffled_cols, shuffled_col_count = _shuffled(vertical_index, vertical_count, seed=6, repeat_first=True)
    shuffled_slashes, shuffled_slash_count = _shuffled(slash_offset, slash_count, seed=7, repeat_first=False)
    out, _, lines, _ = _run_both(case, torch.float32, (shuffled_cols, shuffled_col_count, shuffled_slashes,
                                                       shuffled_slash_count), seed=9, lines_sorted=False)
    _, ref, _, ref_lines = _run_both(case, torch.float32, (vertical_index, vertical_count, slash_offset, slash_count),
                                     seed=9)
    assert _rel_err(out, ref) < REL_TOL[torch.float32]
    assert torch.equal(lines.block_pairs, ref_lines.block_pairs)


def test_touching_and_clipped_bands():
    """Hand-placed diagonals: two exactly one block apart (their bands touch and merge), one run
    reaching p0 of later blocks (clipped at key 0), and one run cut by visibility."""
    case = (1, 1, 1, 96, 96, 64, 16, None, None)
    slashes = torch.tensor([[[0, 3, 19, 35, 52, 70, 71, 90, -1]]], device=DEVICE)
    verticals = torch.tensor([[[0, 5, 20, 40, 41, 60, 95, -1]]], device=DEVICE)
    lines_args = (verticals, torch.tensor([[7]], device=DEVICE), slashes, torch.tensor([[8]], device=DEVICE))
    out, ref, lines, ref_lines = _run_both(case, torch.float32, lines_args, seed=1)
    assert _rel_err(out, ref) < REL_TOL[torch.float32]
    assert torch.equal(lines.block_pairs, ref_lines.block_pairs)


def test_lines_describe_the_built_index():
    """``to_index`` is the index whose keys the fused kernel attends; its pair count agrees."""
    case = CASES[0]
    b, hq, _, lq, lk, d, block = case[:7]
    lines_args = tuple(_random_lines(b, hq, lk, 0.2, 0.1, seed=3))
    lines = vertical_slash_lines(*lines_args, q_len=lq, k_len=lk, block_size_q=block)
    q, k, v = _inputs(case, torch.float32, 4)
    vertical_slash_lines_attention(q, k, v, lines, scale=d**-0.5)
    index = build_vertical_slash_index(*lines_args, q_len=lq, k_len=lk, block_size_q=block)
    assert torch.equal(lines.computed_pairs(), index.computed_pairs())
    assert lines.to_index().lists_same_entries(index)


def test_plan_needs_no_host_read():
    """Every table the kernel reads is sized by the lines' shapes alone (O(lines) per head, no
    per-block line table), so nothing waits for the device."""
    b, h, lq, lk, block = 1, 2, 200, 200, 16
    lines_args = tuple(_random_lines(b, h, lk, 0.3, 0.3, seed=2))
    lines = vertical_slash_lines(*lines_args, q_len=lq, k_len=lk, block_size_q=block)
    plan = plan_lines(lines, lines_sorted=True)
    n_blocks = -(-lq // block)
    for name, t in plan.items():
        assert t.numel() <= 2 * b * h * max(lk + 2, n_blocks), f"{name} {tuple(t.shape)} grows past O(lines)"


def test_lines_refuse_mismatched_shapes():
    v = torch.zeros(1, 2, 4, dtype=torch.int32)
    with pytest.raises(ValueError, match="disagree"):
        vertical_slash_lines(v, torch.zeros(1, 3, dtype=torch.int32), v, torch.zeros(1, 2, dtype=torch.int32),
                             q_len=10, k_len=10, block_size_q=16)


@pytest.mark.parametrize("q_len,k_len", [(96, 96), (90, 90), (41, 120)])
def test_every_column_with_a_local_band(q_len, k_len):
    """Every key a column and diagonals 0..5 forced (plus a few far ones): the kernel skips the columns
    under the local band and must still attend the first column just below it, in every block (the
    last, shorter one and chunked queries included)."""
    case = (1, 2, 1, q_len, k_len, 64, 16, None, None)
    columns = torch.arange(k_len, dtype=torch.int32, device=DEVICE).expand(1, 2, k_len).contiguous()
    slashes = torch.tensor([[[0, 1, 2, 3, 4, 5, 30, 31, 60, -1], [0, 1, 2, 3, 4, 5, 23, 40, -1, -1]]],
                           dtype=torch.int32, device=DEVICE)
    lines_args = (columns, torch.full((1, 2), k_len, device=DEVICE), slashes, torch.tensor([[9, 8]], device=DEVICE))
    out, ref, lines, ref_lines = _run_both(case, torch.float32, lines_args, seed=2)
    assert _rel_err(out, ref) < REL_TOL[torch.float32]
    assert torch.equal(lines.block_pairs, ref_lines.block_pairs)
