"""GPU fuzz: compiled Triton kernels vs their fp32 references on random shapes (GPU machine only).

Hypothesis draws batch, GQA group, head_dim, lengths (chunked included), block size, density,
dtype, window and soft-cap; every case uses fresh random inputs and NaN-prefilled outputs.
``SPARSEPREFILL_FUZZ_EXAMPLES`` sets the number of cases per kernel (default 1000);
``SPARSEPREFILL_FUZZ_SHARD=n`` draws a distinct stream, so shards can run in parallel.
"""

from __future__ import annotations

import functools

import pytest
import torch

pytestmark = pytest.mark.gpu
if not torch.cuda.is_available():
    pytest.skip("needs a CUDA device", allow_module_level=True)

from hypothesis import given  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from tests import reference  # noqa: E402
from sparseprefill.kernels import build_vertical_slash_index, select_blocks  # noqa: E402
from sparseprefill.kernels.vertical_slash.naive import build_vertical_slash_index_naive  # noqa: E402
from sparseprefill.kernels.vertical_slash.triton_index import build_vertical_slash_index_triton  # noqa: E402
from sparseprefill.kernels.block_sparse.columns import blocks_with_columns  # noqa: E402
from sparseprefill.kernels.block_sparse.naive import block_sparse_attention_naive  # noqa: E402
from sparseprefill.kernels.block_sparse.triton_attention import block_sparse_attention_triton  # noqa: E402
from sparseprefill.kernels.common import compact  # noqa: E402
from sparseprefill.kernels.vertical_slash.naive import vertical_slash_attention_naive  # noqa: E402
from sparseprefill.kernels.vertical_slash.triton_attention import vertical_slash_attention_triton  # noqa: E402
from sparseprefill.kernels.vertical_slash import vertical_slash_lines  # noqa: E402
from sparseprefill.kernels.vertical_slash.naive import vertical_slash_lines_attention_naive  # noqa: E402
from sparseprefill.kernels.vertical_slash.triton_lines import vertical_slash_lines_attention_triton  # noqa: E402
from sparseprefill.kernels.vertical_slash.triton_recall import block_recall_triton  # noqa: E402
from sparseprefill.kernels.recall import window_recall  # noqa: E402
from sparseprefill.kernels.triton_common import MAX_RESCALE_SLACK  # noqa: E402

EXAMPLES = reference.FUZZ_EXAMPLES
REL_TOL = {torch.bfloat16: 1.5e-2, torch.float16: 3e-3}
FUZZ = reference.gpu_fuzz
COUNTS = {"block_sparse": 0, "vertical_slash": 0, "vertical_slash_lines": 0, "block_recall": 0,
          "block_sparse_recall": 0, "vertical_slash_index": 0}


@st.composite
def shapes(draw):
    kv_heads = draw(st.sampled_from([1, 2, 4]))
    group = draw(st.sampled_from([1, 2, 4, 7]))
    head_dim = draw(st.sampled_from([64, 80, 128, 256]))
    k_len = draw(st.integers(1, 700))
    q_len = draw(st.one_of(st.just(k_len), st.integers(1, k_len)))
    block = draw(st.sampled_from([32, 64, 128]))
    dtype = draw(st.sampled_from([torch.bfloat16, torch.float16]))
    window = draw(st.one_of(st.none(), st.integers(1, 400)))
    softcap = draw(st.one_of(st.none(), st.just(30.0)))
    batch = draw(st.sampled_from([1, 2]))
    density = draw(st.floats(0.0, 1.0))
    seed = draw(st.integers(0, 2**31 - 1))
    return batch, kv_heads * group, kv_heads, q_len, k_len, head_dim, block, dtype, window, softcap, density, seed


def _check(out, ref, dtype):
    assert not torch.isnan(out).any(), "unwritten output"
    norm = ref.norm()
    if norm == 0:
        assert out.abs().max() == 0
        return
    assert float((out.float() - ref).norm() / norm) < REL_TOL[dtype]


