"""Top-k KV page retrieval for decode: page summaries, page scoring + selection, sparse decode attention.

Triton kernels are compared with their fp32 ``naive.py`` twins (on the CPU in Triton's interpreter,
fp32 and fp16 only: the interpreter gets bf16 wrong), outputs pre-filled with NaN so an unwritten
element fails. Semantics are checked against independent brute-force torch code.
"""

from __future__ import annotations

import pytest
import torch

triton = pytest.importorskip("triton", reason="Triton is not importable on this machine")

from sparseprefill.kernels.decode import (  # noqa: E402
    attention_mass_recall,
    page_scores,
    select_pages,
    top_k_pages,
)
from sparseprefill.kernels.decode.naive import page_logits_naive, page_scores_naive  # noqa: E402
from sparseprefill.kernels.decode.triton_score import page_scores_triton  # noqa: E402
from sparseprefill.kernels.decode import page_summary, update_page_summary  # noqa: E402
from sparseprefill.kernels.decode.naive import page_summary_naive  # noqa: E402
from sparseprefill.kernels.decode.triton_summary import page_summary_triton  # noqa: E402
from sparseprefill.kernels.decode import sparse_decode_attention  # noqa: E402
from sparseprefill.kernels.decode.naive import sparse_decode_attention_naive  # noqa: E402
from sparseprefill.kernels.decode.triton_attention import sparse_decode_attention_triton  # noqa: E402

from tests.reference import torch_single_thread  # noqa: E402, F401  (autouse fixture)

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
DTYPES = [torch.float32, torch.float16] + ([torch.bfloat16] if DEVICE == "cuda" else [])
REL_TOL = {torch.float32: 1e-5 if DEVICE == "cpu" else 1e-4, torch.float16: 2e-3, torch.bfloat16: 1e-2}

# (batch, q heads, kv heads, L, head_dim, page): odd lengths, GQA 1 and 4, D 64/128, pages 16/32/64.
CASES = [
    (2, 2, 2, 77, 64, 16),
    (2, 8, 2, 203, 128, 16),
    (2, 4, 1, 150, 64, 32),
    (1, 8, 2, 129, 128, 64),
]
case_id = lambda c: f"B{c[0]}H{c[1]}/{c[2]}L{c[3]}D{c[4]}P{c[5]}"  # noqa: E731


def _randn(g, *shape, dtype=torch.float32):
    return torch.randn(*shape, generator=g).to(device=DEVICE, dtype=dtype)


def _qkv(case, dtype, seed, t=1):
    b, hq, hkv, length, d, _ = case
    g = torch.Generator().manual_seed(seed)
    return _randn(g, b, hq, t, d, dtype=dtype), _randn(g, b, hkv, length, d, dtype=dtype), _randn(g, b, hkv, length, d, dtype=dtype)


def _rel_err(out, ref):
    assert not torch.isnan(out).any(), "output has unwritten (NaN) elements"
    return float((out.float() - ref.float()).norm() / ref.float().norm().clamp_min(1e-30))


def _nan_buffers(k, n):
    b, h, _, d = k.shape
    return [torch.full((b, h, n, d), float("nan"), dtype=k.dtype, device=k.device) for _ in range(4)]


def _dense_reference(q, k, v, scale):
    """Exact fp32 attention of the T decode queries (causal against the cache end), repeating K/V."""
    b, hq, t, _ = q.shape
    group = hq // k.shape[1]
    kr = k.float().repeat_interleave(group, 1)
    vr = v.float().repeat_interleave(group, 1)
    s = q.float() @ kr.transpose(-1, -2) * scale
    length = k.shape[2]
    future = torch.arange(length, device=q.device)[None, :] > (torch.arange(t, device=q.device) + length - t)[:, None]
    return torch.softmax(s.masked_fill(future, float("-inf")), -1) @ vr


