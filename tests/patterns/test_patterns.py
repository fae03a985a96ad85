"""Patterns (estimate -> index -> kernel): keep-everything configs reproduce dense attention
exactly; on inputs with planted structure (attention sink, a vertical stripe, a local diagonal)
the estimated index contains the structure, is sparse, and the output stays close to dense."""

from __future__ import annotations

import math

import pytest
import torch

from sparseprefill.config import (
    AntidiagonalConfig,
    AShapeConfig,
    BlockSparseConfig,
    PatternName,
    SparseConfig,
    VerticalSlashConfig,
)
from sparseprefill.kernels.indices import BlockSparseIndex, VerticalSlashIndex, VerticalSlashLines
from sparseprefill.patterns import (
    AShapePattern,
    AntidiagonalPattern,
    AutoPattern,
    BlockSparsePattern,
    DensePattern,
    VerticalSlashPattern,
    build_pattern,
    inspectable_index,
)

from tests import reference as ref
from tests.reference import torch_single_thread  # noqa: F401  (autouse fixture)

ALL_PATTERNS = [p.value for p in PatternName]


def listed_mask(index, b, hq, q_len, k_len) -> torch.Tensor:
    index = inspectable_index(index)  # line patterns hand per-head lines to their fused kernel
    if index is None:
        return torch.ones(b, hq, q_len, k_len, dtype=torch.bool)
    if isinstance(index, BlockSparseIndex):
        return ref.block_sparse_listed_mask(index)
    assert isinstance(index, VerticalSlashIndex), type(index)
    return ref.vertical_slash_listed_mask(index)


def run_pattern(name, config, q, k, v, *, scale, softcap=None, kv_head_index=None):
    hq, hkv = q.shape[1], k.shape[1]
    if kv_head_index is None:
        kv_head_index = torch.arange(hq) // (hq // hkv)
    pattern = build_pattern(name, config)
    out = torch.full_like(q, float("nan"))
    result = pattern.run(q, k, v, scale=scale, softcap=softcap, kv_head_index=kv_head_index, out=out)
    assert not torch.isnan(out).any(), f"{name}: some output rows were never written"
    return pattern, result, out, kv_head_index


def test_build_pattern_returns_the_named_pattern():
    cfg = SparseConfig()
    expected = {
        "auto": AutoPattern, "antidiagonal": AntidiagonalPattern, "vertical_slash": VerticalSlashPattern,
        "block_sparse": BlockSparsePattern, "a_shape": AShapePattern, "dense": DensePattern,
    }
    for name, cls in expected.items():
        pattern = build_pattern(name, cfg)
        assert type(pattern) is cls and pattern.name == PatternName(name)


# ------------------------------------------------------------------------------------------------
# keep-everything == dense


KEEP_ALL_CASES = {
    # b, hq, hkv, q_len, k_len, d, softcap, spread, kv_head_index
    "square_odd_300_gqa2": (2, 4, 2, 300, 300, 64, None, 1.0, None),
    "chunked_100_of_301": (1, 4, 2, 100, 301, 64, None, 1.0, None),
    "gqa7_odd_130": (1, 7, 1, 130, 130, 32, None, 1.0, None),
    "softcap": (1, 2, 1, 150, 170, 32, 5.0, 4.0, None),
    "head_subset_kv_1_1_0": (2, 3, 2, 140, 140, 32, None, 1.0, [1, 1, 0]),
    "decode_like_1_of_90": (1, 2, 2, 1, 90, 16, None, 1.0, None),
}


@pytest.mark.parametrize("name", ALL_PATTERNS)
@pytest.mark.parametrize("case", list(KEEP_ALL_CASES), ids=list(KEEP_ALL_CASES))
def test_keep_everything_config_equals_dense_attention(name, case):
    b, hq, hkv, q_len, k_len, d, softcap, spread, kvh = KEEP_ALL_CASES[case]
    kv_head_index = None if kvh is None else torch.tensor(kvh)
    q, k, v = ref.make_qkv(q_len + hq, b, hq, hkv, q_len, k_len, d, spread=spread)
    scale = d**-0.5
    config = SparseConfig.keep_everything(name)
    _, result, out, kv_head_index = run_pattern(name, config, q, k, v, scale=scale, softcap=softcap, kv_head_index=kv_head_index)
    expected = ref.attention_reference(q, k, v, scale=scale, softcap=softcap, kv_head_index=kv_head_index)
    torch.testing.assert_close(out.double(), expected, atol=1e-5, rtol=1e-5)
    total = int(ref.pair_count(None, q_len, k_len))
    assert result.computed_pairs.shape == (b, hq)
    assert result.computed_pairs.tolist() == [[total] * hq] * b, "keep-everything must compute every causal pair once"
    if result.index is not None:
        mask = listed_mask(result.index, b, hq, q_len, k_len)
        vis = ref.causal_mask(q_len, k_len)
        assert (mask | ~vis).all(), "keep-everything index misses a causal key"


# ------------------------------------------------------------------------------------------------
# default-ish configs: plumbing and density bounds on random inputs


