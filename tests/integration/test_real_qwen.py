"""The long-context real model: Qwen2.5-Coder-0.5B-Instruct on CPU (fp32), loaded offline.

Checks that the cache holds the real model (config, untied head, tokenizer), that YaRN is applied
only when asked (and changes the rotary frequencies the way Qwen documents), that the carried-file
path used on the GPU machine (``install_gguf``, ``export_metadata``) refuses wrong inputs with a
message naming them, and that the patched model at 1K (keep-everything, forced sparse) matches
unpatched. The first run downloads six wheels (about 470 MB) and dequantises once (1-2 min).
"""

from __future__ import annotations

import pytest
import torch

from sparseprefill import SparseConfig
from sparseprefill.evals import offline_models
from sparseprefill.evals.logits import compare_logits, reference_input_ids

from tests.real_models import logits_dense_then_patched, require_qwen_coder

pytestmark = pytest.mark.slow

LENGTH = 1024
SCORED_POSITIONS = 32


@pytest.fixture(scope="module")
def qwen():
    return require_qwen_coder()


def test_config_head_and_tokenizer(qwen):
    model, tokenizer = qwen
    config = model.config
    assert type(model).__name__ == "Qwen2ForCausalLM"
    assert (config.num_hidden_layers, config.num_attention_heads, config.num_key_value_heads) == (24, 14, 2)
    assert config.hidden_size // config.num_attention_heads == 64
    assert config.max_position_embeddings == offline_models.QWEN_NATIVE_CONTEXT
    assert config.rope_parameters["rope_type"] == "default"
    # The GGUF carries its own output.weight: the head must be the trained one, not a fresh init.
    assert not torch.equal(model.lm_head.weight, model.model.embed_tokens.weight)
    assert float(model.lm_head.weight.float().std()) > 1e-3
    tokens = tokenizer.convert_ids_to_tokens(tokenizer("The pass key is 12345.")["input_ids"])
    assert tokens == ["The", "Ġpass", "Ġkey", "Ġis", "Ġ", "1", "2", "3", "4", "5", "."], tokens


def test_long_context_applies_yarn(qwen):
    model, _ = qwen
    yarn = offline_models.long_context_config(offline_models.QWEN_CODER, type(model.config)(**model.config.to_dict()))
    assert yarn.rope_parameters["rope_type"] == "yarn"
    assert yarn.rope_parameters["factor"] == offline_models.QWEN_YARN_FACTOR
    assert yarn.rope_parameters["original_max_position_embeddings"] == offline_models.QWEN_NATIVE_CONTEXT
    assert yarn.max_position_embeddings == 4 * offline_models.QWEN_NATIVE_CONTEXT
    assert model.config.rope_parameters["rope_type"] == "default"  # the loaded model is untouched
    rotary = type(model.model.rotary_emb)(config=yarn)
    native = model.model.rotary_emb
    # YaRN keeps the fastest frequencies, interpolates the slowest by the factor, and scales the logits.
    assert torch.allclose(rotary.inv_freq[0], native.inv_freq[0])
    torch.testing.assert_close(rotary.inv_freq[-1], native.inv_freq[-1] / offline_models.QWEN_YARN_FACTOR)
    assert rotary.attention_scaling > 1.0


def test_model_without_long_context_is_refused():
    with pytest.raises(offline_models.OfflineModelError, match="documents no long-context rope"):
        offline_models.long_context_config(offline_models.SMOLLM2, object())


def test_install_gguf_refuses_a_wrong_file(tmp_path, monkeypatch):
    monkeypatch.setenv(offline_models.CACHE_ENV_VAR, str(tmp_path / "cache"))
    wrong = tmp_path / "model.gguf"
    wrong.write_bytes(b"GGUF" + bytes(100))
    with pytest.raises(offline_models.OfflineModelError, match="has 104 bytes, expected 491400064"):
        offline_models.install_gguf(offline_models.QWEN_CODER, wrong)
    with pytest.raises(offline_models.OfflineModelError, match="no GGUF file at"):
        offline_models.install_gguf(offline_models.QWEN_CODER, tmp_path / "missing.gguf")


def test_metadata_folder_must_match_the_model(tmp_path, monkeypatch):
    folder = tmp_path / "meta"
    folder.mkdir()
    monkeypatch.setenv(offline_models.CACHE_ENV_VAR, str(tmp_path / "cache"))
    with pytest.raises(offline_models.OfflineModelError, match="not a metadata folder"):
        offline_models.prepare(offline_models.QWEN_CODER, progress=False, metadata=folder)
    (folder / offline_models.METADATA_MARKER).write_text("gemma3-270m\ntransformers 5.24.0\n")
    with pytest.raises(offline_models.OfflineModelError, match="holds metadata of 'gemma3-270m'"):
        offline_models.prepare(offline_models.QWEN_CODER, progress=False, metadata=folder)


def test_keep_everything_matches_unpatched_at_1k(qwen):
    model, tokenizer = qwen
    input_ids = reference_input_ids(tokenizer, LENGTH)
    config = SparseConfig.keep_everything(min_sparse_len=0)
    dense_logits, _, sparse_logits, _, stats = logits_dense_then_patched(model, input_ids, SCORED_POSITIONS, config)
    assert stats.phases["sparse_prefill"] == 24, dict(stats.phases)
    assert stats.density == pytest.approx(1.0)
    comparison = compare_logits(dense_logits, sparse_logits)
    assert comparison.top1_agreement == 1.0
    torch.testing.assert_close(sparse_logits, dense_logits, atol=2e-3, rtol=2e-3)


def test_install_gguf_copies_a_checked_file_and_leaves_nothing_behind_on_a_bad_hash(tmp_path, monkeypatch):
    import dataclasses
    import hashlib

    monkeypatch.setenv(offline_models.CACHE_ENV_VAR, str(tmp_path / "cache"))
    payload = b"GGUF" + bytes(60)
    source = tmp_path / "small.gguf"
    source.write_bytes(payload)
    spec = dataclasses.replace(offline_models.QWEN_CODER, cache_name="small", gguf_bytes=len(payload),
                               gguf_sha256=hashlib.sha256(payload).hexdigest())
    installed = offline_models.install_gguf(spec, source)
    assert installed.read_bytes() == payload
    wrong = dataclasses.replace(spec, cache_name="wrong", gguf_sha256="0" * 64)
    with pytest.raises(offline_models.OfflineModelError, match="has sha256"):
        offline_models.install_gguf(wrong, source)
    assert [p.name for p in offline_models.model_dir(wrong).iterdir()] == [".lock"]
