"""A measured profile runs only on prompts as long as its calibration prompts: longer ones run the config's
own pattern (``FallbackReason.PROFILE_RANGE``, counted in ``stats()``, warned once), unless
``patch(allow_profile_extrapolation=True)``; an imported profile (``samples == 0``) runs at every length."""

from __future__ import annotations

import logging

import pytest
import torch

import sparseprefill
from sparseprefill import SparseConfig
from sparseprefill.profiles import Calibration, HeadSetting, Profile, model_identity

from tests.tiny_models import random_ids, tiny_model

CALIBRATED = 256  # the profile's only calibration length
INSIDE, BEYOND = 200, 300  # prompt lengths within and past it
CONFIG = SparseConfig(min_sparse_len=0)  # the default pattern (auto), forced sparse
RANGE = "profile_beyond_calibration"


def _a_shape_profile(model, samples: int = 1) -> Profile:
    """Every head on a narrow A-shape window: cheap and unlike the config's own pattern."""
    identity = model_identity(model.config)
    calibration = Calibration(source="test", lengths=(128, CALIBRATED), samples=samples,
                              objective="attention_mass_recall_mean", target=0.9,
                              tool_version=sparseprefill.__version__, date="2026-12-07")
    head = HeadSetting("a_shape", {"sink_tokens": 16, "local_tokens": 32})
    layers = tuple(tuple(head for _ in range(identity.num_query_heads)) for _ in range(identity.num_layers))
    return Profile(model=identity, calibration=calibration, layers=layers)


def _prefill(model, length: int, **patch_kwargs):
    sparseprefill.patch(model, CONFIG, **patch_kwargs)
    try:
        with torch.no_grad():
            logits = model(random_ids(length, seed=length)).logits
        return logits, sparseprefill.stats(model)
    finally:
        sparseprefill.unpatch(model)


@pytest.fixture(scope="module")
def model():
    return tiny_model("llama", windowed=False, qk_scale=8.0)


def test_a_prompt_within_the_calibration_lengths_runs_the_profile(model):
    _, stats = _prefill(model, INSIDE, profile=_a_shape_profile(model))
    for layer in stats.layers:
        assert layer.patterns == {"a_shape": model.config.num_attention_heads}
        assert RANGE not in layer.fallbacks


def test_a_longer_prompt_runs_the_configs_pattern_visibly_and_exactly_as_without_the_profile(model, caplog):
    with caplog.at_level(logging.WARNING, logger="sparseprefill"):
        logits, stats = _prefill(model, BEYOND, profile=_a_shape_profile(model))
    unprofiled, unprofiled_stats = _prefill(model, BEYOND)
    torch.testing.assert_close(logits, unprofiled, atol=0, rtol=0)
    for layer, plain in zip(stats.layers, unprofiled_stats.layers):
        assert layer.fallbacks[RANGE] == 1
        assert "a_shape" not in layer.patterns and layer.patterns == plain.patterns
        assert layer.phases == plain.phases  # sparse, not counted as a dense call
    warnings = [r for r in caplog.records if "longer than the profile's calibration prompts" in r.getMessage()]
    assert len(warnings) == 1 and f"{BEYOND}-token prompt" in warnings[0].getMessage()
    printed = str(stats)
    assert f"[config's pattern, not the profile's: {RANGE}=1]" in printed and "[dense:" not in printed


def test_extrapolation_on_request_and_imported_profiles_keep_the_profile(model):
    plain, _ = _prefill(model, BEYOND)
    for profile, kwargs in ((_a_shape_profile(model), dict(allow_profile_extrapolation=True)),
                            (_a_shape_profile(model, samples=0), {})):
        logits, stats = _prefill(model, BEYOND, profile=profile, **kwargs)
        for layer in stats.layers:
            assert layer.patterns == {"a_shape": model.config.num_attention_heads}
            assert RANGE not in layer.fallbacks
        assert not torch.equal(logits, plain)  # the narrow windows do change the answer