@pytest.mark.parametrize("name", ALL_PATTERNS)
def test_pattern_output_is_masked_attention_over_its_own_index_and_density_in_unit_interval(name):
    """Whatever the estimate picks, the output is exact attention over the listed keys, and the
    reported computed pairs are the listed causal pairs (density in (0, 1])."""
    b, hq, hkv, q_len, k_len, d = 2, 4, 2, 200, 260, 32
    q, k, v = ref.make_qkv(77, b, hq, hkv, q_len, k_len, d, spread=2.0)
    config = SparseConfig(
        vertical_slash=VerticalSlashConfig(last_queries=32, sink_tokens=4, local_tokens=16, block_size=32),
        block_sparse=BlockSparseConfig(block_size=32, mass=0.8),
        antidiagonal=AntidiagonalConfig(block_size=32, stride=8, mass=0.8),
        a_shape=AShapeConfig(sink_tokens=8, local_tokens=40, block_size=32),
    )
    _, result, out, kv_head_index = run_pattern(name, config, q, k, v, scale=d**-0.5)
    mask = listed_mask(result.index, b, hq, q_len, k_len)
    expected = ref.attention_reference(q, k, v, scale=d**-0.5, listed=mask, kv_head_index=kv_head_index)
    torch.testing.assert_close(out.double(), expected, atol=2e-5, rtol=2e-5)
    total = int(ref.pair_count(None, q_len, k_len))
    assert torch.equal(result.computed_pairs, ref.pair_count(mask, q_len, k_len)) or result.index is None
    density = result.computed_pairs.double() / total
    assert ((density > 0) & (density <= 1)).all(), density