def _compare(naive, fast, q, k, v, index, window, softcap):
    """The Triton kernel against its fp32 twin, both writing into NaN-filled outputs."""
    hq, hkv, d = q.shape[1], k.shape[1], q.shape[3]
    kw = dict(scale=d**-0.5, window=window, softcap=softcap,
              kv_head_index=torch.arange(hq, device="cuda") // (hq // hkv))
    # ``index`` may be a (reference, tested) pair when each side records into its own copy.
    ref_index, index = index if isinstance(index, tuple) else (index, index)
    ref = naive(q, k, v, ref_index, out=torch.full(q.shape, float("nan"), device="cuda"), **kw)
    out = fast(q, k, v, index, out=torch.full_like(q, float("nan")), **kw)
    _check(out, ref, q.dtype)


def _inputs(batch, hq, hkv, q_len, k_len, d, dtype, seed):
    g = torch.Generator(device="cuda").manual_seed(seed)
    make = lambda *s: torch.randn(*s, generator=g, device="cuda").to(dtype)  # noqa: E731
    return make(batch, hq, q_len, d), make(batch, hkv, k_len, d), make(batch, hkv, k_len, d), g


def _with_random_columns(index, k_len, density, seed, g):
    """Every other case adds per-head key columns (``blocks_with_columns``), ascending in a full-width list
    whose unused tail holds garbage, as the estimator leaves it."""
    if seed % 4 < 2:
        return index
    batch, heads = index.block_count.shape[:2]
    count, cols = compact(torch.rand(batch, heads, k_len, generator=g, device="cuda") < density * 0.2, trim=False)
    cols = torch.where(torch.arange(cols.shape[-1], device="cuda") < count[..., None], cols, k_len + 5)
    return blocks_with_columns(index, cols, count)


@FUZZ
@given(shapes())
def test_block_sparse_fuzz(shape):
    batch, hq, hkv, q_len, k_len, d, block, dtype, window, softcap, density, seed = shape
    q, k, v, g = _inputs(batch, hq, hkv, q_len, k_len, d, dtype, seed)
    scores = torch.rand(batch, hq, -(-q_len // block), -(-k_len // block), generator=g, device="cuda")
    index = select_blocks(scores, q_len=q_len, k_len=k_len, block_size_q=block, block_size_k=block, mass=density,
                          sink_blocks=int(seed % 2))
    index = _with_random_columns(index, k_len, density, seed, g)
    fast = functools.partial(block_sparse_attention_triton, rescale_slack=_rescale_slack(seed),
                             block_tma=seed % 3 == 0)  # K/V tiles by tensor descriptor on a third of the cases
    _compare(block_sparse_attention_naive, fast, q, k, v, index, window, softcap)
    COUNTS["block_sparse"] += 1
    reference.fuzz_progress("block sparse", COUNTS["block_sparse"])


def _rescale_slack(seed: int) -> float | None:
    """The online softmax's lazy-rescale slack: the shipped one (None) on a quarter of the cases, eager
    (0), FlashAttention-4's 8 or the largest allowed (``MAX_RESCALE_SLACK``, what fp16 holds) on the others."""
    return (None, 0.0, 8.0, MAX_RESCALE_SLACK)[(seed // 16) % 4]


def _wide_key_tile(seed: int, head_dim: int) -> int | None:
    """Leading wide range tiles of the vertical-slash kernels: the shipped policy (None) on a quarter of
    the cases, none, 64 or 128 keys on the others, narrowed where the K/V tiles would not fit shared
    memory (the shipped policy's own rule: ``vertical_slash_wide_tile``)."""
    wide = (None, 0, 64, 128)[(seed // 4) % 4]
    if wide == 128 and head_dim > 64:
        wide = 64
    if wide == 64 and head_dim > 128:
        wide = 0
    return wide


@FUZZ
@given(shapes())
def test_vertical_slash_fuzz(shape):
    batch, hq, hkv, q_len, k_len, d, block, dtype, window, softcap, density, seed = shape
    q, k, v, g = _inputs(batch, hq, hkv, q_len, k_len, d, dtype, seed)
    vc, vi = compact(torch.rand(batch, hq, k_len, generator=g, device="cuda") < density * 0.3)
    sc, so = compact(torch.rand(batch, hq, k_len, generator=g, device="cuda") < density * 0.2)
    # Per-head columns (masked per block in the kernel) on every other case.
    column_layout = ("block", "head")[(seed // 2) % 2]
    # Full-width blocks' ranges from their head's runs (``head_runs``) on every other case; per-head ranges
    # as the columns go (None), always or never, in turn.
    ranges_per_head = (None, True, False)[(seed // 16) % 3]
    index = build_vertical_slash_index_triton(vi, vc, so, sc, q_len=q_len, k_len=k_len, block_size_q=block,
                                              column_layout=column_layout, head_runs=(seed // 8) % 2 == 1,
                                              ranges_per_head=ranges_per_head)
    # The Triton converter built it on CUDA; the naive converter must list the same keys.
    assert index.lists_same_entries(
        build_vertical_slash_index_naive(vi, vc, so, sc, q_len=q_len, k_len=k_len, block_size_q=block))
    # Range tiles through tensor descriptors (TMA) on a third of the cases, which walk 32-key tiles only.
    range_tma = seed % 3 == 0
    fast = functools.partial(vertical_slash_attention_triton, wide_key_tile=0 if range_tma else _wide_key_tile(seed, d),
                             rescale_slack=_rescale_slack(seed), range_tma=range_tma)
    _compare(vertical_slash_attention_naive, fast, q, k, v, index, window, softcap)
    COUNTS["vertical_slash"] += 1
    reference.fuzz_progress("vertical slash", COUNTS["vertical_slash"])


@FUZZ
@given(shapes())
def test_vertical_slash_lines_fuzz(shape):
    """The fused kernel (ranges and columns derived from per-head lines) vs the per-block index of the
    same lines attended in fp32, pair counts included."""
    batch, hq, hkv, q_len, k_len, d, block, dtype, window, softcap, density, seed = shape
    q, k, v, g = _inputs(batch, hq, hkv, q_len, k_len, d, dtype, seed)
    vc, vi = compact(torch.rand(batch, hq, k_len, generator=g, device="cuda") < density * 0.3)
    sc, so = compact(torch.rand(batch, hq, k_len, generator=g, device="cuda") < density * 0.2)
    make = lambda: vertical_slash_lines(vi, vc, so, sc, q_len=q_len, k_len=k_len, block_size_q=block)  # noqa: E731
    ref_lines, lines = make(), make()
    lines.block_pairs.fill_(-1)
    fast = functools.partial(vertical_slash_lines_attention_triton, wide_key_tile=_wide_key_tile(seed, d),
                             rescale_slack=_rescale_slack(seed))
    _compare(vertical_slash_lines_attention_naive, fast, q, k, v, (ref_lines, lines), window, softcap)
    assert torch.equal(lines.block_pairs, ref_lines.block_pairs)
    COUNTS["vertical_slash_lines"] += 1
    reference.fuzz_progress("vertical slash lines", COUNTS["vertical_slash_lines"])


RECALL_ABS_TOL = {torch.bfloat16: 1e-2, torch.float16: 2e-3}


def _split_keys(seed: int) -> int:
    """Keys per program of the recall kernel: the shipped split on half the cases, a short one (several
    parts folded) on the other half."""
    from sparseprefill.kernels.vertical_slash.triton_recall import RECALL_SPLIT_KEYS

    return RECALL_SPLIT_KEYS if seed % 2 else 128 * (1 + seed % 7)


@FUZZ
@given(shapes())
def test_block_recall_fuzz(shape):
    """The held-out recall kernel vs ``window_recall`` (fp32 probabilities) on every query block of
    random indices (windows do not apply: the check runs on unwindowed layers)."""
    batch, hq, hkv, q_len, k_len, d, block, dtype, _, softcap, density, seed = shape
    q, k, _, g = _inputs(batch, hq, hkv, q_len, k_len, d, dtype, seed)
    vc, vi = compact(torch.rand(batch, hq, k_len, generator=g, device="cuda") < density * 0.3)
    sc, so = compact(torch.rand(batch, hq, k_len, generator=g, device="cuda") < density * 0.2)
    index = build_vertical_slash_index(vi, vc, so, sc, q_len=q_len, k_len=k_len, block_size_q=block)
    kw = dict(scale=d**-0.5, softcap=softcap, kv_head_index=torch.arange(hq, device="cuda") // (hq // hkv))
    blocks = torch.arange(-(-q_len // block), device="cuda")
    got = block_recall_triton(q, k, index, blocks, split_keys=_split_keys(seed), **kw)
    expected = torch.stack([window_recall([index], q.float(), k.float(), r * block, min(r * block + block, q_len),
                                          **kw)[0].mean(-1) for r in blocks.tolist()], dim=-1)
    assert not torch.isnan(got).any()
    assert float((got - expected).abs().max()) <= RECALL_ABS_TOL[dtype]
    COUNTS["block_recall"] += 1
    reference.fuzz_progress("block recall", COUNTS["block_recall"])


@FUZZ
@given(shapes())
def test_block_sparse_recall_fuzz(shape):
    """The block estimators' spot check (a block-sparse index's checked rows as ranges through the recall
    kernel) vs ``window_recall`` on every query block of random block indices."""
    from sparseprefill.kernels import select_blocks
    from sparseprefill.kernels.block_sparse.triton_recall import block_sparse_recall_triton

    batch, hq, hkv, q_len, k_len, d, block, dtype, _, softcap, density, seed = shape
    q, k, _, g = _inputs(batch, hq, hkv, q_len, k_len, d, dtype, seed)
    n_q, n_k = -(-q_len // block), -(-k_len // block)
    index = select_blocks(torch.rand(batch, hq, n_q, n_k, generator=g, device="cuda"), q_len=q_len, k_len=k_len,
                          block_size_q=block, block_size_k=block, mass=density)
    index = _with_random_columns(index, k_len, density, seed, g)
    kw = dict(scale=d**-0.5, softcap=softcap, kv_head_index=torch.arange(hq, device="cuda") // (hq // hkv))
    blocks = torch.arange(n_q)
    got = block_sparse_recall_triton(q, k, index, blocks, split_keys=_split_keys(seed), **kw)
    expected = torch.stack([window_recall([index], q.float(), k.float(), r * block, min(r * block + block, q_len),
                                          **kw)[0].mean(-1) for r in blocks.tolist()], dim=-1)
    assert not torch.isnan(got).any()
    assert float((got - expected).abs().max()) <= RECALL_ABS_TOL[dtype]
    COUNTS["block_sparse_recall"] += 1
    reference.fuzz_progress("block sparse recall", COUNTS["block_sparse_recall"])


def _assert_same_index(got, want):
    """The same ranges and columns in the same order (slots past each count ignored)."""
    for counts in ("range_count", "column_count"):
        assert torch.equal(getattr(got, counts).cpu(), getattr(want, counts).cpu()), counts
    for field, counts in (("range_start", "range_count"), ("range_end", "range_count"),
                          ("column_index", "column_count")):
        count = getattr(want, counts).cpu()
        width = int(count.max()) if count.numel() else 0
        valid = torch.arange(width) < count[..., None]
        a, b = getattr(got, field)[..., :width].cpu(), getattr(want, field)[..., :width].cpu()
        assert torch.equal(a[valid], b[valid]), field


@FUZZ
@given(k_len=st.integers(1, 4000), q_frac=st.floats(0.0, 1.0), block=st.sampled_from([1, 16, 32, 64, 128]),
       p_vertical=st.sampled_from([0.0, 0.002, 0.02, 0.2, 0.5]), p_slash=st.sampled_from([0.0, 0.002, 0.02, 0.2, 0.5]),
       local=st.sampled_from([0, 1, 64, 300]),
       batch=st.sampled_from([1, 2]), heads=st.integers(1, 4), seed=st.integers(0, 2**31 - 1))
def test_vertical_slash_index_builder_fuzz(k_len, q_frac, block, p_vertical, p_slash, local, batch, heads, seed):
    """The Triton index builder against the naive one on random lines up to 4K keys (a local band of
    diagonals plus scattered ones, chunked queries): full-width blocks' ranges from their visible
    diagonals or from their head's runs (``head_runs``, drawn), slashes presorted or not; the same
    ranges and columns in the same order and the same pair counts."""
    q_len = max(1, round(q_frac * k_len))
    g = torch.Generator(device="cuda").manual_seed(seed)
    lines = torch.arange(k_len, device="cuda")
    vc, vi = compact(torch.rand(batch, heads, k_len, generator=g, device="cuda") < p_vertical)
    sc, so = compact((torch.rand(batch, heads, k_len, generator=g, device="cuda") < p_slash) | (lines < local))
    want = build_vertical_slash_index_naive(vi, vc, so, sc, q_len=q_len, k_len=k_len, block_size_q=block)
    got = build_vertical_slash_index_triton(vi, vc, so, sc, q_len=q_len, k_len=k_len, block_size_q=block,
                                            slashes_sorted=(seed // 2) % 2 == 1, head_runs=seed % 2 == 1)
    _assert_same_index(got, want)
    assert torch.equal(got.block_pairs.sum(-1).cpu(), want.computed_pairs().cpu())
    # Per-head ranges (either column layout, whole bands or 32-key pieces): the torch reference's table
    # piece for piece, the per-block index's keys and pair counts.
    pieces, column_layout = (None, 32)[(seed // 4) % 2], ("block", "head")[(seed // 8) % 2]
    head = reference.on_cpu(build_vertical_slash_index_triton(vi, vc, so, sc, q_len=q_len, k_len=k_len, block_size_q=block,
                                                     column_layout=column_layout, ranges_per_head=True,
                                                     max_range_keys=pieces))
    lines = [t.cpu() for t in (vi, vc, so, sc)]
    reference_head = build_vertical_slash_index(*lines, q_len=q_len, k_len=k_len, block_size_q=block,
                                                column_layout="head", ranges_per_head=True, max_range_keys=pieces)
    assert head.lists_same_entries(reference_head)
    assert torch.equal(head.block_pairs, want.block_pair_counts().cpu())
    if pieces is None:
        assert head.lists_same_entries(reference.on_cpu(want))
    COUNTS["vertical_slash_index"] += 1
    reference.fuzz_progress("vertical slash index", COUNTS["vertical_slash_index"])


def test_fuzz_ran_the_requested_number_of_cases():
    # Hypothesis may stop early if it exhausts distinct examples; make the count visible and honest.
    print(f"\nGPU fuzz cases run: {COUNTS}")
    assert all(count >= min(EXAMPLES, 500) for count in COUNTS.values()), COUNTS
