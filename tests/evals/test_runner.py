"""The dense-vs-sparse eval runners: paired bootstrap, reports, chunked perplexity, fidelity, RULER and
LongBench runs and the ``sparseprefill eval`` command, on tiny random models with a tokenizer
trained at test time (no hub, no downloads)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

import sparseprefill
from sparseprefill import SparseConfig
from sparseprefill.evals import fidelity_eval, longbench_eval, perplexity, ruler_eval
from sparseprefill.evals.harness import greedy_generate, parse_variants
from sparseprefill.evals.paired import paired_bootstrap
from sparseprefill.evals.report import AVERAGE_TASK, DENSE, EvalReport, SampleScore, Variant, config_to_dict

from tests.integration.test_models import KEEP_ALL, LOSSY, PEAKED_QK
from tests.tiny_models import FAMILIES, tiny_config
from tests.tiny_tokenizer import tiny_tokenizer

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures" / "longbench"
EXACT = Variant("exact", KEEP_ALL)  # every pair kept: must reproduce dense
LOSSY_VARIANT = Variant("lossy", LOSSY)  # half the estimated mass: visibly sparse on tiny models
LENGTH = 1024  # long enough for the lossy setting's 32-token blocks to drop pairs, short for the CPU


@pytest.fixture(scope="module")
def tokenizer():
    return tiny_tokenizer()


def _model(family: str, tokenizer, seed: int = 0):
    config = tiny_config(family)
    config.vocab_size = len(tokenizer)
    config.max_position_embeddings = 8192
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config).eval()
    if family == "gemma2":
        model.set_attn_implementation("eager")  # see tiny_models.tiny_model: SDPA drops Gemma 2's soft-cap
    with torch.no_grad():
        for layer in model.model.layers:
            attn = layer.self_attn
            if hasattr(attn, "q_proj"):
                attn.q_proj.weight.mul_(PEAKED_QK)
                attn.k_proj.weight.mul_(PEAKED_QK)
    return model


@pytest.fixture(scope="module")
def llama(tokenizer):
    return _model("llama", tokenizer)


# ------------------------------------------------------------------------------ paired bootstrap


def test_bootstrap_of_identical_scores_is_zero():
    delta = paired_bootstrap([1.0, 0.0, 1.0, 0.5], [1.0, 0.0, 1.0, 0.5])
    assert (delta.delta, delta.low, delta.high) == (0.0, 0.0, 0.0)
    assert not delta.excludes_zero


def test_bootstrap_of_a_constant_shift_is_that_shift():
    dense = [0.1, 0.7, 0.3, 0.9, 0.2]
    delta = paired_bootstrap(dense, [d - 0.25 for d in dense])
    assert delta.delta == pytest.approx(-0.25)
    assert delta.low == pytest.approx(-0.25) and delta.high == pytest.approx(-0.25)
    assert delta.excludes_zero


def test_bootstrap_pairs_samples():
    # Sample difficulty varies wildly but every difference is +1 or +2: a paired interval stays in
    # [1, 2]; an unpaired one would straddle zero.
    dense = [0.0, 50.0, 100.0, 20.0, 80.0, 10.0]
    sparse = [d + (1.0 if i % 2 else 2.0) for i, d in enumerate(dense)]
    delta = paired_bootstrap(dense, sparse, seed=3)
    assert 1.0 <= delta.low <= delta.delta <= delta.high <= 2.0
    assert delta == paired_bootstrap(dense, sparse, seed=3)


def test_bootstrap_of_one_sample_has_no_interval():
    delta = paired_bootstrap([1.0], [0.0])
    assert delta.delta == -1.0 and math.isnan(delta.low) and math.isnan(delta.high)
    assert not delta.excludes_zero


@pytest.mark.parametrize("dense, sparse, message", [
    ([1.0, 2.0], [1.0], "one length"),
    ([], [], "no samples"),
    ([1.0, float("nan")], [1.0, 1.0], "finite"),
])
def test_bootstrap_rejects_bad_input(dense, sparse, message):
    with pytest.raises(ValueError, match=message):
        paired_bootstrap(dense, sparse)


# -------------------------------------------------------------------------------------- report


def _scores(variant: str, task: str, values, density=None):
    return [SampleScore(task=task, length=100, index=i, variant=variant, score=v, density=density)
            for i, v in enumerate(values)]


def test_report_pairs_tasks_and_pools_an_average(tmp_path):
    samples = (_scores("dense", "a", [100, 0, 100]) + _scores("sparse", "a", [100, 0, 0], density=0.25)
               + _scores("dense", "b", [50, 50, 50]) + _scores("sparse", "b", [50, 50, 50], density=0.75))
    report = EvalReport("ruler", "m", [DENSE, Variant("sparse", SparseConfig())], samples, metric="score")
    rows = {r["task"]: r for r in report.rows()}
    assert rows["a"]["delta"] == pytest.approx(-100 / 3) and rows["a"]["density"] == 0.25
    assert rows["b"]["delta"] == 0.0
    average = rows[AVERAGE_TASK]
    assert average["n"] == 6 and average["delta"] == pytest.approx(-100 / 6) and average["density"] == 0.5
    written = report.write(tmp_path)
    assert [p.name for p in written] == ["ruler.json", "ruler.md", "ruler.png"]
    stored = json.loads((tmp_path / "ruler.json").read_text())
    assert stored["variants"][1]["config"] == config_to_dict(SparseConfig())
    assert len(stored["samples"]) == 12 and len(stored["rows"]) == 3
    assert "| **average** | 100 | 6 |" in (tmp_path / "ruler.md").read_text()


def test_report_refuses_unpaired_samples():
    samples = _scores("dense", "a", [1, 2, 3]) + _scores("sparse", "a", [1, 2])
    report = EvalReport("ruler", "m", [DENSE, Variant("sparse", SparseConfig())], samples, metric="score")
    with pytest.raises(ValueError, match="different samples"):
        report.rows()


def test_report_needs_dense_first():
    with pytest.raises(ValueError, match="dense"):
        EvalReport("ruler", "m", [Variant("sparse", SparseConfig())], [], metric="score")


def test_parse_variants():
    variants = parse_variants(["auto", "auto@0.8", "profile:smollm2-135m-instruct"], min_sparse_len=0)
    assert [v.name for v in variants] == ["dense", "auto", "auto@0.8", "profile:smollm2-135m-instruct"]
    assert variants[2].config.vertical_slash.vertical_mass == 0.8
    assert all(v.config.min_sparse_len == 0 for v in variants[1:])
    for bad, message in (("nonsense", "unknown variant"), ("auto@2", "mass")):
        with pytest.raises(ValueError, match=message):
            parse_variants([bad])
    with pytest.raises(ValueError, match="repeat"):
        parse_variants(["auto", "auto"])


def test_parse_variants_reads_a_config_file(tmp_path):
    path = tmp_path / "lossy.json"
    path.write_text(json.dumps({"pattern": "vertical_slash", "vertical_slash": {"vertical_mass": 0.5}}))
    (dense, variant) = parse_variants([f"config:{path}"], min_sparse_len=7)
    assert variant.name == "config:lossy" and variant.config.min_sparse_len == 7
    assert variant.config.vertical_slash.vertical_mass == 0.5 and variant.config.pattern.value == "vertical_slash"
    path.write_text(json.dumps({"no_such_field": 1}))
    with pytest.raises(ValueError, match="no_such_field"):
        parse_variants([f"config:{path}"])


# ---------------------------------------------------------------------------------- perplexity


@pytest.mark.parametrize("family", FAMILIES)
def test_chunked_nll_equals_full_logits(family, tokenizer):
    """The chunked LM head (with Gemma's final soft-cap) gives the model's own logits' loss."""
    model = _model(family, tokenizer)
    ids = torch.randint(3, len(tokenizer), (1, 301), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        logits = model(ids).logits[0].float()
    expected = torch.nn.functional.cross_entropy(logits[100:-1], ids[0, 101:], reduction="none")
    chunked = perplexity.chunked_nll(model, ids, first_scored=100, chunk=64)
    assert chunked.shape == expected.shape
    torch.testing.assert_close(chunked, expected, atol=1e-5, rtol=1e-5)


def test_perplexity_exact_variant_equals_dense_and_lossy_differs(llama, tokenizer):
    options = perplexity.PerplexityOptions(lengths=(LENGTH,), windows=2)
    report = perplexity.run_perplexity(llama, tokenizer, [DENSE, EXACT, LOSSY_VARIANT], options, progress=False)
    rows = {r["variant"]: r for r in report.rows()}
    assert rows["exact"]["density"] == pytest.approx(1.0)
    assert abs(rows["exact"]["delta"]) < 1e-5
    assert rows["lossy"]["density"] < 0.9
    assert abs(rows["lossy"]["delta"]) > 1e-4
    scored = {s.extra["scored_tokens"] for s in report.samples}
    assert scored == {LENGTH - 1 - LENGTH // 2}


def test_perplexity_refuses_too_short_text(llama, tokenizer, tmp_path):
    text = tmp_path / "short.txt"
    text.write_text("a few words only")
    options = perplexity.PerplexityOptions(lengths=(LENGTH,), windows=1, text=str(text))
    with pytest.raises(ValueError, match="windows"):
        perplexity.run_perplexity(llama, tokenizer, [DENSE, EXACT], options, progress=False)


# ------------------------------------------------------------------------------------ fidelity


def test_fidelity_exact_is_at_the_floor_and_lossy_is_not(llama, tokenizer, tmp_path):
    options = fidelity_eval.FidelityOptions(lengths=(LENGTH,), windows=1, positions=64)
    report = fidelity_eval.run_fidelity(llama, tokenizer, [DENSE, EXACT, LOSSY_VARIANT], options, progress=False)
    exact, lossy = report.rows
    heads = llama.config.num_hidden_layers * llama.config.num_attention_heads
    assert len(exact["recall"]) == heads and len(lossy["error"]) == heads
    assert exact["recall_mean"] == pytest.approx(1.0, abs=1e-5)
    assert exact["error_max"] < 1e-5 and exact["kl_max"] < 1e-6 and exact["top1"] == 1.0
    assert lossy["recall_mean"] < 0.99 and lossy["recall_p5"] <= lossy["recall_mean"]
    assert lossy["error_mean"] > 100 * max(lossy["floor_mean"], 1e-7)
    assert lossy["density"] < 0.9 and lossy["kl_mean"] > exact["kl_mean"]
    written = report.write(tmp_path)
    assert {p.suffix for p in written} == {".json", ".md", ".png"}
    assert "| lossy | 1024 |" in (tmp_path / "fidelity.md").read_text()


def test_fidelity_recall_matches_the_kept_mass(llama, tokenizer):
    """The inspector's recall for a lossy head equals the share of dense attention mass on the pairs the
    sparse output used: checked through output error, which is zero exactly when recall is one."""
    options = fidelity_eval.FidelityOptions(lengths=(LENGTH,), windows=1, positions=16)
    (row,) = fidelity_eval.run_fidelity(llama, tokenizer, [DENSE, LOSSY_VARIANT], options, progress=False).rows
    for key, recall in row["recall"].items():
        if recall > 1 - 1e-6:
            assert row["error"][key] < 1e-4
        else:
            assert row["error"][key] > 0


# --------------------------------------------------------------------------------------- RULER


def test_greedy_generate_batches_like_single_prompts(llama, tokenizer):
    prompts = [tokenizer("The quick brown fox")["input_ids"], tokenizer("Python is a language that")["input_ids"]]
    together = greedy_generate(llama, tokenizer, prompts, max_new_tokens=6)
    alone = [greedy_generate(llama, tokenizer, [p], max_new_tokens=6)[0] for p in prompts]
    assert together == alone


def test_ruler_exact_variant_answers_like_dense(llama, tokenizer, tmp_path):
    options = ruler_eval.RulerEvalOptions(lengths=(2048,), tasks=("niah_single_1", "fwe"), samples=2, batch_size=2)
    report = ruler_eval.run_ruler(llama, tokenizer, [DENSE, EXACT], options, progress=False)
    by_key = {(s.variant, s.task, s.index): s for s in report.samples}
    assert len(by_key) == 8
    for (variant, task, index), sample in by_key.items():
        if variant == "exact":
            assert sample.prediction == by_key["dense", task, index].prediction
            assert sample.density == pytest.approx(1.0)
    assert {r["task"] for r in report.rows()} == {"niah_single_1", "fwe", AVERAGE_TASK}
    assert report.meta["ruler"]["suite"] == "RULER subset" and not sparseprefill.is_patched(llama)


def test_ruler_essay_tasks_need_prepared_data(llama, tokenizer, tmp_path, monkeypatch):
    from sparseprefill.evals.data import DataNotPreparedError

    monkeypatch.setenv("SPARSEPREFILL_CACHE", str(tmp_path))
    options = ruler_eval.RulerEvalOptions(lengths=(2048,), tasks=("niah_single_2",), samples=1)
    with pytest.raises(DataNotPreparedError, match="prepare-data"):
        ruler_eval.run_ruler(llama, tokenizer, [DENSE, EXACT], options, progress=False)


# ----------------------------------------------------------------------------------- LongBench


def test_longbench_runs_fixture_tasks(llama, tokenizer):
    options = longbench_eval.LongBenchEvalOptions(data_dir=str(FIXTURES), samples=2, max_prompt_tokens=256,
                                                  batch_size=2)
    report = longbench_eval.run_longbench(llama, tokenizer, [DENSE, EXACT], options, progress=False)
    tasks = longbench_eval.available_tasks(FIXTURES)
    assert {r["task"] for r in report.rows()} == {*tasks, AVERAGE_TASK}
    for sample in report.samples:
        assert 0.0 <= sample.score <= 100.0
        assert sample.extra["prompt_tokens"] <= 256 + 8  # LongBench's seam tolerance after re-tokenizing
    by_key = {(s.variant, s.task, s.index): s.prediction for s in report.samples}
    assert all(by_key["exact", t, i] == by_key["dense", t, i] for (v, t, i) in by_key if v == "dense")


def test_longbench_reports_a_missing_folder():
    with pytest.raises(FileNotFoundError, match="data.zip"):
        longbench_eval.available_tasks("/no/such/folder")


# ----------------------------------------------------------------------------------------- CLI


def test_eval_command_writes_results(llama, tokenizer, tmp_path, capsys):
    from sparseprefill.cli import main

    folder = tmp_path / "tiny"
    llama.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    config = tmp_path / "lossy.json"
    config.write_text(json.dumps(config_to_dict(LOSSY)))
    out = tmp_path / "results"
    assert main(["eval", "ppl", str(folder), "--variants", f"config:{config}", "--lengths", str(LENGTH),
                 "--windows", "1", "--out", str(out), "--quiet"]) == 0
    assert (out / "ppl.json").is_file() and (out / "ppl.png").is_file()
    stored = json.loads((out / "ppl.json").read_text())
    assert stored["rows"][0]["variant"] == "config:lossy" and stored["rows"][0]["density"] < 0.9
    assert "config:lossy" in capsys.readouterr().out


def test_reports_are_written_when_matplotlib_is_missing(tmp_path, capsys):
    from sparseprefill.bench.plot import MissingPlotterError
    from sparseprefill.evals.report import write_report_files

    class Report:
        def to_dict(self):
            return {"rows": []}

        def markdown(self):
            return "| task |\n"

        def plot(self, path):
            raise MissingPlotterError("plotting needs matplotlib: pip install matplotlib")

    written = write_report_files(Report(), tmp_path, "ppl", plot=True)
    assert [p.name for p in written] == ["ppl.json", "ppl.md"]
    assert "no plot: plotting needs matplotlib" in capsys.readouterr().err
