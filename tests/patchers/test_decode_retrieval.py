"""Top-k KV page retrieval for decode (``SparseConfig(decode=...)``): plumbing, padding, reuse, fallbacks.

Tiny random-weight models (CPU, fp32, naive kernels). A budget above the context must reproduce
unpatched generation exactly; a small budget must be sparse while always keeping the sink and recent
pages; a left-padded batch must give each row what it gets alone. The real-model accuracy check is
the ``slow`` test at the end (SmolLM2-135M).
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import torch

import sparseprefill
from sparseprefill.config import DecodeMethod, DecodeRetrievalConfig, SparseConfig
from sparseprefill.patchers.support import cache_keyword
from sparseprefill.patterns import retrieval as retrieval_module

from tests.tiny_models import random_ids, static_cache_generate, tiny_model

PROMPT = 301  # odd: the last page is partial
NEW_TOKENS = 12
PEAKED_QK = 4.0  # peaked attention, so a small budget changes something
PAGE = 16
# 8 pages: 1 sink page + 2 recent pages (+1 unaligned) + the last page leave 3-4 pages to retrieve.
LOSSY = DecodeRetrievalConfig(page_size=PAGE, budget_tokens=128, sink_tokens=16, recent_tokens=32, min_context=0,
                              dense_layers=(), reselect_every=1)
KEEP_ALL = DecodeRetrievalConfig.keep_everything()
GEN = dict(do_sample=False, pad_token_id=0)


def _generate(model, ids, **kwargs):
    with torch.no_grad():
        return model.generate(ids, max_new_tokens=NEW_TOKENS, output_logits=True, return_dict_in_generate=True,
                              **GEN, **kwargs)


def _patched(model, decode, **config):
    # Prefill dense (min_sparse_len above the prompt): these tests are about decode.
    return sparseprefill.patch(model, SparseConfig(min_sparse_len=10**6, decode=decode, **config))


def _global_layers(model) -> list[int]:
    types = getattr(model.config, "layer_types", None)
    window = getattr(model.config, "sliding_window", None)
    n = model.config.num_hidden_layers
    if types is not None:
        return [i for i, t in enumerate(types) if t == "full_attention"]
    if window is not None and getattr(model.config, "use_sliding_window", True):
        max_window = getattr(model.config, "max_window_layers", None)
        if max_window is None:
            return []  # Mistral / Phi-3: every layer slides
        return [i for i in range(n) if i >= max_window]  # Qwen: layers from max_window_layers slide
    return list(range(n))


@pytest.mark.parametrize("family", ["llama", "qwen3", "phi3", "gemma2", "gemma3_text", "glm4", "mistral"])
def test_keep_everything_generate_equals_unpatched(family):
    model = tiny_model(family, qk_scale=PEAKED_QK)
    ids = random_ids(PROMPT, seed=1)  # seed 0 makes tiny GLM-4 emit EOS at once
    reference = _generate(model, ids)
    _patched(model, KEEP_ALL)
    patched = _generate(model, ids)
    stats = sparseprefill.stats(model)
    sparseprefill.unpatch(model)
    assert torch.equal(patched.sequences, reference.sequences)
    for a, b in zip(patched.logits, reference.logits):
        torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)
    steps = patched.sequences.shape[1] - PROMPT - 1  # a tiny model may emit EOS early
    assert steps > 0
    config = model.config
    sliding = config.num_hidden_layers - len(_global_layers(model))
    if family in ("mistral", "phi3"):
        sliding = config.num_hidden_layers if getattr(config, "sliding_window", None) else 0
    assert stats.phases.get("sparse_decode", 0) == steps * (config.num_hidden_layers - sliding)
    assert stats.fallbacks.get("decode_sliding_window", 0) == steps * sliding
    assert "decode" not in stats.fallbacks
    if stats.phases.get("sparse_decode"):
        assert stats.density == pytest.approx(1.0)


def _capture_selections(monkeypatch):
    """Record (key length, page_index, page_count) of every sparse decode call that used a selection."""
    calls = []
    kernel = retrieval_module.sparse_decode_attention

    def spy(q, k, v, page_index=None, page_count=None, **kwargs):
        if page_index is not None:
            calls.append((k.shape[2], page_index.clone(), page_count.clone()))
        return kernel(q, k, v, page_index, page_count, **kwargs)

    monkeypatch.setattr(retrieval_module, "sparse_decode_attention", spy)
    return calls


@pytest.mark.parametrize("family", ["llama", "gemma3_text"])
def test_small_budget_is_sparse_and_keeps_sink_and_recent(family, monkeypatch):
    calls = _capture_selections(monkeypatch)
    model = tiny_model(family, qk_scale=PEAKED_QK)
    ids = random_ids(PROMPT)
    reference = _generate(model, ids)
    _patched(model, LOSSY)
    patched = _generate(model, ids)
    stats = sparseprefill.stats(model)
    sparseprefill.unpatch(model)
    assert stats.phases["sparse_decode"] == (NEW_TOKENS - 1) * len(_global_layers(model))
    assert stats.density < 0.5  # 128 of 302-313 keys
    assert calls
    for k_len, index, count in calls:
        pages = -(-k_len // PAGE)
        for row_index, row_count in zip(index.flatten(0, 1), count.flatten()):
            chosen = set(row_index[: int(row_count)].tolist())
            assert len(chosen) == int(row_count) == LOSSY.budget_tokens // PAGE
            assert 0 in chosen  # sink
            first_recent = (k_len - LOSSY.recent_tokens) // PAGE
            assert set(range(first_recent, pages)) <= chosen  # recent window and the last page
    # Sparse but not broken: the first token comes from the dense prefill, and the logits stay finite.
    assert patched.sequences[0, PROMPT] == reference.sequences[0, PROMPT]
    assert all(torch.isfinite(x).all() for x in patched.logits)


@pytest.mark.parametrize("family", ["llama", "gemma2"])
def test_left_padded_batch_equals_each_row_alone(family):
    model = tiny_model(family, qk_scale=PEAKED_QK)
    lossy = DecodeRetrievalConfig(**{**LOSSY.to_dict(), "dense_layers": (), "reselect_every": 2})
    sequences = [random_ids(n, seed=i) for i, n in enumerate((PROMPT, PROMPT - 50))]
    _patched(model, lossy)
    alone = [_generate(model, s).sequences[0, s.shape[1]:] for s in sequences]
    total = max(s.shape[1] for s in sequences)
    ids = torch.zeros(2, total, dtype=torch.long)
    mask = torch.zeros(2, total, dtype=torch.long)
    for row, s in enumerate(sequences):
        ids[row, total - s.shape[1]:] = s[0]
        mask[row, total - s.shape[1]:] = 1
    sparseprefill.reset_stats(model)
    batched = _generate(model, ids, attention_mask=mask).sequences[:, total:]
    stats = sparseprefill.stats(model)
    sparseprefill.unpatch(model)
    assert stats.phases["sparse_decode"] == (NEW_TOKENS - 1) * len(_global_layers(model))
    assert stats.density < 0.6
    assert "decode_unsupported_mask" not in stats.fallbacks
    for row in range(2):
        assert torch.equal(batched[row], alone[row])


def test_unpadded_batch_equals_each_row_alone():
    model = tiny_model("llama", qk_scale=PEAKED_QK)
    sequences = [random_ids(PROMPT, seed=i) for i in range(2)]
    _patched(model, LOSSY)
    alone = [_generate(model, s).sequences[0] for s in sequences]
    batched = _generate(model, torch.cat(sequences)).sequences
    sparseprefill.unpatch(model)
    for row in range(2):
        assert torch.equal(batched[row], alone[row])


def test_dense_layers_decode_dense():
    model = tiny_model("llama", qk_scale=PEAKED_QK)
    _patched(model, DecodeRetrievalConfig(**{**LOSSY.to_dict(), "dense_layers": (0,)}))
    _generate(model, random_ids(PROMPT))
    stats = sparseprefill.stats(model)
    sparseprefill.unpatch(model)
    layer0, layer1 = stats.layers
    assert layer0.fallbacks["decode_dense_layer"] == NEW_TOKENS - 1 and "sparse_decode" not in layer0.phases
    assert layer1.phases["sparse_decode"] == NEW_TOKENS - 1 and layer1.density < 0.5


@pytest.mark.parametrize("reselect_every", [1, 4])
def test_reselect_every_reuses_selections(reselect_every, monkeypatch):
    calls = _capture_selections(monkeypatch)
    model = tiny_model("llama", qk_scale=PEAKED_QK)
    _patched(model, DecodeRetrievalConfig(**{**LOSSY.to_dict(), "reselect_every": reselect_every}))
    # A prompt ending 3 tokens before a page boundary: reused selections must gain the new page.
    prompt = 16 * 19 - 3
    _generate(model, random_ids(prompt))
    state = model._sparseprefill_state
    sparseprefill.unpatch(model)
    steps = NEW_TOKENS - 1
    for layer in range(model.config.num_hidden_layers):
        assert state.decode.selection_calls[layer] == -(-steps // reselect_every)
    # Every call attends the cache's last page (the current token), reused selection or not.
    for k_len, index, count in calls:
        last = (k_len - 1) // PAGE
        for row_index, row_count in zip(index.flatten(0, 1), count.flatten()):
            listed = row_index[: int(row_count)].tolist()
            assert last in listed and listed == sorted(set(listed))


def test_new_generate_call_rebuilds_summaries():
    model = tiny_model("llama", qk_scale=PEAKED_QK)
    first, second = random_ids(PROMPT, seed=1), random_ids(PROMPT, seed=2)
    _patched(model, LOSSY)
    fresh_second = _generate(model, second).sequences
    state = model._sparseprefill_state
    builds_before = dict(state.decode.summary_builds)
    _generate(model, first)
    # Same prompt length as the call before: only the prefill call tells the caches apart.
    again = _generate(model, second).sequences
    builds = state.decode.summary_builds
    sparseprefill.unpatch(model)
    assert torch.equal(again, fresh_second)
    for layer, count in builds_before.items():
        assert builds[layer] == count + 2


def test_static_cache_decode_falls_back_visibly():
    model = tiny_model("llama")
    # Prefill dense (min_sparse_len above the prompt), as _patched does: this test is about decode.
    config = SparseConfig(min_sparse_len=10**6, decode=KEEP_ALL)
    patched, reference, stats = static_cache_generate(model, config, random_ids(PROMPT))
    assert torch.equal(patched, reference)
    # Keys past the current token (the unfilled static buffer) cannot be paged: dense.
    assert stats.fallbacks["decode_unsupported_mask"] >= model.config.num_hidden_layers


def test_short_context_and_disabled_decode_stay_dense():
    model = tiny_model("llama")
    ids = random_ids(PROMPT)
    reference = _generate(model, ids).sequences
    _patched(model, DecodeRetrievalConfig(dense_layers=()))  # default min_context: 128K
    short = _generate(model, ids).sequences
    stats = sparseprefill.stats(model)
    sparseprefill.unpatch(model)
    assert torch.equal(short, reference)
    assert stats.fallbacks["decode_short_context"] == 2 * (NEW_TOKENS - 1)
    _patched(model, None)
    _generate(model, ids)
    stats = sparseprefill.stats(model)
    sparseprefill.unpatch(model)
    assert stats.fallbacks["decode"] == 2 * (NEW_TOKENS - 1) and "sparse_decode" not in stats.phases


def test_quest_method_runs():
    model = tiny_model("llama", qk_scale=PEAKED_QK)
    _patched(model, DecodeRetrievalConfig(**{**LOSSY.to_dict(), "method": "quest"}))
    _generate(model, random_ids(PROMPT))
    stats = sparseprefill.stats(model)
    sparseprefill.unpatch(model)
    assert stats.phases["sparse_decode"] == 2 * (NEW_TOKENS - 1) and stats.density < 0.5


def test_decode_config_api_and_validation():
    default = SparseConfig(decode="topk").decode
    assert default == DecodeRetrievalConfig()
    assert default.method is DecodeMethod.MEAN_STD and default.dense_layers == (0, 1)
    config = SparseConfig(decode={"budget_tokens": 1024, "dense_layers": [3, 1], "method": "quest"})
    assert config.decode.dense_layers == (1, 3) and config.decode.method is DecodeMethod.QUEST
    assert SparseConfig(**config.to_dict()) == config
    assert SparseConfig().to_dict()["decode"] is None and SparseConfig().decode is None
    bad = [
        (dict(page_size=24), ValueError), (dict(page_size=8), ValueError), (dict(page_size=256), ValueError),
        (dict(budget_tokens=256), ValueError),  # 16 pages < 4 sink + 16 recent + 1
        (dict(method="lsh"), ValueError), (dict(reselect_every=0), ValueError), (dict(min_context=-1), ValueError),
        (dict(dense_layers=(-1,)), ValueError), (dict(dense_layers="0"), TypeError), (dict(page_size=16.0), TypeError),
    ]
    for kwargs, error in bad:
        with pytest.raises(error):
            DecodeRetrievalConfig(**kwargs)
    with pytest.raises(TypeError):
        SparseConfig(decode="quest")
    with pytest.raises(TypeError):
        SparseConfig(decode=3)


# ---------------------------------------------------------------------------------------------------
# Real model: SmolLM2-135M-Instruct on CPU.

REAL_PROMPT = 2048
REAL_NEW_TOKENS = 64
REAL_BUDGET = 512
# Measured with this test (CPU, fp32, torch 2.13, transformers 5.23; first 2048 tokens of the reference
# text, budget 512, page 16, sink 64, recent 256, dense layers 0-1, reselect_every 4, 64 new tokens):
# teacher-forced argmax agreement 1.0 (63/63 decode steps), free-running greedy identical to dense for
# all 64 tokens, mean KL 0.0041 nats (max 0.018), decode density 0.242, attention-mass recall vs the
# exact top pages mean 0.891 (p5 0.41, min 0.14; the early layers 2-10 have the diffuse attention and
# the 0.2-0.6 output errors). The bounds allow 3 of 63 steps to differ and the recall to lose 0.04
# (other CPUs / BLAS), and fail if the selection regresses or stops being sparse.
MIN_TEACHER_FORCED_AGREEMENT = 0.95
MIN_MEAN_RECALL = 0.85
MAX_DECODE_DENSITY = 0.3


def _decode_accuracy_script():
    path = Path(__file__).resolve().parents[2] / "experiments" / "decode_accuracy.py"
    spec = importlib.util.spec_from_file_location("decode_accuracy", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.slow
def test_smollm2_topk_decode_agrees_with_dense():
    from sparseprefill.evals.logits import reference_input_ids

    from tests.real_models import require_smollm2

    model, tokenizer = require_smollm2()
    script = _decode_accuracy_script()
    ids = reference_input_ids(tokenizer, REAL_PROMPT)
    cfg = DecodeRetrievalConfig(budget_tokens=REAL_BUDGET, page_size=PAGE, min_context=0)
    result = script.compare(model, ids, cfg, REAL_NEW_TOKENS)
    print(result)
    assert result["sparse_decode_calls"] > 0 and result["decode_density"] < MAX_DECODE_DENSITY
    assert result["teacher_forced_agreement"] >= MIN_TEACHER_FORCED_AGREEMENT
    assert result["recall_mean"] >= MIN_MEAN_RECALL


# ------------------------------------------------------------------------------ profile overrides


def _profile_with_decode(model, decode):
    """A profile for ``model`` whose heads all run dense prefill, with per-layer ``decode`` overrides."""
    from sparseprefill.profiles import Calibration, HeadSetting, Profile, model_identity

    identity = model_identity(model.config)
    calibration = Calibration(source="test", lengths=(PROMPT,), samples=1, objective="attention_mass_recall",
                              target=0.95, tool_version=sparseprefill.__version__, date="2026-11-21")
    layers = tuple(tuple(HeadSetting("dense", {}) for _ in range(identity.num_query_heads))
                   for _ in range(identity.num_layers))
    return Profile(model=identity, calibration=calibration, layers=layers, decode=decode)


def test_profile_decode_overrides_per_layer(tmp_path):
    from sparseprefill.profiles import LayerDecodeSetting, load_profile, save_profile

    model = tiny_model("llama", qk_scale=PEAKED_QK)
    profile = _profile_with_decode(model, (LayerDecodeSetting(dense=True), LayerDecodeSetting(budget_tokens=64)))
    path = tmp_path / "p.json"
    save_profile(profile, path)
    assert load_profile(path) == profile  # the overrides round-trip through the file
    sparseprefill.patch(model, SparseConfig(min_sparse_len=10**6, decode=LOSSY), profile=path)
    _generate(model, random_ids(PROMPT))
    stats = sparseprefill.stats(model)
    sparseprefill.unpatch(model)
    layer0, layer1 = stats.layers
    assert layer0.fallbacks["decode_dense_layer"] == NEW_TOKENS - 1 and "sparse_decode" not in layer0.phases
    # Layer 1 attends a 64-token budget (4 pages) instead of LOSSY's 128, plus pages decoded since.
    assert layer1.phases["sparse_decode"] == NEW_TOKENS - 1
    steps = NEW_TOKENS - 1
    max_keys = sum(64 + PAGE * 2 for _ in range(steps))  # 4 pages + at most 2 new/partial pages per step
    causal = sum(PROMPT + i for i in range(1, steps + 1))
    assert layer1.computed_pairs <= max_keys * model.config.num_attention_heads
    assert layer1.density < (LOSSY.budget_tokens + 2 * PAGE) / PROMPT * 0.75
    assert layer1.causal_pairs == causal * model.config.num_attention_heads


def test_profile_decode_overrides_are_checked():
    from sparseprefill.profiles import LayerDecodeSetting, ProfileError, load_profile

    model = tiny_model("llama")
    with pytest.raises(ProfileError, match="exactly one"):
        LayerDecodeSetting(dense=True, budget_tokens=64)
    with pytest.raises(ProfileError, match="decode.*2 layers"):
        _profile_with_decode(model, (None,))
    data = _profile_with_decode(model, (None, LayerDecodeSetting(budget_tokens=64))).to_dict()
    assert data["decode"] == [None, {"budget_tokens": 64}]
    for bad, message in (([None, {"dense": False}], r"decode\[1\]\.dense"), ([None, {"budget": 3}], "unknown key"),
                         ([None, {"budget_tokens": 0}], r"decode\[1\]\.budget_tokens")):
        with pytest.raises(ProfileError, match=message):
            load_profile({**data, "decode": bad})
    # A budget too small for the config's forced sink/recent pages fails at patch time, naming the layer.
    profile = _profile_with_decode(model, (None, LayerDecodeSetting(budget_tokens=16)))
    with pytest.raises(ProfileError, match=r"decode\[1\]\.budget_tokens"):
        sparseprefill.patch(model, SparseConfig(decode=LOSSY), profile=profile)
    assert not sparseprefill.is_patched(model)


def test_profile_json_schema_accepts_decode_overrides():
    import json

    from sparseprefill.profiles import PROFILE_SCHEMA_PATH, LayerDecodeSetting

    jsonschema = pytest.importorskip("jsonschema")
    validator = jsonschema.Draft202012Validator(json.loads(PROFILE_SCHEMA_PATH.read_text()))
    data = _profile_with_decode(tiny_model("llama"), (LayerDecodeSetting(dense=True),
                                                      LayerDecodeSetting(budget_tokens=64))).to_dict()
    validator.validate(data)
    for bad in ([{"dense": False}, None], [{"budget_tokens": 0}, None], [{"dense": True, "budget_tokens": 8}, None]):
        assert not validator.is_valid({**data, "decode": bad})


# ----------------------------------------------------------------------------- follow-up chunks

CHUNK = 40  # a follow-up question: more queries than one kernel call takes (64 // G), so it is split


def _chunk_logits(model, prompt, chunk, config=None):
    """Prefill ``prompt`` with a cache, then run ``chunk`` as a follow-up; returns (logits, stats)."""
    from transformers import DynamicCache

    if config is not None:
        sparseprefill.patch(model, config)
    try:
        cache = DynamicCache(config=model.config)
        with torch.no_grad():
            model(prompt, use_cache=True, **{cache_keyword(model): cache})
            logits = model(chunk, use_cache=True, **{cache_keyword(model): cache}).logits
        return logits, (sparseprefill.stats(model) if config is not None else None)
    finally:
        if config is not None:
            sparseprefill.unpatch(model)


def test_follow_up_chunk_keep_everything_equals_unpatched():
    model = tiny_model("llama", qk_scale=PEAKED_QK)
    prompt, chunk = random_ids(PROMPT, seed=3), random_ids(CHUNK, seed=4)
    expected, _ = _chunk_logits(model, prompt, chunk)
    config = SparseConfig.keep_everything(decode=DecodeRetrievalConfig.keep_everything(follow_up_chunks=True))
    got, stats = _chunk_logits(model, prompt, chunk, config)
    torch.testing.assert_close(got, expected, atol=1e-4, rtol=1e-4)
    assert all(layer.phases["retrieval_chunk"] == 1 for layer in stats.layers)


def test_follow_up_chunk_retrieves_and_falls_back_where_it_must():
    model = tiny_model("llama", qk_scale=PEAKED_QK)
    prompt, chunk = random_ids(PROMPT, seed=3), random_ids(CHUNK, seed=4)
    expected, _ = _chunk_logits(model, prompt, chunk)
    lossy = DecodeRetrievalConfig(**{**LOSSY.to_dict(), "follow_up_chunks": True})
    got, stats = _chunk_logits(model, prompt, chunk, SparseConfig.keep_everything(decode=lossy))
    assert all(layer.phases["retrieval_chunk"] == 1 and layer.last_density < 0.8 for layer in stats.layers)
    assert not torch.allclose(got, expected, atol=1e-4)  # a 128-token budget over 341 keys drops some mass
    # Longer than max_follow_up_tokens, or retrieval for chunks off: the prefill patterns run the chunk.
    for decode in (DecodeRetrievalConfig(**{**lossy.to_dict(), "max_follow_up_tokens": CHUNK - 1}), LOSSY):
        _, stats = _chunk_logits(model, prompt, chunk, SparseConfig.keep_everything(decode=decode))
        assert all(layer.phases["sparse_chunk"] == 1 and "retrieval_chunk" not in layer.phases for layer in stats.layers)


def test_follow_up_benchmark_runs_on_cpu(tmp_path):
    """`sparseprefill bench follow-up --dry-run`: the GPU benchmark's code path on tiny shapes, CSV written."""
    import csv
    import subprocess
    import sys

    subprocess.run([sys.executable, "-m", "sparseprefill", "bench", "follow-up", "--dry-run", "--out", str(tmp_path)],
                   check=True, capture_output=True, text=True, timeout=600)
    rows = list(csv.DictReader(open(tmp_path / "follow_up.csv")))
    assert [r["op"] for r in rows] == ["prefill_patterns", "retrieval"]
    assert 0 < float(rows[1]["density"]) < 1 and float(rows[0]["ms"]) > 0
