"""The profiler: blockwise recall equals recall from dense masks; profiles of a tiny random model are
valid and their recall claims hold when re-measured; patch(profile=...) runs each head's setting."""

from __future__ import annotations

import random

import pytest
import torch

import sparseprefill
from sparseprefill import PatternName, SparseConfig
from sparseprefill.kernels import select_blocks
from sparseprefill.profiles import HeadSetting, load_profile
from sparseprefill.calibrate.profiler import (
    ProfilerOptions,
    evaluate_settings,
    profile_model,
    profile_plan,
    uniform_plan,
)
from sparseprefill.calibrate import profiler as profiler_module
from sparseprefill.kernels.recall import exact_probs, index_recall, window_recall
from sparseprefill.patterns import cost

from tests import reference
from tests.tiny_models import VOCAB, tiny_model


def _mask_recall(index, probs):
    mask = torch.ones_like(probs, dtype=torch.bool) if index is None else index.to_dense_mask()
    return (probs * mask).sum(-1) / probs.sum(-1)


@pytest.mark.parametrize(
    "b,hq,hkv,q_len,k_len,d,block,softcap",
    [(1, 4, 2, 77, 77, 16, 16, None), (2, 3, 1, 50, 130, 8, 8, None), (1, 2, 2, 200, 200, 32, 32, 20.0)],
)
def test_blockwise_recall_equals_dense_mask_recall(b, hq, hkv, q_len, k_len, d, block, softcap, monkeypatch):
    from sparseprefill.kernels import recall as recall_module

    monkeypatch.setattr(recall_module, "CHUNK_BYTES", 4096)  # force many chunks
    g = torch.Generator().manual_seed(q_len + k_len)
    q = torch.randn(b, hq, q_len, d, generator=g)
    k = torch.randn(b, hkv, k_len, d, generator=g) * 2
    kv = torch.arange(hq) // (hq // hkv)
    vs = reference.random_vertical_slash_index(random.Random(k_len), b, hq, q_len, k_len, block, 0.3)
    bs = select_blocks(torch.rand(b, hq, -(-q_len // block), -(-k_len // block), generator=g), q_len=q_len,
                       k_len=k_len, block_size_q=block, block_size_k=block, mass=0.5)
    got = index_recall([vs, bs, None], q, k, scale=d**-0.5, softcap=softcap, kv_head_index=kv)
    probs = exact_probs(q, k, 0, q_len, scale=d**-0.5, softcap=softcap, kv_head_index=kv)
    for index, recall in zip([vs, bs, None], got):
        torch.testing.assert_close(recall, _mask_recall(index, probs), atol=1e-5, rtol=0)


@pytest.mark.parametrize("r0,r1", [(0, 13), (37, 101), (150, 200), (199, 200)])
def test_window_recall_is_the_slice_of_full_recall(r0, r1):
    # Windows start anywhere, not only on query-block boundaries: the index rows come from r0.
    b, hq, hkv, length, d, block = 1, 4, 2, 200, 16, 16
    g = torch.Generator().manual_seed(r0 * 1000 + r1)
    q = torch.randn(b, hq, length, d, generator=g)
    k = torch.randn(b, hkv, length, d, generator=g) * 2
    kv = torch.arange(hq) // (hq // hkv)
    vs = reference.random_vertical_slash_index(random.Random(r0), b, hq, length, length, block, 0.3)
    bs = select_blocks(torch.rand(b, hq, -(-length // block), -(-length // block), generator=g), q_len=length,
                       k_len=length, block_size_q=block, block_size_k=block, mass=0.5)
    full = index_recall([vs, bs], q, k, scale=d**-0.5, softcap=None, kv_head_index=kv)
    part = window_recall([vs, bs], q, k, r0, r1, scale=d**-0.5, softcap=None, kv_head_index=kv)
    for whole, window in zip(full, part):
        assert window.shape == (b, hq, r1 - r0)
        torch.testing.assert_close(window, whole[:, :, r0:r1], atol=1e-6, rtol=0)


class CharTokenizer:
    """Bytes -> ids below the tiny vocab: enough for the pass-key prompt builder and text windows."""

    def __call__(self, text):
        return {"input_ids": [3 + ord(c) % (VOCAB - 3) for c in text]}


# Cheap candidates and a loose target: on the tiny model's short prompts the default candidates are all
# past their kernels' break-even density, so every head would be dense and the profile tests would test
# nothing sparse. With these, some head takes a sparse setting by its mean recall but not by its worst rows.
CHEAP_CANDIDATES = (
    HeadSetting(PatternName.A_SHAPE, {"sink_tokens": 16, "local_tokens": 64}),
    HeadSetting(PatternName.A_SHAPE, {"sink_tokens": 16, "local_tokens": 128}),
    *(HeadSetting(PatternName.VERTICAL_SLASH, {"vertical_mass": m, "slash_mass": m}) for m in (0.5, 0.8, 0.95)),
    HeadSetting(PatternName.DENSE, {}),
)
TINY_OPTIONS = ProfilerOptions(lengths=(448, 640), samples=2, target_recall=0.8, candidates=CHEAP_CANDIDATES)


@pytest.fixture(scope="module")
def tiny_profile():
    model = tiny_model("llama", qk_scale=8.0)  # peaked attention: heads differ in what they need
    result = profile_model(model, CharTokenizer(), TINY_OPTIONS, progress=False)
    return model, result


def test_profiler_writes_a_valid_profile_meeting_its_target(tiny_profile, tmp_path):
    model, result = tiny_profile
    profile = result.profile
    path = tmp_path / "p.json"
    from sparseprefill.profiles import save_profile

    save_profile(profile, path)
    assert load_profile(path) == profile
    assert len(profile.layers) == model.config.num_hidden_layers
    for layer in profile.layers:
        assert len(layer) == model.config.num_attention_heads
        for setting in layer:
            recall = setting.measured["recall"]
            assert set(recall) == {"448", "640"}
            assert all(r >= TINY_OPTIONS.target_recall for r in recall.values()), setting
    sparse = [s for layer in profile.layers for s in layer if s.pattern != PatternName.DENSE]
    assert sparse, "every head chose dense: the profile tests would test no sparse setting"
    assert "pattern mix" in result.summary_table()


def test_profile_recall_claims_hold_when_remeasured(tiny_profile):
    """Re-measuring the chosen settings on the calibration prompts reproduces each head's claim."""
    model, result = tiny_profile
    profile = result.profile
    rows = evaluate_settings(model, CharTokenizer(), {"profile": profile_plan(profile)}, TINY_OPTIONS, offset=0,
                             progress=False)["profile"]
    for row in rows:
        n = str(row["length"])
        claimed = [s.measured["recall"][n] for layer in profile.layers for s in layer]
        assert row["recall_mean"] == pytest.approx(sum(claimed) / len(claimed), abs=1e-5)
        assert row["recall_min_head"] >= TINY_OPTIONS.target_recall - 1e-6


def test_held_out_recall_and_density_are_reported_for_profile_and_auto(tiny_profile):
    model, result = tiny_profile
    rows = evaluate_settings(
        model, CharTokenizer(),
        {"profile": profile_plan(result.profile), "auto": uniform_plan(SparseConfig())},
        TINY_OPTIONS, offset=TINY_OPTIONS.samples, progress=False,
    )
    for name in ("profile", "auto"):
        for row in rows[name]:
            assert 0.0 < row["density"] <= 1.0 and 0.0 < row["recall_mean"] <= 1.0


def test_patch_with_profile_runs_each_heads_setting_and_matches_dense_when_lossless():
    """A profile mixing lossless settings (dense, keep-all vertical-slash) must reproduce dense logits,
    and the stats must show both patterns ran."""
    torch.manual_seed(0)
    model = tiny_model("llama")
    ids = torch.randint(3, VOCAB, (1, 150))
    with torch.no_grad():
        expected = model(ids).logits
    result = profile_model(model, CharTokenizer(), ProfilerOptions(lengths=(448,), samples=1), progress=False)
    lossless = [HeadSetting(PatternName.DENSE, {}),
                HeadSetting(PatternName.VERTICAL_SLASH, {"vertical_mass": 1.0, "slash_mass": 1.0})]
    layers = tuple(tuple(lossless[h % 2] for h in range(len(layer))) for layer in result.profile.layers)
    profile = type(result.profile)(model=result.profile.model, calibration=result.profile.calibration, layers=layers)
    sparseprefill.patch(model, SparseConfig(min_sparse_len=0, min_sparse_query_len=1), profile=profile)
    try:
        with torch.no_grad():
            got = model(ids).logits
        patterns = sparseprefill.stats(model).layers[0].patterns
        assert sparseprefill.stats(model).pattern == "profile"
    finally:
        sparseprefill.unpatch(model)
    torch.testing.assert_close(got, expected, atol=1e-4, rtol=1e-4)
    assert set(patterns) == {"dense", "vertical_slash"}, patterns


VS_LOOSE = HeadSetting(PatternName.VERTICAL_SLASH, {"vertical_mass": 0.9, "slash_mass": 0.9})
VS_TIGHT = HeadSetting(PatternName.VERTICAL_SLASH, {"vertical_mass": 0.98, "slash_mass": 0.98})
DENSE = HeadSetting(PatternName.DENSE, {})
CHOICES = (["loose", "tight", "dense"], [VS_LOOSE, VS_TIGHT, DENSE])


def _measured(loose, tight, dense=(1.0, 1.0)):
    """(recall at one length, density) per candidate name."""
    return {name: ({4096: recall}, density) for name, (recall, density) in
            zip(CHOICES[0], (loose, tight, dense))}


def test_a_head_keeps_the_cheapest_setting_that_reaches_the_target():
    got = profiler_module.choose_candidate(*CHOICES, _measured((0.96, 0.2), (0.99, 0.3)), 0.95, 64)
    assert got[0] == "loose"
    got = profiler_module.choose_candidate(*CHOICES, _measured((0.90, 0.2), (0.99, 0.3)), 0.95, 64)
    assert got[0] == "tight"  # the cheaper one misses the recall target


@pytest.mark.parametrize("head_dim", [64, 128])
def test_a_head_past_its_kernels_break_even_density_runs_dense(head_dim):
    """Vertical-slash computes a pair at a fraction of cuDNN's rate: a head that must keep more than
    that share of its pairs is faster dense, and the profile says dense."""
    efficiency = cost.PATTERN_COSTS[PatternName.VERTICAL_SLASH]
    efficiency = efficiency.efficiency_small_head if head_dim <= cost.SMALL_HEAD_DIM else efficiency.efficiency_large_head
    below, above = efficiency * 0.95, min(efficiency * 1.05, 0.999)
    got = profiler_module.choose_candidate(*CHOICES, _measured((0.99, below), (0.99, 0.999)), 0.95, head_dim)
    assert got[0] == "loose"
    got = profiler_module.choose_candidate(*CHOICES, _measured((0.99, above), (0.99, 0.999)), 0.95, head_dim)
    assert got[0] == "dense"
    assert cost.kernel_time_ratio(PatternName.VERTICAL_SLASH, above, head_dim) > 1.0
    assert cost.kernel_time_ratio(PatternName.DENSE, 1.0, head_dim) == 1.0


def test_no_qualifying_candidate_gives_none():
    names, settings = CHOICES[0][:2], CHOICES[1][:2]
    measured = _measured((0.5, 0.1), (0.6, 0.2))
    assert profiler_module.choose_candidate(names, settings, measured, 0.95, 64) is None


OBJECTIVE_OPTIONS = ProfilerOptions(lengths=(640,), samples=1, target_recall=0.8, candidates=CHEAP_CANDIDATES)


@pytest.fixture(scope="module")
def tiny_profiles_mean_and_p5():
    """The same tiny model and prompt profiled under each objective."""
    from dataclasses import replace

    model = tiny_model("llama", qk_scale=8.0)
    return {objective: profile_model(model, CharTokenizer(), replace(OBJECTIVE_OPTIONS, objective=objective),
                                     progress=False)
            for objective in ("mean", "p5")}


def test_the_p5_objective_keeps_each_heads_worst_rows_and_costs_at_least_the_mean_objective(
        tiny_profiles_mean_and_p5):
    """Under ``p5`` every head's 5th-percentile row meets the target at every length; the p5 of a head's
    rows never exceeds their mean, so its qualifying settings are a subset of the mean objective's and
    each head's predicted kernel time can only grow; on this model it does for some heads."""
    mean, p5 = (tiny_profiles_mean_and_p5[o].profile for o in ("mean", "p5"))
    assert p5.calibration.objective == "attention_mass_recall_p5"
    assert mean.calibration.objective == "attention_mass_recall_mean"
    head_dim = p5.model.head_dim
    longest = str(max(OBJECTIVE_OPTIONS.lengths))
    costlier = 0
    for layer_mean, layer_p5 in zip(mean.layers, p5.layers):
        for by_mean, by_p5 in zip(layer_mean, layer_p5):
            assert all(r >= OBJECTIVE_OPTIONS.target_recall for r in by_p5.measured["recall_p5"].values()), by_p5
            time_mean = cost.kernel_time_ratio(by_mean.pattern, by_mean.measured["density"][longest], head_dim)
            time_p5 = cost.kernel_time_ratio(by_p5.pattern, by_p5.measured["density"][longest], head_dim)
            assert time_p5 >= time_mean - 1e-9, (by_mean, by_p5)
            costlier += time_p5 > time_mean + 1e-9
    assert costlier > 0, "the tail objective chose the same settings as the mean for every head"


def test_an_unknown_objective_is_refused():
    with pytest.raises(ValueError, match="objective must be one of"):
        ProfilerOptions(objective="median")
