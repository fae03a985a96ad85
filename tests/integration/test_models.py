"""Patched vs unpatched on tiny random models of every supported family (CPU, fp32)."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch
from transformers import DynamicCache, GPT2Config, GPT2LMHeadModel

import sparseprefill
from sparseprefill import AntidiagonalConfig, BlockSparseConfig, SparseConfig, VerticalSlashConfig
from sparseprefill.patchers.support import cache_keyword

from tests.tiny_models import FAMILIES, SLIDING_WINDOW, random_ids, static_cache_generate, tiny_model

# Blocks of 32 so that a few hundred tokens already span many blocks.
SMALL_BLOCKS = dict(
    antidiagonal=AntidiagonalConfig(block_size=32, stride=8),
    block_sparse=BlockSparseConfig(block_size=32),
    vertical_slash=VerticalSlashConfig(block_size=32, sink_tokens=16, local_tokens=32, last_queries=32),
)
KEEP_ALL = SparseConfig.keep_everything(
    antidiagonal=AntidiagonalConfig(block_size=32, mass=1.0),
    block_sparse=BlockSparseConfig(block_size=32, mass=1.0),
)
SPARSE_DEFAULT = SparseConfig(min_sparse_len=0, **SMALL_BLOCKS)

# fp32 logits of the patched model with a keep-everything config must equal the unpatched ones up to
# summation-order rounding (the bound).
EXACT_ATOL = 1e-5
ODD_LENGTH = 333  # not a multiple of any block size, and longer than SLIDING_WINDOW

# Random weights attend diffusely (logit std ~1.7 even with q/k scaled by 8): the default mass rule
# (95% of estimated mass) then keeps (nearly) every pair, as designed: a diffuse head stays dense.
# Measured at 1000 tokens on all eight families: density >= 0.99, relative logit error <= 1e-4,
# top-1 agreement 1.0. The bounds below leave room for platform rounding only.
DEFAULT_REL_ERR = 1e-3
DEFAULT_TOP1 = 0.99
PEAKED_QK = 8.0
# A lossy setting (half the estimated mass) that makes every pattern sparse on these models, for the
# bound test and for the padding/chunking equalities, which must hold for any index.
LOSSY = SparseConfig(
    min_sparse_len=0,
    antidiagonal=AntidiagonalConfig(block_size=32, stride=8, mass=0.5),
    block_sparse=BlockSparseConfig(block_size=32, mass=0.5),
    vertical_slash=VerticalSlashConfig(block_size=32, sink_tokens=8, local_tokens=16, last_queries=32,
                                       vertical_mass=0.5, slash_mass=0.5, max_vertical=64, max_slash=16),
)
SPARSE_LENGTH = 1000


def _logits(model, ids, **kwargs):
    with torch.no_grad():
        return model(ids, **kwargs).logits


@pytest.fixture(autouse=True)
def _no_leftover_patch():
    yield


@pytest.mark.parametrize("family", FAMILIES)
def test_keep_everything_equals_unpatched(family):
    model = tiny_model(family)
    ids = random_ids(ODD_LENGTH)
    reference = _logits(model, ids)
    sparseprefill.patch(model, KEEP_ALL)
    patched = _logits(model, ids)
    stats = sparseprefill.stats(model)
    sparseprefill.unpatch(model)
    torch.testing.assert_close(patched, reference, atol=EXACT_ATOL, rtol=0)
    assert stats.phases["sparse_prefill"] + stats.phases["sliding_window_exact"] == model.config.num_hidden_layers
    assert not stats.fallbacks


@pytest.mark.parametrize("pattern", ["auto", "vertical_slash", "block_sparse", "antidiagonal", "a_shape", "dense"])
@pytest.mark.parametrize("family", ["llama", "gemma2"])  # gemma2: soft-capping inside every kernel
def test_every_pattern_keeping_everything_equals_unpatched(family, pattern):
    model = tiny_model(family, windowed=False)
    ids = random_ids(ODD_LENGTH)
    reference = _logits(model, ids)
    sparseprefill.patch(model, SparseConfig.keep_everything(pattern=pattern, **{
        "antidiagonal": AntidiagonalConfig(block_size=32, mass=1.0),
        "block_sparse": BlockSparseConfig(block_size=32, mass=1.0),
    }))
    patched = _logits(model, ids)
    sparseprefill.unpatch(model)
    torch.testing.assert_close(patched, reference, atol=EXACT_ATOL, rtol=0)


@pytest.mark.parametrize("family", FAMILIES)
def test_default_config_stays_close_on_diffuse_attention(family):
    model = tiny_model(family, windowed=False, qk_scale=PEAKED_QK)
    ids = random_ids(SPARSE_LENGTH)
    reference = _logits(model, ids)
    sparseprefill.patch(model, SPARSE_DEFAULT)
    patched = _logits(model, ids)
    stats = sparseprefill.stats(model)
    sparseprefill.unpatch(model)
    rel_err = float((patched - reference).norm() / reference.norm())
    top1 = float((patched.argmax(-1) == reference.argmax(-1)).float().mean())
    print(f"{family}: density={stats.density:.4f} rel_err={rel_err:.2e} top1={top1:.3f}")
    assert stats.phases["sparse_prefill"] == model.config.num_hidden_layers
    assert 0.0 < stats.density <= 1.0
    assert rel_err <= DEFAULT_REL_ERR
    assert top1 >= DEFAULT_TOP1


def _capture_layer_inputs(model, ids):
    """q, k, v and scale of every sparse-path call of one forward."""
    from sparseprefill.patchers import attention as attention_module

    captured = []
    original = attention_module._run_span

    def capture(q, k, v, out, **kwargs):
        captured.append((q.clone(), k.clone(), v.clone(), kwargs["scale"], kwargs["softcap"]))
        return original(q, k, v, out, **kwargs)

    sparseprefill.patch(model, LOSSY)
    attention_module._run_span = capture
    try:
        _logits(model, ids)
    finally:
        attention_module._run_span = original
        sparseprefill.unpatch(model)
    return captured


@pytest.mark.parametrize("pattern", ["auto", "vertical_slash", "block_sparse", "antidiagonal", "a_shape"])
@pytest.mark.parametrize("family", FAMILIES)
def test_sparse_output_error_is_bounded_by_dropped_mass(family, pattern):
    """For any index, a row keeping true attention mass m changes by at most 2 (1 - m) max_j |v_j|:
    o_s - o = sum_S p_j v_j (1/m - 1) - sum_notS p_j v_j, each part at most (1 - m) max|v|.
    Checked per row on real q/k/v of every family with a lossy setting (density < 1)."""
    from sparseprefill.kernels import dense_attention
    from sparseprefill.kernels.common import qk_scores
    from sparseprefill.patterns import build_pattern

    config = SparseConfig(pattern=pattern, **{f: getattr(LOSSY, f) for f in ("min_sparse_len", "antidiagonal",
                                                                              "block_sparse", "vertical_slash")},
                          a_shape=sparseprefill.AShapeConfig(sink_tokens=8, local_tokens=64, block_size=32))
    model = tiny_model(family, windowed=False, qk_scale=PEAKED_QK)
    q, k, v, scale, softcap = _capture_layer_inputs(model, random_ids(SPARSE_LENGTH // 2))[-1]
    kv_head_index = torch.arange(q.shape[1]) // (q.shape[1] // k.shape[1])
    pattern_impl = build_pattern(pattern, config)
    index = pattern_impl.estimate(q, k, scale=scale, softcap=softcap, kv_head_index=kv_head_index)
    sparse_out = pattern_impl.attend(q, k, v, index, scale=scale, softcap=softcap, kv_head_index=kv_head_index,
                                     out=torch.empty_like(q))
    dense_out, _ = dense_attention(q, k, v, scale=scale, softcap=softcap)
    scores = qk_scores(q, k, kv_head_index, scale)
    if softcap is not None:
        scores = softcap * torch.tanh(scores / softcap)
    causal = torch.ones(q.shape[2], k.shape[2], dtype=torch.bool).tril(k.shape[2] - q.shape[2])
    probs = torch.softmax(scores.masked_fill(~causal, float("-inf")), dim=-1)
    kept_mass = (probs * (index.to_dense_mask() & causal)).sum(-1)
    v_norm_max = v.norm(dim=-1).amax(dim=-1)[:, kv_head_index][..., None]  # [B, Hq, 1]
    error = (sparse_out - dense_out).norm(dim=-1)
    bound = 2 * (1 - kept_mass) * v_norm_max
    density = float(index.computed_pairs().sum()) / float(causal.sum() * q.shape[1])
    assert density < 1.0
    assert torch.all(error <= bound + 1e-5), float((error - bound).max())


@pytest.mark.parametrize("family", FAMILIES)
def test_chunked_prefill_equals_one_shot(family):
    model = tiny_model(family)
    ids = random_ids(ODD_LENGTH + 200)
    split = 301
    one_shot = _logits(model, ids)
    sparseprefill.patch(model, KEEP_ALL)
    cache = DynamicCache(config=model.config)
    with torch.no_grad():
        first = model(ids[:, :split], use_cache=True, **{cache_keyword(model): cache}).logits
        second = model(ids[:, split:], use_cache=True, **{cache_keyword(model): cache}).logits
    stats = sparseprefill.stats(model)
    sparseprefill.unpatch(model)
    torch.testing.assert_close(torch.cat([first, second], dim=1), one_shot, atol=EXACT_ATOL, rtol=0)
    # The second chunk ran on the sparse path with a query offset (or the exact window path).
    assert stats.phases["sparse_chunk"] + stats.phases["sliding_window_exact"] >= model.config.num_hidden_layers


@pytest.mark.parametrize("family", ["llama", "qwen3", "gemma3_text"])
def test_chunked_sparse_prefill_stays_close_to_dense(family):
    model = tiny_model(family, windowed=False, qk_scale=PEAKED_QK)
    ids = random_ids(SPARSE_LENGTH)
    reference = _logits(model, ids)
    sparseprefill.patch(model, SPARSE_DEFAULT)
    cache = DynamicCache(config=model.config)
    with torch.no_grad():
        first = model(ids[:, :600], use_cache=True, **{cache_keyword(model): cache}).logits
        second = model(ids[:, 600:], use_cache=True, **{cache_keyword(model): cache}).logits
    stats = sparseprefill.stats(model)
    sparseprefill.unpatch(model)
    chunked = torch.cat([first, second], dim=1)
    rel_err = float((chunked - reference).norm() / reference.norm())
    top1 = float((chunked.argmax(-1) == reference.argmax(-1)).float().mean())
    assert stats.phases["sparse_chunk"] == model.config.num_hidden_layers
    assert rel_err <= DEFAULT_REL_ERR and top1 >= DEFAULT_TOP1


@pytest.mark.parametrize("family", FAMILIES)
def test_generate_keep_everything_matches_unpatched(family):
    model = tiny_model(family)
    ids = random_ids(ODD_LENGTH)
    kwargs = dict(max_new_tokens=8, do_sample=False, pad_token_id=0)
    with torch.no_grad():
        reference = model.generate(ids, **kwargs)
    sparseprefill.patch(model, KEEP_ALL)
    with torch.no_grad():
        patched = model.generate(ids, **kwargs)
    stats = sparseprefill.stats(model)
    sparseprefill.unpatch(model)
    assert torch.equal(patched, reference)
    assert stats.fallbacks["decode"] == 7 * model.config.num_hidden_layers


@pytest.mark.parametrize("family", ["llama", "gemma2", "gemma3_text", "qwen2"])
@pytest.mark.parametrize("side", ["left", "right"])
def test_padded_batch_equals_each_sequence_alone(family, side):
    model = tiny_model(family, qk_scale=PEAKED_QK)
    lengths = (SPARSE_LENGTH - 200, SPARSE_LENGTH - 333)
    total = max(lengths)
    sequences = [random_ids(n, seed=i) for i, n in enumerate(lengths)]
    sparseprefill.patch(model, LOSSY)
    alone = [_logits(model, s) for s in sequences]
    ids = torch.zeros(2, total, dtype=torch.long)
    mask = torch.zeros(2, total, dtype=torch.long)
    for row, seq in enumerate(sequences):
        n = seq.shape[1]
        span = slice(total - n, total) if side == "left" else slice(0, n)
        ids[row, span] = seq[0]
        mask[row, span] = 1
    position_ids = (mask.cumsum(-1) - 1).clamp_min(0)
    batched = _logits(model, ids, attention_mask=mask, position_ids=position_ids)
    stats = sparseprefill.stats(model)
    sparseprefill.unpatch(model)
    assert stats.density < 1.0
    for row, seq in enumerate(sequences):
        n = seq.shape[1]
        span = slice(total - n, total) if side == "left" else slice(0, n)
        torch.testing.assert_close(batched[row, span], alone[row][0], atol=1e-4, rtol=1e-4)


def test_unpatch_is_bit_identical():
    model = tiny_model("llama", qk_scale=PEAKED_QK)
    ids = random_ids(ODD_LENGTH)
    before = _logits(model, ids)
    sparseprefill.patch(model, LOSSY)
    _logits(model, ids)
    sparseprefill.unpatch(model)
    assert model.config._attn_implementation == "sdpa"
    assert torch.equal(_logits(model, ids), before)
    assert not sparseprefill.is_patched(model)


def test_unpatch_releases_every_tensor_the_sparse_path_kept():
    """After unpatch, once the caller drops its stats, nothing the sparse prefill created stays alive
    (the GPU soak's "memory back where it started"): the stats' device-side pair counts are the only
    tensors the patch keeps between calls, and only the stats object holds them."""
    import gc
    import weakref

    model = tiny_model("llama", qk_scale=PEAKED_QK)
    sparseprefill.patch(model, LOSSY)
    _logits(model, random_ids(ODD_LENGTH))
    st = sparseprefill.stats(model)
    assert st.density is not None and st.density < 1.0
    counters = [weakref.ref(layer._last[0]) for layer in st.layers if isinstance(layer._last[0], torch.Tensor)]
    assert counters, "the sparse layers should have kept their pair counts on the device"
    sparseprefill.unpatch(model)
    del st
    gc.collect()
    assert all(ref() is None for ref in counters), "a pair count outlived unpatch and the caller's stats"


def test_short_prompt_runs_previous_implementation_bit_identically():
    model = tiny_model("gemma3_text", qk_scale=PEAKED_QK)
    ids = random_ids(ODD_LENGTH)
    before = _logits(model, ids)
    sparseprefill.patch(model)  # the default cost model predicts no gain at 333 tokens (or on a CPU)
    after = _logits(model, ids)
    stats = sparseprefill.stats(model)
    sparseprefill.unpatch(model)
    assert torch.equal(after, before)
    assert stats.fallbacks["cost_model"] == model.config.num_hidden_layers
    # The length rule, when asked for, records its own reason and is just as exact.
    sparseprefill.patch(model, sparseprefill.SparseConfig(min_sparse_len=16384))
    after = _logits(model, ids)
    stats = sparseprefill.stats(model)
    sparseprefill.unpatch(model)
    assert torch.equal(after, before)
    assert stats.fallbacks["short_prompt"] == model.config.num_hidden_layers


def test_patch_twice_raises():
    model = tiny_model("llama")
    sparseprefill.patch(model)
    with pytest.raises(sparseprefill.AlreadyPatchedError, match="already patched"):
        sparseprefill.patch(model)
    sparseprefill.unpatch(model)
    with pytest.raises(sparseprefill.NotPatchedError):
        sparseprefill.unpatch(model)


def test_unsupported_model_raises_with_supported_list():
    model = GPT2LMHeadModel(GPT2Config(n_layer=1, n_head=2, n_embd=32, vocab_size=64))
    with pytest.raises(sparseprefill.UnsupportedModelError, match="model_type='gpt2'.*llama.*qwen3"):
        sparseprefill.patch(model)
    assert model.config._attn_implementation != "sparseprefill"


def test_bad_config_values_are_refused():
    with pytest.raises(ValueError, match="unknown pattern 'vertical'"):
        SparseConfig(pattern="vertical")
    with pytest.raises(ValueError, match=r"antidiagonal.mass must be in \[0, 1\]"):
        AntidiagonalConfig(mass=1.5)
    with pytest.raises(ValueError, match="multiple of antidiagonal.stride"):
        AntidiagonalConfig(block_size=64, stride=48)
    # Each refusal names the field, what was given and what is allowed.
    with pytest.raises(TypeError, match=r"vertical_slash.vertical_mass must be a number in \[0, 1\], got str '0.9'"):
        VerticalSlashConfig(vertical_mass="0.9")
    with pytest.raises(ValueError, match="vertical_slash.block_size must be a power of two >= 16, got 7"):
        VerticalSlashConfig(block_size=7)
    with pytest.raises(ValueError, match="block_sparse.top_k must be > 0, got 0"):
        BlockSparseConfig(top_k=0)
    with pytest.raises(TypeError, match="min_sparse_len must be an int, got str '8k'"):
        SparseConfig(min_sparse_len="8k")


def test_selecting_the_implementation_without_patch_is_an_error():
    model = tiny_model("llama")
    sparseprefill.patch(model)
    sparseprefill.unpatch(model)  # registers the implementation globally, then detaches
    other = tiny_model("llama", seed=1)
    other.set_attn_implementation("sparseprefill")
    with pytest.raises(RuntimeError, match="without sparseprefill.patch"):
        _logits(other, random_ids(40))


def test_static_cache_generation_falls_back_exactly():
    model = tiny_model("llama")
    patched, reference, stats = static_cache_generate(model, KEEP_ALL, random_ids(ODD_LENGTH))
    assert torch.equal(patched, reference)
    # Static-cache keys run past the queries: the prefill cannot use bottom-right alignment.
    assert stats.fallbacks["unaligned_cache"] >= model.config.num_hidden_layers


def test_training_mode_runs_dense_and_backpropagates():
    model = tiny_model("llama", qk_scale=PEAKED_QK)
    ids = random_ids(200)
    reference = model(ids).logits
    sparseprefill.patch(model, SPARSE_DEFAULT)
    model.train()
    logits = model(ids).logits
    logits.sum().backward()
    stats = sparseprefill.stats(model)
    sparseprefill.unpatch(model)
    torch.testing.assert_close(logits, reference, atol=EXACT_ATOL, rtol=0)
    assert stats.fallbacks["training_or_dropout"] == model.config.num_hidden_layers
    assert model.model.layers[0].self_attn.q_proj.weight.grad is not None


def test_output_attentions_runs_dense_with_weights():
    model = tiny_model("llama", qk_scale=PEAKED_QK)
    ids = random_ids(150)
    sparseprefill.patch(model, SPARSE_DEFAULT)
    with torch.no_grad():
        out = model(ids, output_attentions=True)
    stats = sparseprefill.stats(model)
    sparseprefill.unpatch(model)
    assert stats.fallbacks["output_attentions"] == model.config.num_hidden_layers
    weights = out.attentions[0]
    assert weights.shape == (1, 4, 150, 150)
    torch.testing.assert_close(weights.sum(-1), torch.ones(1, 4, 150))
    assert torch.all(weights.triu(1) == 0)


def test_sliding_layers_are_exact_windows_and_reported():
    model = tiny_model("gemma3_text", qk_scale=PEAKED_QK)
    ids = random_ids(SPARSE_LENGTH)
    reference = _logits(model, ids)
    sparseprefill.patch(model, SparseConfig.keep_everything(antidiagonal=AntidiagonalConfig(block_size=32, mass=1.0)))
    patched = _logits(model, ids)
    stats = sparseprefill.stats(model)
    sparseprefill.unpatch(model)
    torch.testing.assert_close(patched, reference, atol=EXACT_ATOL, rtol=0)
    sliding, full = stats.layers
    assert sliding.phases["sliding_window_exact"] == 1 and sliding.density == pytest.approx(1.0)
    assert full.phases["sparse_prefill"] == 1
    assert "sliding_window_exact" in str(stats)
    assert SLIDING_WINDOW < SPARSE_LENGTH


def test_stats_table_and_dict():
    model = tiny_model("qwen2", qk_scale=PEAKED_QK)
    sparseprefill.patch(model, SPARSE_DEFAULT)
    _logits(model, random_ids(SPARSE_LENGTH))
    stats = sparseprefill.stats(model)
    as_dict = stats.to_dict()
    assert as_dict["model_type"] == "qwen2" and len(as_dict["layers"]) == 2
    # Heads routed dense by their estimate: counted per layer (only the GPU routes, so none here).
    assert as_dict["estimated_dense_heads"] == stats.estimated_dense_heads == 0
    assert all(layer["estimated_dense_heads"] == 0 for layer in as_dict["layers"])
    text = str(stats)
    assert "overall density" in text and "sparse_prefill" in text
    sparseprefill.reset_stats(model)
    assert sparseprefill.stats(model).density is None
    sparseprefill.unpatch(model)



def test_auto_column_layout_switches_to_per_head_lists_when_memory_is_short(monkeypatch):
    """``column_layout="auto"`` (the default) builds per-head column lists where the per-block table
    would not fit the device memory still available (faked here: the CPU reference otherwise always
    builds per-block lists), with the same logits, and ``stats()`` counts those calls."""
    from sparseprefill.kernels.vertical_slash import head_columns

    config = replace(LOSSY, pattern="vertical_slash")
    assert config.vertical_slash.column_layout.value == "auto"
    model = tiny_model("llama", windowed=False, qk_scale=PEAKED_QK)
    ids = random_ids(SPARSE_LENGTH)
    sparseprefill.patch(model, config)
    per_block = _logits(model, ids)
    assert sparseprefill.stats(model).per_head_columns == 0
    sparseprefill.reset_stats(model)
    monkeypatch.setattr(head_columns, "available_device_memory", lambda device: 1)
    per_head = _logits(model, ids)
    stats = sparseprefill.stats(model)
    sparseprefill.unpatch(model)
    torch.testing.assert_close(per_head, per_block, atol=EXACT_ATOL, rtol=0)
    assert stats.per_head_columns == model.config.num_hidden_layers > 0
    assert stats.to_dict()["per_head_columns"] == stats.per_head_columns
    assert "calls with per-head column lists" in str(stats)


def test_dense_layers_run_all_their_heads_dense_and_the_others_sparse():
    model = tiny_model("llama", windowed=False, qk_scale=PEAKED_QK)
    ids = random_ids(SPARSE_LENGTH)
    reference = _logits(model, ids)
    layers = model.config.num_hidden_layers
    heads = model.config.num_attention_heads
    # Every layer listed: exact, whatever the lossy budgets would have kept.
    sparseprefill.patch(model, replace(LOSSY, dense_layers=tuple(range(layers))))
    patched = _logits(model, ids)
    stats = sparseprefill.stats(model)
    sparseprefill.unpatch(model)
    torch.testing.assert_close(patched, reference, atol=EXACT_ATOL, rtol=0)
    assert stats.density == 1.0
    assert all(dict(layer.patterns) == {"dense": heads} for layer in stats.layers)
    # Only layer 0 listed: it stays exact and dense, the others follow the lossy config.
    sparseprefill.patch(model, replace(LOSSY, dense_layers=[0, 0]))
    _logits(model, ids)
    stats = sparseprefill.stats(model)
    sparseprefill.unpatch(model)
    assert stats.layers[0].density == 1.0 and dict(stats.layers[0].patterns) == {"dense": heads}
    assert all(layer.density < 0.9 and "dense" not in layer.patterns for layer in stats.layers[1:])
    with pytest.raises(ValueError, match=r"dense_layers lists layer\(s\) \[7\], but the model's attention layers are 0-1"):
        sparseprefill.patch(model, SparseConfig(dense_layers=(0, 7)))
    assert not sparseprefill.is_patched(model)
    with pytest.raises(TypeError, match="dense_layers must be a tuple of layer indices, got '0'"):
        SparseConfig(dense_layers="0")
    with pytest.raises(ValueError, match=r"dense_layers\[\] must be >= 0, got -1"):
        SparseConfig(dense_layers=(-1,))


def test_softcap_model_on_sdpa_falls_back_to_eager_and_unpatch_restores_sdpa():
    model = tiny_model("gemma2", qk_scale=PEAKED_QK)
    ids = random_ids(ODD_LENGTH)
    eager_logits = _logits(model, ids)  # tiny_model puts Gemma 2 on eager: the soft-capped reference
    try:
        model.set_attn_implementation("sdpa")
    except ValueError:
        pytest.skip("this transformers version refuses SDPA for Gemma 2 (it cannot soft-cap)")
    sparseprefill.patch(model)  # default min_sparse_len: the prompt takes the dense fallback
    patched = _logits(model, ids)
    state = model._sparseprefill_state
    sparseprefill.unpatch(model)
    assert state.fallback_implementation == "eager" and state.previous_implementation == "sdpa"
    assert model.config._attn_implementation == "sdpa"
    torch.testing.assert_close(patched, eager_logits, atol=EXACT_ATOL, rtol=0)


def test_layer_stats_read_device_counts_only_when_read():
    """Pair counts recorded as tensors (no host read in the forward pass) add up with int records,
    also after the pending list is folded."""
    from sparseprefill.patchers.state import MAX_PENDING_COUNTS, LayerStats, Phase

    stats = LayerStats(0)
    stats.record(Phase.SPARSE_PREFILL, torch.tensor([3, 4]), 10)
    stats.record(Phase.SPARSE_PREFILL, 5, 10)
    assert stats.computed_pairs == 12 and stats.causal_pairs == 20
    assert stats.last_density == 0.5 and stats.density == 0.6
    for _ in range(MAX_PENDING_COUNTS + 3):
        stats.record(Phase.SPARSE_CHUNK, torch.tensor(1), 1)
    assert len(stats._pending) < MAX_PENDING_COUNTS
    assert stats.computed_pairs == 12 + MAX_PENDING_COUNTS + 3
    assert stats.to_dict()["computed_pairs"] == stats.computed_pairs


@pytest.mark.parametrize("family,backend,dense_layers", [
    ("llama", "aot_eager", ()), ("qwen2", "aot_eager", ()), ("llama", "aot_eager", (0,)), ("llama", "inductor", ()),
])
def test_fullgraph_compile_of_a_default_patched_model_matches_eager(family, backend, dense_layers):
    """The default's pattern (vertical-slash) runs each sparse layer as one op under torch.compile
    (``patterns/compiled.py``), so a patched model compiles whole and gives the eager logits and stats; with
    inductor the rest of the model is compiled code, so the logits agree to rounding. (At this length the
    default masses keep every pair: ``LOSSY``'s masses make it sparse.) A layer forced dense runs as an op too."""
    model = tiny_model(family, qk_scale=PEAKED_QK)
    ids = random_ids(ODD_LENGTH)
    sparseprefill.patch(model, replace(LOSSY, pattern="auto", dense_layers=dense_layers))
    try:
        eager = _logits(model, ids)
        eager_stats = sparseprefill.stats(model).to_dict()
        assert 0 < eager_stats["density"] < 1, eager_stats["density"]
        sparseprefill.reset_stats(model)
        torch._dynamo.reset()
        with torch.no_grad():
            compiled = torch.compile(model, fullgraph=True, backend=backend)(ids).logits
        compiled_stats = sparseprefill.stats(model).to_dict()
    finally:
        torch._dynamo.reset()
        sparseprefill.unpatch(model)
    tolerance = 1e-6 if backend == "aot_eager" else 1e-4
    torch.testing.assert_close(compiled, eager, atol=tolerance, rtol=tolerance)
    for key in ("density", "phases", "fallbacks", "estimated_dense_heads", "per_head_columns"):
        assert compiled_stats[key] == eager_stats[key], key


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("route", [False, True], ids=["sparse_kernels", "routed_dense"])
@pytest.mark.parametrize("family", ["llama", "qwen2"])
def test_fullgraph_compile_of_a_default_patched_model_matches_eager_on_the_gpu(family, route):
    """The same on the GPU, bf16, where the op's body runs the Triton estimate, index and kernel (or, routed,
    SDPA for the heads past the break-even): logits equal eager's bit for bit, and the same stats."""
    model = tiny_model(family, qk_scale=PEAKED_QK).cuda().to(torch.bfloat16)
    ids = random_ids(3000).cuda()
    sparseprefill.patch(model, replace(LOSSY, pattern="auto", route_dense_heads=route))
    try:
        eager = _logits(model, ids)
        eager_stats = sparseprefill.stats(model).to_dict()
        sparseprefill.reset_stats(model)
        torch._dynamo.reset()
        with torch.no_grad():
            compiled = torch.compile(model, fullgraph=True, backend="aot_eager")(ids).logits
        compiled_stats = sparseprefill.stats(model).to_dict()
    finally:
        torch._dynamo.reset()
        sparseprefill.unpatch(model)
    assert torch.equal(compiled, eager)
    for key in ("density", "phases", "fallbacks", "estimated_dense_heads", "per_head_columns"):
        assert compiled_stats[key] == eager_stats[key], key
    if not route:
        assert 0 < compiled_stats["density"] < 1, compiled_stats["density"]


@pytest.mark.parametrize("family", ["llama", "qwen2"])
def test_fullgraph_compile_of_an_antidiagonal_patched_model_matches_eager(family):
    """The antidiagonal estimate is one op of fixed shapes, so a patched model compiles whole
    (``fullgraph=True``) and gives the eager logits and the same stats (density, phases)."""
    model = tiny_model(family, qk_scale=PEAKED_QK)
    ids = random_ids(ODD_LENGTH)
    config = SparseConfig(pattern="antidiagonal", min_sparse_len=0,
                          antidiagonal=AntidiagonalConfig(block_size=16, mass=0.6, vertical_share=0.05))
    sparseprefill.patch(model, config)
    try:
        eager = _logits(model, ids)
        eager_stats = sparseprefill.stats(model).to_dict()
        assert 0 < eager_stats["density"] < 1, eager_stats["density"]
        sparseprefill.reset_stats(model)
        torch._dynamo.reset()
        with torch.no_grad():
            compiled = torch.compile(model, fullgraph=True, backend="aot_eager")(ids).logits
        compiled_stats = sparseprefill.stats(model).to_dict()
    finally:
        torch._dynamo.reset()
        sparseprefill.unpatch(model)
    torch.testing.assert_close(compiled, eager, atol=1e-5, rtol=1e-5)
    for key in ("density", "phases", "fallbacks", "estimated_dense_heads"):
        assert compiled_stats[key] == eager_stats[key], key