@pytest.mark.parametrize("name", ["auto", "vertical_slash", "block_sparse", "antidiagonal"])  # a_shape: one density
def test_heads_past_the_dense_threshold_run_dense_and_the_rest_keep_their_index(name):
    """``dense_above``: a (row, head) whose index lists at least that share of its causal pairs gets
    exact dense attention and counts every pair; the others get attention over their own index, as
    without routing. GQA, two batch rows with different inputs."""
    b, hq, hkv, q_len, k_len, d = 2, 6, 2, 200, 260, 32
    q, k, v = ref.make_qkv(91, b, hq, hkv, q_len, k_len, d, spread=2.0)
    config = SparseConfig(
        vertical_slash=VerticalSlashConfig(last_queries=32, sink_tokens=4, local_tokens=16, block_size=32,
                                           vertical_mass=0.8, slash_mass=0.8),
        block_sparse=BlockSparseConfig(block_size=32, mass=0.7),
        antidiagonal=AntidiagonalConfig(block_size=32, stride=8, mass=0.7),
        a_shape=AShapeConfig(sink_tokens=8, local_tokens=40, block_size=32),
    )
    scale = d**-0.5
    _, plain, plain_out, kv_head_index = run_pattern(name, config, q, k, v, scale=scale)
    causal = int(ref.pair_count(None, q_len, k_len))
    density = plain.computed_pairs.double() / causal
    threshold = float(density.flatten().sort().values[density.numel() // 2])  # about half the heads
    dense = density >= threshold
    assert dense.any() and not dense.all(), density
    pattern = build_pattern(name, config)
    out = torch.full_like(q, float("nan"))
    routed = pattern.run(q, k, v, scale=scale, softcap=None, kv_head_index=kv_head_index, out=out,
                         dense_above=threshold)
    exact = ref.attention_reference(q, k, v, scale=scale, kv_head_index=kv_head_index)
    assert routed.dense_heads == int(dense.sum())
    assert torch.equal(routed.computed_pairs, torch.where(dense, causal, plain.computed_pairs))
    for row in range(b):
        for head in range(hq):
            expected = exact[row, head] if dense[row, head] else plain_out[row, head].double()
            torch.testing.assert_close(out[row, head].double(), expected, atol=2e-5, rtol=2e-5,
                                       msg=f"row {row} head {head} (dense: {bool(dense[row, head])})")
    # A threshold nobody reaches changes nothing; a threshold of 0 sends every head dense.
    out = torch.full_like(q, float("nan"))
    none = pattern.run(q, k, v, scale=scale, softcap=None, kv_head_index=kv_head_index, out=out, dense_above=1.01)
    assert none.dense_heads == 0 and torch.equal(out, plain_out)
    everything = pattern.run(q, k, v, scale=scale, softcap=None, kv_head_index=kv_head_index, out=out, dense_above=0.0)
    assert everything.dense_heads == b * hq and bool((everything.computed_pairs == causal).all())
    torch.testing.assert_close(out.double(), exact, atol=2e-5, rtol=2e-5)


def test_heads_whose_lines_alone_pass_the_dense_threshold_get_no_index_rows():
    """A line pattern routes a head dense from its lines alone where ``pairs_lower_bound`` reaches the
    threshold (its index would count at least as many pairs): its index rows stay empty, it runs exact,
    counts every pair, and inspectors see it whole; the other heads run as without routing. The lines
    are fixed per head: every diagonal (dense by its lines), a local band with a sink column (sparse), and
    a band with every other column (dense by its index only: the bound takes the larger kind, the index
    their union)."""
    from sparseprefill.kernels.vertical_slash import vertical_slash_lines
    from sparseprefill.patterns.vertical_slash import VerticalSlashPattern

    class FixedLines(VerticalSlashPattern):
        def estimate_lines(self, q, k, *, scale, softcap, kv_head_index):
            return lines

        def routed_estimate(self, q, k, dense_pairs, **kw):  # the path DENSE_HEADS_FROM_LINES turns on
            return super().routed_estimate(q, k, dense_pairs, from_lines=True, **kw)

    class FixedLinesShipped(VerticalSlashPattern):
        def estimate_lines(self, q, k, *, scale, softcap, kv_head_index):
            return lines

    b, hq, hkv, q_len, k_len, d, block = 1, 3, 1, 150, 150, 32, 16
    q, k, v = ref.make_qkv(7, b, hq, hkv, q_len, k_len, d, spread=2.0)
    kept_slashes = (list(range(k_len)), list(range(8)), list(range(40)))
    kept_columns = ([], [0], list(range(0, k_len, 2)))
    slashes, columns = torch.full((b, hq, k_len), -1), torch.full((b, hq, k_len), -1)
    for head in range(hq):
        slashes[0, head, :len(kept_slashes[head])] = torch.tensor(kept_slashes[head], dtype=torch.long)
        columns[0, head, :len(kept_columns[head])] = torch.tensor(kept_columns[head], dtype=torch.long)
    lines = vertical_slash_lines(columns, torch.tensor([[len(c) for c in kept_columns]]), slashes,
                                 torch.tensor([[len(s) for s in kept_slashes]]), q_len=q_len, k_len=k_len,
                                 block_size_q=block)
    causal = int(ref.pair_count(None, q_len, k_len))
    threshold = 0.6
    bound = lines.pairs_lower_bound(lines_sorted=True).double() / causal
    index_density = lines.to_index(slashes_sorted=True).computed_pairs().double() / causal
    assert bound.tolist()[0][0] == 1.0 and index_density[0, 1] < threshold, (bound, index_density)
    assert bound[0, 2] < threshold <= index_density[0, 2], (bound, index_density)  # dense by its index only
    pattern = FixedLines(VerticalSlashConfig(block_size=block))
    kw = dict(scale=d**-0.5, softcap=None, kv_head_index=torch.zeros(hq, dtype=torch.long))
    plain_out = torch.full_like(q, float("nan"))
    plain = pattern.run(q, k, v, out=plain_out, **kw)
    out = torch.full_like(q, float("nan"))
    routed = pattern.run(q, k, v, out=out, dense_above=threshold, **kw)
    assert routed.known_dense.tolist() == [[True, False, False]] and routed.dense_heads == 2
    assert int(routed.index.range_count[0, 0].sum()) == 0 and int(routed.index.column_count[0, 0].sum()) == 0
    assert routed.computed_pairs.tolist() == [[causal, int(plain.computed_pairs[0, 1]), causal]]
    assert routed.inspected_index().computed_pairs().tolist() == [[causal, *plain.computed_pairs[0, 1:].tolist()]]
    exact = ref.attention_reference(q, k, v, scale=d**-0.5, kv_head_index=kw["kv_head_index"])
    for head, expected in enumerate((exact[0, 0], plain_out[0, 1].double(), exact[0, 2])):
        torch.testing.assert_close(out[0, head].double(), expected, atol=2e-5, rtol=2e-5, msg=f"head {head}")
    # As shipped (DENSE_HEADS_FROM_LINES), the same decisions and output from the index alone.
    shipped_out = torch.full_like(q, float("nan"))
    shipped = FixedLinesShipped(VerticalSlashConfig(block_size=block)).run(q, k, v, out=shipped_out,
                                                                           dense_above=threshold, **kw)
    from sparseprefill.patterns.base import DENSE_HEADS_FROM_LINES

    assert (shipped.known_dense is None) == (not DENSE_HEADS_FROM_LINES)
    assert torch.equal(shipped.computed_pairs, routed.computed_pairs) and torch.equal(shipped_out, out)


def test_vertical_slash_fused_path_equals_the_index_path():
    """``VerticalSlashConfig(fused=True)``: the lines go straight to the fused kernel (no per-block index)
    and the output and pair counts are those of the default index path."""
    b, hq, hkv, q_len, k_len, d = 2, 4, 2, 190, 190, 32
    q, k, v = ref.make_qkv(5, b, hq, hkv, q_len, k_len, d, spread=2.0)
    vs = VerticalSlashConfig(last_queries=32, sink_tokens=4, local_tokens=16, block_size=32, vertical_mass=0.8,
                             slash_mass=0.8)
    _, indexed, indexed_out, _ = run_pattern("vertical_slash", SparseConfig(vertical_slash=vs), q, k, v, scale=d**-0.5)
    fused_config = SparseConfig(vertical_slash=VerticalSlashConfig(**{**vs.__dict__, "fused": True}))
    _, fused, fused_out, _ = run_pattern("vertical_slash", fused_config, q, k, v, scale=d**-0.5)
    assert isinstance(indexed.index, VerticalSlashIndex) and isinstance(fused.index, VerticalSlashLines)
    assert torch.equal(fused.computed_pairs, indexed.computed_pairs)
    torch.testing.assert_close(fused_out, indexed_out, atol=1e-5, rtol=1e-5)
    with pytest.raises(TypeError, match="vertical_slash.fused must be a bool, got int 1"):
        VerticalSlashConfig(fused=1)


# ------------------------------------------------------------------------------------------------
# planted structure

SINK = range(0, 16)  # the first 16 keys attract every query
STRIPE = range(288, 304)  # 16 keys every query at or after position 288 attends to
PLANTED_LOGIT = 12.0
LOCAL_LOGIT = 8.0


def planted_qkv(b, hq, hkv, q_len, k_len, *, stripe: bool = True, d: int = 64, seed: int = 0):
    """q/k with three planted components, each in its own dimensions:

    dim 0: sink (keys 0..15 score ``PLANTED_LOGIT`` with every query);
    dim 1: stripe (keys 288..303 score ``PLANTED_LOGIT`` with queries at positions >= 288);
    dims 2..33: local diagonal, a Dirichlet kernel ``LOCAL_LOGIT * mean_f cos(f pi (p - j) / Lk)``
    peaked at p = j and about Lk / 16 tokens wide; dims 34..: small noise.
    """
    gen = torch.Generator().manual_seed(seed)
    scale = d**-0.5
    amp = math.sqrt(PLANTED_LOGIT / scale)
    q = torch.zeros(b, hq, q_len, d)
    k = torch.zeros(b, hkv, k_len, d)
    pos_q = (torch.arange(q_len) + k_len - q_len).double()
    pos_k = torch.arange(k_len).double()
    q[..., 0] = amp
    k[:, :, SINK.start : SINK.stop, 0] = amp
    if stripe:
        q[..., 1] = torch.where(pos_q >= STRIPE.start, amp, 0.0).float()
        k[:, :, STRIPE.start : STRIPE.stop, 1] = amp
    n_freq = 16
    c = math.sqrt(LOCAL_LOGIT / scale / n_freq)
    for f in range(n_freq):
        w = f * math.pi / k_len
        q[..., 2 + 2 * f] = (c * torch.cos(w * pos_q)).float()
        q[..., 3 + 2 * f] = (c * torch.sin(w * pos_q)).float()
        k[..., 2 + 2 * f] = (c * torch.cos(w * pos_k)).float()
        k[..., 3 + 2 * f] = (c * torch.sin(w * pos_k)).float()
    q[..., 34:] = 0.5 * torch.randn(b, hq, q_len, d - 34, generator=gen)
    k[..., 34:] = 0.5 * torch.randn(b, hkv, k_len, d - 34, generator=gen)
    v = torch.randn(b, hkv, k_len, d, generator=gen)
    return q, k, v, scale


PLANTED_CONFIGS = {
    # sink_blocks=0 / sink_tokens=0 so the estimate itself has to find the sink
    # auto is vertical-slash with per-head mass budgets: same budgets, same bound
    # query_windows=1: MInference's estimate from the last rows (the 4-window default is tested below)
    "auto": (
        SparseConfig(vertical_slash=VerticalSlashConfig(last_queries=64, vertical_mass=0.95, slash_mass=0.95, sink_tokens=0, local_tokens=8, block_size=32, query_windows=1)),
        0.15,
    ),
    "antidiagonal": (SparseConfig(antidiagonal=AntidiagonalConfig(block_size=32, stride=4, mass=0.95, sink_blocks=0)), 0.03),
    "block_sparse": (SparseConfig(block_sparse=BlockSparseConfig(block_size=16, mass=0.95, sink_blocks=0)), 0.03),
    "vertical_slash": (
        SparseConfig(vertical_slash=VerticalSlashConfig(last_queries=64, vertical_mass=0.95, slash_mass=0.95, sink_tokens=0, local_tokens=8, block_size=32, query_windows=1)),
        0.15,  # estimated from the last 64 queries only: a few percent of mass is lost mid-context
    ),
    "a_shape": (SparseConfig(a_shape=AShapeConfig(sink_tokens=16, local_tokens=64, block_size=32)), 0.01),
}



def planted_structure_misses(probs: torch.Tensor, mask: torch.Tensor, with_stripe: bool):
    """In every row where a planted structure carries >= 10% of the dense mass, the index must list
    nearly all of it: >= 80% of the structure's mass in that row on listed keys (a 0.95 mass
    threshold may legitimately drop the weakest key or two of a 16-key stripe).

    Returns ``({structure: number of heavy rows}, [problem descriptions])``."""
    heavy_rows, problems = {}, []
    structures = {"sink": SINK} | ({"stripe": STRIPE} if with_stripe else {})
    for label, keys in structures.items():
        part = probs[..., keys.start : keys.stop]  # [B, H, Lq, |keys|]
        structure_mass = part.sum(-1)
        heavy = structure_mass >= 0.1
        listed_mass = (part * mask[..., keys.start : keys.stop]).sum(-1)
        missing = heavy & (listed_mass < 0.8 * structure_mass)
        heavy_rows[label] = int(heavy.sum())
        if missing.any():
            problems.append(
                f"{label} not listed for {int(missing.sum())} of {int(heavy.sum())} rows where it holds >= 10% of the "
                f"mass (first [b, h, row]: {missing.nonzero()[0].tolist()})"
            )
    return heavy_rows, problems


@pytest.mark.parametrize("q_len,k_len", [(512, 512), (256, 512)], ids=["prefill_512", "chunk_256_of_512"])
@pytest.mark.parametrize("name", list(PLANTED_CONFIGS))
def test_estimated_index_contains_planted_structure_and_is_sparse(name, q_len, k_len):
    b, hq, hkv = 1, 4, 2
    # A-shape is static and blind to mid-context stripes, so its input has sink + local only.
    with_stripe = name != "a_shape"
    q, k, v, scale = planted_qkv(b, hq, hkv, q_len, k_len, stripe=with_stripe)
    config, max_rel_error = PLANTED_CONFIGS[name]
    _, result, out, kv_head_index = run_pattern(name, config, q, k, v, scale=scale)
    expected, probs = ref.attention_reference(q, k, v, scale=scale, kv_head_index=kv_head_index, return_probs=True)
    mask = listed_mask(result.index, b, hq, q_len, k_len)
    positions = [ref.query_position(i, q_len, k_len) for i in range(q_len)]

    # 1) the planted structure is listed wherever it matters
    heavy_rows, problems = planted_structure_misses(probs, mask, with_stripe)
    assert not problems, f"{name}: " + "; ".join(problems)
    assert heavy_rows["sink"] >= hq * q_len // 4, heavy_rows  # the planted structure really matters
    if with_stripe:
        assert heavy_rows["stripe"] >= hq * 100, heavy_rows
    # the local diagonal: each query sees its own key
    for i, p in enumerate(positions):
        assert mask[..., i, p].all(), f"{name}: diagonal key missing at row {i}"

    # 2) sparse: density strictly inside (0, 1)
    total = int(ref.pair_count(None, q_len, k_len))
    assert torch.equal(result.computed_pairs, ref.pair_count(mask, q_len, k_len))
    density = result.computed_pairs.double() / total
    assert ((density > 0) & (density < 0.6)).all(), f"{name}: density {density.tolist()}"

    # 3) close to dense
    rel = float((out.double() - expected).norm() / expected.norm())
    assert rel < max_rel_error, f"{name}: relative error vs dense {rel:.4f} >= {max_rel_error}"


def test_four_query_windows_find_the_planted_structure_and_pay_for_column_echoes():
    """The default estimate (4 query windows spread over the prompt) lists the planted sink, stripe and
    diagonal and stays close to dense. It keeps more than the last window alone: a window's mass on a
    column also lands on the diagonals ``p - j`` of its own rows, so every window echoes each vertical
    structure into its own band of (long) diagonals; at 2048 tokens that is 0.40 of the pairs against
    0.07 for one window (on real Qwen q/k at 32K-128K, 0.04-0.08 more)."""
    q_len = 2048
    q, k, v, scale = planted_qkv(1, 4, 2, q_len, q_len)
    windows, errors = {}, {}
    for count in (1, 4):
        config = SparseConfig(vertical_slash=VerticalSlashConfig(sink_tokens=0, local_tokens=8, block_size=32,
                                                                 query_windows=count))
        _, result, out, kv_head_index = run_pattern("auto", config, q, k, v, scale=scale)
        windows[count] = result.computed_pairs.double() / int(ref.pair_count(None, q_len, q_len))
        expected, probs = ref.attention_reference(q, k, v, scale=scale, kv_head_index=kv_head_index, return_probs=True)
        _, problems = planted_structure_misses(probs, listed_mask(result.index, 1, 4, q_len, q_len), True)
        assert not problems, f"{count} windows: " + "; ".join(problems)
        errors[count] = float((out.double() - expected).norm() / expected.norm())
    assert (windows[1] < 0.1).all() and (windows[4] < 0.5).all(), windows
    assert (windows[4] > windows[1]).all(), windows
    # What the density buys: the last rows alone miss mass the middle rows put elsewhere (0.18 relative
    # error here), four windows do not (0.02).
    assert errors[4] < 0.05 and errors[4] < errors[1] / 4, errors


def test_planted_structure_is_not_found_by_a_structure_blind_index():
    """Control for the test above: the local window alone (no sink, no stripe) is far from dense on
    the planted input, so the error bounds there are meaningful."""
    q, k, v, scale = planted_qkv(1, 2, 1, 512, 512)
    config = SparseConfig(a_shape=AShapeConfig(sink_tokens=0, local_tokens=64, block_size=32))
    _, _, out, _ = run_pattern("a_shape", config, q, k, v, scale=scale)
    expected = ref.attention_reference(q, k, v, scale=scale)
    rel = float((out.double() - expected).norm() / expected.norm())
    assert rel > 0.3, rel


BLIND_CONFIGS = {
    # mass 0 keeps only the forced structure (diagonal blocks / local diagonals): no sink, no stripe
    "antidiagonal": SparseConfig(antidiagonal=AntidiagonalConfig(block_size=32, stride=4, mass=0.0, sink_blocks=0)),
    "block_sparse": SparseConfig(block_sparse=BlockSparseConfig(block_size=16, mass=0.0, sink_blocks=0)),
    "vertical_slash": SparseConfig(vertical_slash=VerticalSlashConfig(vertical_mass=0.0, slash_mass=0.0, sink_tokens=0, local_tokens=8, block_size=32)),
}


@pytest.mark.parametrize("name", list(BLIND_CONFIGS))
def test_planted_structure_check_flags_an_index_that_keeps_only_forced_structure(name):
    """Control for the containment check: the same patterns with mass 0 miss sink and stripe."""
    q, k, v, scale = planted_qkv(1, 2, 1, 512, 512)
    _, result, out, kv_head_index = run_pattern(name, BLIND_CONFIGS[name], q, k, v, scale=scale)
    expected, probs = ref.attention_reference(q, k, v, scale=scale, kv_head_index=kv_head_index, return_probs=True)
    _, problems = planted_structure_misses(probs, listed_mask(result.index, 1, 2, 512, 512), with_stripe=True)
    assert any(p.startswith("sink") for p in problems) and any(p.startswith("stripe") for p in problems), problems
    rel = float((out.double() - expected).norm() / expected.norm())
    assert rel > 0.3, rel


# ------------------------------------------------------------------------------------------------
# budgets and dtypes


@pytest.mark.parametrize("name", ALL_PATTERNS)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
def test_keep_everything_half_precision_matches_dense_reference(name, dtype):
    q, k, v = ref.make_qkv(12, 2, 4, 2, 90, 150, 32, dtype)
    _, result, out, kv_head_index = run_pattern(name, SparseConfig.keep_everything(name), q, k, v, scale=32**-0.5)
    assert out.dtype == dtype
    expected = ref.attention_reference(q, k, v, scale=32**-0.5, kv_head_index=kv_head_index)
    tol = 2e-3 if dtype == torch.float16 else 1.6e-2
    torch.testing.assert_close(out.double(), expected, atol=tol, rtol=tol)


def test_vertical_slash_max_vertical_caps_the_columns():
    q, k, v = ref.make_qkv(13, 1, 2, 1, 200, 200, 32, spread=3.0)
    config = SparseConfig(vertical_slash=VerticalSlashConfig(
        last_queries=32, vertical_mass=1.0 - 1e-9, slash_mass=0.0, sink_tokens=0, local_tokens=4, max_vertical=3, block_size=32,
    ))
    _, result, _, _ = run_pattern("vertical_slash", config, q, k, v, scale=32**-0.5)
    index = inspectable_index(result.index)
    assert int(index.column_count.max()) <= 3
    # every column listed anywhere belongs to one set of at most 3 verticals per head
    for h in range(2):
        cols = {c for r in range(index.column_count.shape[2]) for c in index.column_index[0, h, r, : index.column_count[0, h, r]].tolist()}
        assert len(cols) <= 3, cols


@pytest.mark.parametrize("top_k", [1, 3])  # 0 is refused by BlockSparseConfig
def test_block_sparse_top_k_budget(top_k):
    q_len = k_len = 300
    q, k, v = ref.make_qkv(14, 1, 2, 1, q_len, k_len, 32, spread=3.0)
    config = SparseConfig(block_sparse=BlockSparseConfig(block_size=32, top_k=top_k, sink_blocks=1))
    _, result, out, _ = run_pattern("block_sparse", config, q, k, v, scale=32**-0.5)
    for r, (valid, diag, sink) in enumerate(ref.causal_block_sets(q_len, k_len, 32, 32, 1)):
        for h in range(2):
            kept = set(result.index.block_index[0, h, r, : result.index.block_count[0, h, r]].tolist())
            assert diag | sink <= kept <= valid
            assert len(kept - diag - sink) == min(top_k, len(valid - diag - sink)), (r, h, kept)


def test_vertical_slash_range_layout_option():
    """``range_layout``: a str enum (strings accepted, others refused in one line); ``auto`` cuts bands
    to the kernel's tile only where that measured faster (head_dim above 64)."""
    from sparseprefill import RangeLayout
    from sparseprefill.kernels.vertical_slash import range_pieces_pay

    assert VerticalSlashConfig().range_layout is RangeLayout.AUTO
    assert VerticalSlashConfig(range_layout="pieces").range_layout is RangeLayout.PIECES
    config = SparseConfig(vertical_slash=VerticalSlashConfig(range_layout="whole"))
    assert SparseConfig(**config.to_dict()).vertical_slash.range_layout is RangeLayout.WHOLE
    with pytest.raises(ValueError, match=r"range_layout must be one of \['auto', 'pieces', 'whole'\], got 'flat'"):
        VerticalSlashConfig(range_layout="flat")
    assert not range_pieces_pay(64) and range_pieces_pay(128) and range_pieces_pay(80)
    q = torch.zeros(1, 2, 8, 128)
    assert VerticalSlashPattern(VerticalSlashConfig(range_layout="pieces")).range_piece_keys(q) is None  # CPU


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=[pytest.mark.gpu, pytest.mark.skipif(
    not torch.cuda.is_available(), reason="needs a CUDA device")])])
