"""The shipped SmolLM2 profile on real weights (CPU, fp32), on prompts the profiler never saw.

* It loads, matches the model's fingerprint and patches; a pass key is answered as dense answers it.
* On a held-out 2K prompt its heads keep the recall target on average, at a lower density than the
  ``auto`` default (the point of a profile). ``experiments/evaluate_profile.py`` gives the full table.

About 2 minutes on 2 idle CPU cores once the model is cached.
"""

from __future__ import annotations

import pytest

import sparseprefill
from sparseprefill import SparseConfig
from sparseprefill.evals.passkey import build_passkey_prompt
from sparseprefill.calibrate.profiler import ProfilerOptions, evaluate_settings, profile_plan, uniform_plan

from tests.real_models import passkey_dense_then_patched, require_gemma3, require_smollm2

pytestmark = pytest.mark.slow

SHIPPED = "smollm2-135m-instruct"
HELD_OUT_LENGTH = 2048


def test_shipped_profile_patches_and_answers_like_dense():
    model, tokenizer = require_smollm2()
    profile = sparseprefill.shipped_profile(SHIPPED)
    prompt = build_passkey_prompt(tokenizer, HELD_OUT_LENGTH, depth=0.35, seed=101)
    dense, sparse, stats = passkey_dense_then_patched(model, tokenizer, prompt, SparseConfig(min_sparse_len=0),
                                                      profile=profile)
    assert dense.forced_correct, "dense SmolLM2 should find this pass key"
    assert sparse.forced_digits == dense.forced_digits
    assert stats.density is not None and stats.density < 0.8
    used = {name for layer in stats.layers for name in layer.patterns}
    assert used == {setting.pattern.value for layer in profile.layers for setting in layer}


def test_shipped_profile_keeps_its_target_on_held_out_prompts_at_lower_density_than_auto():
    model, tokenizer = require_smollm2()
    profile = sparseprefill.shipped_profile(SHIPPED)
    options = ProfilerOptions(lengths=(HELD_OUT_LENGTH,), samples=1)
    rows = evaluate_settings(model, tokenizer, {"profile": profile_plan(profile), "auto": uniform_plan(SparseConfig())},
                             options, offset=profile.calibration.samples, progress=False)
    mine, auto = rows["profile"][0], rows["auto"][0]
    print(f"\nheld out {HELD_OUT_LENGTH}: profile {mine}\n  auto {auto}")
    assert mine["recall_mean"] >= profile.calibration.target
    assert mine["density"] < auto["density"]


def test_shipped_gemma3_profile_fits_the_model_and_answers_like_dense():
    """Gemma 3 270M: the sliding layers stay on the exact window path, the three global layers run
    the profile's per-head settings."""
    model, tokenizer = require_gemma3()
    profile = sparseprefill.shipped_profile("gemma-3-270m")
    prompt = build_passkey_prompt(tokenizer, HELD_OUT_LENGTH, depth=0.65, seed=103)
    dense, sparse, stats = passkey_dense_then_patched(model, tokenizer, prompt, SparseConfig(min_sparse_len=0),
                                                      profile=profile)
    assert dense.forced_correct, "dense Gemma 3 270M should find this pass key"
    assert sparse.forced_digits == dense.forced_digits
    sparse_layers = {s.layer_idx for s in stats.layers if s.phases.get("sparse_prefill")}
    assert sparse_layers == {5, 11, 17}