# ---------------------------------------------------------------------------------------------- summaries


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("case", CASES, ids=case_id)
def test_page_summary_triton_matches_naive(case, dtype):
    _, _, _, length, _, page = case
    _, k, _ = _qkv(case, dtype, seed=1)
    n = -(-length // page)
    ref, out = _nan_buffers(k, n), _nan_buffers(k, n)
    page_summary_naive(k, page, 0, n, *ref)
    page_summary_triton(k, page, 0, n, *out)
    for name, a, r in zip(("min", "max", "mean", "std"), out, ref):
        assert not torch.isnan(a).any(), f"{name} has unwritten elements"
        if name in ("min", "max"):
            assert torch.equal(a, r), name
        else:
            torch.testing.assert_close(a.float(), r.float(), rtol=1e-5 if dtype == torch.float32 else 1e-3, atol=1e-5)


def test_page_summary_statistics_brute_force():
    g = torch.Generator().manual_seed(0)
    k = _randn(g, 1, 2, 37, 8)
    s = page_summary(k, page_size=16)
    assert s.num_pages == 3 and s.minimum.shape == (1, 2, 3, 8)
    for p in range(3):
        page = k[:, :, p * 16:(p + 1) * 16]  # the last page: keys 32..36 only
        torch.testing.assert_close(s.minimum[:, :, p], page.amin(2))
        torch.testing.assert_close(s.maximum[:, :, p], page.amax(2))
        torch.testing.assert_close(s.mean[:, :, p], page.mean(2))
        torch.testing.assert_close(s.std[:, :, p], page.std(2, unbiased=False))


@pytest.mark.parametrize("use_triton", [False, True], ids=["naive", "triton"])
def test_page_summary_incremental_update_equals_full(use_triton, monkeypatch):
    if use_triton and DEVICE == "cpu":
        # Route the public function's CPU path through the interpreted Triton kernel.
        import sparseprefill.kernels.decode as ps

        monkeypatch.setattr(ps, "page_summary_naive", page_summary_triton)
    g = torch.Generator().manual_seed(2)
    full = _randn(g, 2, 2, 140, 64)
    summary = page_summary(full[:, :, :45], page_size=16)
    for end in (46, 47, 48, 49, 64, 65, 101, 140):  # single tokens, page boundaries, chunks; capacity grows
        summary = update_page_summary(summary, full[:, :, :end])
        fresh = page_summary(full[:, :, :end], page_size=16)
        assert summary.num_tokens == end and summary.capacity_pages >= summary.num_pages
        for a, r in zip(summary.valid().tensors, fresh.tensors):
            torch.testing.assert_close(a, r, rtol=1e-6, atol=1e-6)


def test_page_summary_update_touches_only_new_pages():
    g = torch.Generator().manual_seed(3)
    k = _randn(g, 1, 1, 100, 16)
    summary = page_summary(k[:, :, :70], page_size=16, capacity_pages=8)
    sentinel = -12345.0
    for t in summary.tensors:
        t[:, :, :4] = sentinel  # pages 0-3 (keys < 64) must not be recomputed by an append at 70
    summary = update_page_summary(summary, k)
    for t in summary.tensors:
        assert (t[:, :, :4] == sentinel).all()
        assert not (t[:, :, 4:7] == sentinel).any()


def test_page_summary_rejects_bad_arguments():
    k = torch.zeros(1, 1, 20, 8)
    with pytest.raises(ValueError, match="power of two"):
        page_summary(k, page_size=24)
    summary = page_summary(k, page_size=16)
    with pytest.raises(ValueError, match="start"):
        update_page_summary(summary, torch.zeros(1, 1, 40, 8), start=30)
    with pytest.raises(ValueError, match="stats"):
        page_summary(k, stats=("median",))


# ---------------------------------------------------------------------------------------------- scoring


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("method,reduce,t", [("quest", "max", 1), ("mean_std", "max", 1), ("mean_std", "sum", 2),
                                             ("quest", "sum", 1)])
@pytest.mark.parametrize("case", CASES, ids=case_id)
def test_page_scores_triton_matches_naive(case, method, reduce, t, dtype):
    _, _, _, length, d, page = case
    q, k, _ = _qkv(case, dtype, seed=4, t=t)
    s = page_summary(k, page_size=page)
    first, second = (s.minimum, s.maximum) if method == "quest" else (s.mean, s.std)
    kwargs = dict(scale=d**-0.5, method=method, spread_weight=1.0, group_reduce=reduce)
    ref = page_scores_naive(q, first, second, **kwargs)
    out = page_scores_triton(q, first, second, **kwargs)
    assert out.shape == (case[0], case[2], -(-length // page))
    assert not torch.isnan(out).any()
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-4)


def test_page_scores_reductions_brute_force():
    g = torch.Generator().manual_seed(5)
    q, k = _randn(g, 1, 4, 1, 32), _randn(g, 1, 2, 96, 32)
    s = page_summary(k, page_size=16)
    logits = page_logits_naive(q, s.mean, s.std, scale=0.3, method="mean_std", spread_weight=1.0)  # [1, 2, 2, 6]
    for h in range(2):
        for r in range(2):
            expect = 0.3 * (q[0, 2 * h + r, 0] @ s.mean[0, h].T + s.std[0, h] @ q[0, 2 * h + r, 0].abs())
            torch.testing.assert_close(logits[0, h, r], expect)
    probs = torch.softmax(logits, -1)
    torch.testing.assert_close(page_scores(q, s, scale=0.3, group_reduce="max"), probs.amax(2).log())
    torch.testing.assert_close(page_scores(q, s, scale=0.3, group_reduce="sum"), probs.sum(2).log())


@pytest.mark.parametrize("seed", range(4))
def test_quest_bound_is_an_upper_bound(seed):
    g = torch.Generator().manual_seed(seed)
    b, hq, hkv, length, d, page = 2, 8, 2, 203, 64, 16
    q = _randn(g, b, hq, 2, d) * torch.rand(b, hq, 2, d, generator=g).to(DEVICE) * 4  # mixed scales and signs
    k = _randn(g, b, hkv, length, d) + 3 * (torch.rand(b, hkv, length, d, generator=g).to(DEVICE) < 0.05)
    s = page_summary(k, page_size=page)
    bound = page_logits_naive(q, s.minimum, s.maximum, scale=1.0, method="quest", spread_weight=0.0)
    n = s.num_pages
    dots = q.reshape(b, hkv, 8, d) @ k.transpose(-1, -2)  # [B, Hkv, rows, L]
    dots = torch.nn.functional.pad(dots, (0, n * page - length), value=float("-inf"))
    true_max = dots.view(b, hkv, 8, n, page).amax(-1)
    assert (bound >= true_max - 1e-4 * true_max.abs().clamp_min(1)).all()


# ---------------------------------------------------------------------------------------------- selection


def _check_selection(index, count, num_tokens, page, budget, sink, recent):
    n = -(-num_tokens // page)
    width = budget // page
    assert index.shape[-1] == width and index.dtype == torch.int32 and count.dtype == torch.int32
    for bh in range(index.shape[0] * index.shape[1]):
        c = int(count.flatten()[bh])
        row = index.flatten(0, 1)[bh]
        assert c == min(n, width)
        assert (row[c:] == -1).all()
        chosen = row[:c].tolist()
        assert chosen == sorted(set(chosen)) and all(0 <= p < n for p in chosen)
        forced = {p for p in range(n) if p * page < sink or (p + 1) * page > num_tokens - recent} | {n - 1}
        assert forced <= set(chosen)
    return n


@pytest.mark.parametrize("num_tokens,page", [(1000, 16), (1009, 16), (1025, 32), (333, 64), (200, 16)])
def test_select_pages_keeps_sink_recent_and_top_scores(num_tokens, page):
    budget, sink, recent = 512, 64, 100
    g = torch.Generator().manual_seed(num_tokens)
    n = -(-num_tokens // page)
    scores = torch.rand(2, 3, n, generator=g).to(DEVICE)
    index, count = select_pages(scores, num_tokens=num_tokens, page_size=page, budget_tokens=budget,
                                sink_tokens=sink, recent_tokens=recent)
    _check_selection(index, count, num_tokens, page, budget, sink, recent)
    if n > budget // page:
        # The free slots hold exactly the best-scoring non-forced pages.
        forced = torch.tensor([p * page < sink or (p + 1) * page > num_tokens - recent or p == n - 1 for p in range(n)])
        for b in range(2):
            for h in range(3):
                free = set(index[b, h].tolist()) - set(torch.nonzero(forced).flatten().tolist())
                ranked = torch.where(forced.to(DEVICE), -1.0, scores[b, h]).argsort(descending=True)
                assert free == set(ranked[:len(free)].tolist())


def test_select_pages_budget_must_hold_forced_pages():
    with pytest.raises(ValueError, match="cannot hold"):
        select_pages(torch.zeros(1, 1, 100), num_tokens=1600, page_size=16, budget_tokens=64, sink_tokens=32,
                     recent_tokens=32)


# ---------------------------------------------------------------------------------------------- attention


def _selection(case, seed, budget):
    b, _, hkv, length, _, page = case
    g = torch.Generator().manual_seed(seed)
    scores = torch.rand(b, hkv, -(-length // page), generator=g).to(DEVICE)
    return select_pages(scores, num_tokens=length, page_size=page, budget_tokens=budget, sink_tokens=page,
                        recent_tokens=page)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("t", [1, 3])
@pytest.mark.parametrize("case", CASES, ids=case_id)
def test_sparse_decode_triton_matches_naive(case, t, dtype):
    d, page = case[4], case[5]
    q, k, v = _qkv(case, dtype, seed=6, t=t)
    index, count = _selection(case, seed=7, budget=4 * page)
    for idx, cnt in ((index, count), (None, None)):  # selected pages, then all pages
        kwargs = dict(page_size=page, scale=d**-0.5, softcap=None)
        ref = sparse_decode_attention_naive(q, k, v, idx, cnt, out=torch.full(q.shape, float("nan"), device=DEVICE), **kwargs)
        out = sparse_decode_attention_triton(q, k, v, idx, cnt, out=torch.full_like(q, float("nan")), **kwargs)
        assert out.dtype == q.dtype
        assert _rel_err(out, ref) < REL_TOL[dtype]


def test_sparse_decode_triton_softcap_and_uneven_counts():
    case = CASES[1]
    q, k, v = _qkv(case, torch.float32, seed=8)
    index, count = _selection(case, seed=9, budget=128)
    count = torch.tensor([[3, 8], [1, 5]], dtype=torch.int32, device=DEVICE)  # per-head counts, rest ignored
    kwargs = dict(page_size=16, scale=0.2, softcap=5.0)
    ref = sparse_decode_attention_naive(q, k, v, index, count, out=torch.empty_like(q), **kwargs)
    out = sparse_decode_attention_triton(q, k, v, index, count, out=torch.full_like(q, float("nan")), **kwargs)
    assert _rel_err(out, ref) < REL_TOL[torch.float32]


@pytest.mark.parametrize("use_triton", [False, True], ids=["naive", "triton"])
@pytest.mark.parametrize("case", CASES[:3], ids=case_id)
def test_full_budget_equals_dense_attention(case, use_triton):
    d, length, page = case[4], case[3], case[5]
    q, k, v = _qkv(case, torch.float32, seed=10, t=2)
    s = page_summary(k, page_size=page)
    index, count = top_k_pages(q, s, scale=d**-0.5, budget_tokens=-(-length // page) * page + 4 * page,
                               sink_tokens=page, recent_tokens=page)
    assert (count == s.num_pages).all()
    fn = sparse_decode_attention_triton if use_triton else sparse_decode_attention_naive
    out = fn(q, k, v, index, count, page_size=page, scale=d**-0.5, softcap=None, out=torch.full_like(q, float("nan")))
    # fp32 dots are full precision on both devices (not TF32); the GPU bound only allows for split-K order.
    assert _rel_err(out, _dense_reference(q, k, v, d**-0.5)) < (REL_TOL[torch.float32] if use_triton else 1e-5)


def test_end_to_end_retrieval_recall_and_public_dispatch():
    b, hq, hkv, length, d, page = 1, 4, 2, 1000, 64, 16
    g = torch.Generator().manual_seed(11)
    q, k, v = _randn(g, b, hq, 1, d), _randn(g, b, hkv, length, d), _randn(g, b, hkv, length, d)
    k[:, :, 500:503] += 2.0 * q[:, ::2, 0, None]  # keys aligned with the group's first query head: a needle page
    s = page_summary(k, page_size=page)
    for method in ("quest", "mean_std"):
        index, count = top_k_pages(q, s, scale=d**-0.5, method=method, budget_tokens=256, sink_tokens=16,
                                   recent_tokens=32)
        _check_selection(index, count, length, page, 256, 16, 32)
        assert (index == 500 // page).any(-1).all(), method
        recall = attention_mass_recall(q, k, index, count, page_size=page, scale=d**-0.5)
        assert recall.recall.shape == (b, hq, 1)
        assert (recall.selected_mass <= 1 + 1e-5).all() and (recall.oracle_mass <= 1 + 1e-5).all()
        out = sparse_decode_attention(q, k, v, index, count, page_size=page, scale=d**-0.5)
        dense = sparse_decode_attention(q, k, v, page_size=page, scale=d**-0.5)
        assert _rel_err(dense, _dense_reference(q, k, v, d**-0.5)) < REL_TOL[torch.float32]
        assert out.shape == q.shape and _rel_err(out, dense) < 1.0
    # Selecting every page captures all the mass; the oracle set at the same size scores recall 1.
    every, n_all = select_pages(torch.zeros(b, hkv, s.num_pages, device=DEVICE), num_tokens=length, page_size=page,
                                budget_tokens=s.num_pages * page)
    full = attention_mass_recall(q, k, every, n_all, page_size=page, scale=d**-0.5)
    torch.testing.assert_close(full.selected_mass, torch.ones_like(full.selected_mass))


def test_oracle_is_at_least_the_selection():
    case = (2, 8, 2, 300, 32, 16)
    q, k, _ = _qkv(case, torch.float32, seed=12)
    index, count = _selection(case, seed=13, budget=96)
    r = attention_mass_recall(q, k, index, count, page_size=16, scale=32**-0.5)
    # The oracle maximises the group's summed mass, so per group (not per head) it dominates.
    sel, orc = r.selected_mass.view(2, 2, 4).sum(-1), r.oracle_mass.view(2, 2, 4).sum(-1)
    assert (orc >= sel - 1e-6).all()


def test_sparse_decode_rejects_bad_page_lists():
    q, k, v = torch.zeros(1, 4, 1, 16), torch.zeros(1, 2, 40, 16), torch.zeros(1, 2, 40, 16)
    with pytest.raises(ValueError, match="together"):
        sparse_decode_attention(q, k, v, torch.zeros(1, 2, 3, dtype=torch.int32), scale=1.0)
    with pytest.raises(ValueError, match="page_index must be"):
        sparse_decode_attention(q, k, v, torch.zeros(1, 4, 3, dtype=torch.int32),
                                torch.zeros(1, 4, dtype=torch.int32), scale=1.0)
    with pytest.raises(ValueError, match="Lq"):
        sparse_decode_attention(torch.zeros(1, 4, 41, 16), k, v, scale=1.0)