def test_vertical_slash_column_layout_option(device):
    """``column_layout``: a str enum (strings accepted, others refused in one line); ``head`` reaches the
    index (one column list per head) and the pattern's output equals the per-block layout's."""
    from sparseprefill import ColumnLayout

    assert VerticalSlashConfig().column_layout is ColumnLayout.AUTO
    config = SparseConfig(vertical_slash=VerticalSlashConfig(column_layout="head"))
    assert SparseConfig(**config.to_dict()).vertical_slash.column_layout is ColumnLayout.HEAD
    with pytest.raises(ValueError, match=r"column_layout must be one of \['auto', 'block', 'head'\], got 'rows'"):
        VerticalSlashConfig(column_layout="rows")
    b, hq, hkv, length, head_dim = 1, 4, 2, 300, 64
    q, k, v = (t.to(device) for t in ref.make_qkv(5, b, hq, hkv, length, length, head_dim, spread=2.0))
    vs = dict(last_queries=32, sink_tokens=4, local_tokens=16, block_size=64 if device == "cuda" else 32)
    kw = dict(scale=head_dim**-0.5, softcap=None, kv_head_index=torch.arange(hq, device=device) // (hq // hkv))
    head = VerticalSlashPattern(VerticalSlashConfig(**vs, column_layout="head"))
    block = VerticalSlashPattern(VerticalSlashConfig(**vs, column_layout="block"))
    head_index, block_index = head.estimate(q, k, **kw), block.estimate(q, k, **kw)
    assert head_index.columns_per_head and not block_index.columns_per_head
    assert head_index.column_count.sum() > 0, "the test lines must have columns"
    assert torch.equal(head_index.to_dense_mask(), block_index.to_dense_mask())
    outs = []
    for pattern in (head, block):
        out = torch.full_like(q, float("nan"))
        result = pattern.run(q, k, v, out=out, **kw)
        outs.append((out, result.computed_pairs))
    torch.testing.assert_close(outs[0][0], outs[1][0], atol=1e-5, rtol=1e-5)
    assert torch.equal(outs[0][1], outs[1][1])


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("layout,head_dim,cut", [("auto", 64, False), ("auto", 128, True), ("pieces", 64, True),
                                                 ("whole", 128, False)])
def test_vertical_slash_range_layout_on_the_gpu(layout, head_dim, cut):
    """On CUDA the estimate's index is cut (``max_range_keys`` set) exactly where the layout says, and
    the patterned output equals the whole-band one (the same keys)."""
    b, hq, hkv, length = 1, 4, 2, 300
    q, k, v = (t.cuda() for t in ref.make_qkv(3, b, hq, hkv, length, length, head_dim, spread=2.0))
    vs = dict(last_queries=32, sink_tokens=4, local_tokens=16, block_size=64)
    pattern = VerticalSlashPattern(VerticalSlashConfig(**vs, range_layout=layout))
    kw = dict(scale=head_dim**-0.5, softcap=None, kv_head_index=torch.arange(hq, device="cuda") // (hq // hkv))
    index = pattern.estimate(q, k, **kw)
    assert (index.max_range_keys is not None) == cut
    whole = VerticalSlashPattern(VerticalSlashConfig(**vs, range_layout="whole")).estimate(q, k, **kw)
    assert torch.equal(index.to_dense_mask(), whole.to_dense_mask())
    out, out_whole = torch.full_like(q, float("nan")), torch.full_like(q, float("nan"))
    pattern.attend(q, k, v, index, out=out, **kw)
    pattern.attend(q, k, v, whole, out=out_whole, **kw)
    torch.testing.assert_close(out, out_whole, atol=1e-5, rtol=1e-5)


def test_antidiagonal_alternate_reaches_the_estimate_and_finds_an_even_distance_copy_head():
    """``AntidiagonalConfig(alternate=True)`` reaches the kernel: a head copying from 300 keys back (an
    even distance, invisible to the fixed antidiagonal at stride 8) gets its source blocks kept at a
    mass the fixed scoring spends elsewhere."""
    length, block = 1024, 128
    g = torch.Generator().manual_seed(0)
    k = torch.nn.functional.normalize(torch.randn(1, 1, length, 64, generator=g), dim=-1)
    q = torch.zeros(1, 1, length, 64)
    q[0, 0, 300:] = 30.0 * k[0, 0, : length - 300]
    kvh = torch.zeros(1, dtype=torch.long)
    query_block, sources = 5, [2, 3]

    def kept(alternate: bool) -> set[int]:
        cfg = AntidiagonalConfig(block_size=block, stride=8, mass=0.4, sink_blocks=0, alternate=alternate)
        index = AntidiagonalPattern(cfg).estimate(q, k, scale=1.0, softcap=None, kv_head_index=kvh)
        return set(index.block_index[0, 0, query_block, : int(index.block_count[0, 0, query_block])].tolist())

    assert set(sources) <= kept(True)
    assert not set(sources) <= kept(False)
    with pytest.raises(TypeError, match="antidiagonal.alternate must be a bool, got int 1"):
        AntidiagonalConfig(alternate=1)


def test_antidiagonal_sampled_scoring_reaches_the_estimate():
    """``AntidiagonalConfig(scoring="sampled_mass")`` reaches the kernel: on a head whose queries all
    attend one spike key far back (0.83 of the true mass of the last query block), the sampled scoring
    covers mass 0.5 with the spike's block and the diagonal alone, where the mean-logit scoring, which
    sees the spike diluted to 0.16, keeps background blocks too."""
    length, block, d = 512, 64, 64
    g = torch.Generator().manual_seed(3)
    k = torch.randn(1, 1, length, d, generator=g) * 0.3
    q = torch.randn(1, 1, length, d, generator=g) * 0.3
    direction = torch.nn.functional.normalize(torch.randn(d, generator=g), dim=0)
    k[0, 0, 70] += 8.0 * direction
    q[0, 0, 71:] += 8.0 * direction
    kvh = torch.zeros(1, dtype=torch.long)
    last = length // block - 1

    def kept(scoring: str) -> int:
        cfg = AntidiagonalConfig(block_size=block, stride=8, mass=0.5, sink_blocks=0, scoring=scoring)
        index = AntidiagonalPattern(cfg).estimate(q, k, scale=d**-0.5, softcap=None, kv_head_index=kvh)
        return set(index.block_index[0, 0, last, : int(index.block_count[0, 0, last])].tolist())

    assert kept("sampled_mass") == {1, last}
    assert {1, last} < kept("mean_logit")
    with pytest.raises(ValueError, match="antidiagonal.scoring must be one of"):
        AntidiagonalConfig(scoring="mean")


@pytest.mark.parametrize("config_cls, pattern_cls", [(AntidiagonalConfig, AntidiagonalPattern),
                                                     (BlockSparseConfig, BlockSparsePattern)])
def test_local_blocks_reach_the_estimate(config_cls, pattern_cls):
    """``local_blocks`` reaches the selection: at mass 0 (only forced blocks) every query block keeps its
    diagonal and the ``local_blocks`` key blocks before it, whatever the scores; bad values are refused."""
    length, block = 640, 64
    q, k, _ = ref.make_qkv(5, 1, 2, 1, length, length, 32)
    kvh = torch.zeros(2, dtype=torch.long)
    extra = {"stride": 8} if config_cls is AntidiagonalConfig else {}
    cfg = config_cls(block_size=block, mass=0.0, sink_blocks=0, local_blocks=3, **extra)
    index = pattern_cls(cfg).estimate(q, k, scale=32**-0.5, softcap=None, kv_head_index=kvh)
    for h in range(2):
        for r in range(length // block):
            kept = index.block_index[0, h, r, : int(index.block_count[0, h, r])].tolist()
            assert kept == list(range(max(0, r - 3), r + 1)), (h, r, kept)
    section = "antidiagonal" if config_cls is AntidiagonalConfig else "block_sparse"
    with pytest.raises(ValueError, match=f"{section}.local_blocks"):
        config_cls(local_blocks=-1)


def test_vertical_share_adds_the_heads_best_columns():
    """``vertical_share`` joins each head's best columns (by the last queries' scores) to the kept blocks:
    a key every late query attends is listed for every query block that can see it even where its block
    is not kept; all columns reproduce dense attention; the spot check counts the columns; bad shares
    are refused."""
    length, block, d = 512, 64, 32
    q, k, v = ref.make_qkv(9, 1, 2, 1, length, length, d)
    direction = torch.randn(d)
    k[0, 0, 100] = 6.0 * direction  # a retrieval key in block 1
    q[0, :, 300:] += 6.0 * direction
    kvh = torch.zeros(2, dtype=torch.long)
    kw = dict(scale=d**-0.5, softcap=None, kv_head_index=kvh)
    only_forced = dict(block_size=block, stride=8, mass=0.0, sink_blocks=0)
    blocks = AntidiagonalPattern(AntidiagonalConfig(**only_forced)).estimate(q, k, **kw)
    assert isinstance(blocks, BlockSparseIndex) and blocks.column_index is None
    index = AntidiagonalPattern(AntidiagonalConfig(**only_forced, vertical_share=0.01)).estimate(q, k, **kw)
    assert torch.equal(index.block_index, blocks.block_index) and index.column_index is not None
    listed = index.to_dense_mask()
    block_keys = blocks.to_dense_mask()
    assert torch.equal(listed & block_keys, block_keys), "the kept blocks stay listed"
    for h in range(2):
        assert bool(listed[0, h, 128:, 100].all()) and not bool(block_keys[0, h, 128:, 100].any())
        extra = (listed[0, h] & ~block_keys[0, h]).any(0).nonzero().flatten().tolist()
        assert 100 in extra and len(extra) <= math.ceil(0.01 * length)

    everything = AntidiagonalPattern(AntidiagonalConfig(**only_forced, vertical_share=1.0))
    out = torch.full_like(q, float("nan"))
    everything.run(q, k, v, out=out, **kw)
    dense = ref.attention_reference(q, k, v, scale=d**-0.5, kv_head_index=kvh)
    torch.testing.assert_close(out.double(), dense, atol=1e-5, rtol=1e-5)

    checked = AntidiagonalPattern(AntidiagonalConfig(**only_forced, vertical_share=0.01, spot_check_recall=0.999))
    flagged = checked.unpredictable_heads(q, k, index, **kw)
    assert flagged.shape == (1, 2) and bool(flagged.all()), "diagonal blocks plus 6 columns miss mass here"
    full = everything.estimate(q, k, **kw)
    assert not bool(AntidiagonalPattern(AntidiagonalConfig(**only_forced, spot_check_recall=0.999))
                    .unpredictable_heads(q, k, full, **kw).any())
    for bad in (-0.1, 1.5):
        with pytest.raises(ValueError, match="antidiagonal.vertical_share"):
            AntidiagonalConfig(vertical_share=bad)
