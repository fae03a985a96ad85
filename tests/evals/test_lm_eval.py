"""The ``sparseprefill`` lm-eval model: argument parsing, end-to-end runs, the console script.

Everything runs offline: a tiny random Llama and a character-level tokenizer are saved to a temporary
directory, and the tasks are YAML files written beside a local JSONL file (``dataset_path: json``).
The lossless ``keep_everything`` preset makes the sparse path run on these short prompts while
computing exactly dense attention, so its lm-eval results must equal the ``dense=true`` run's.
"""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
from importlib import metadata
from pathlib import Path

import lm_eval  # in the test extra on purpose: these tests must run in CI, not skip
import pytest
from lm_eval.tasks import TaskManager

import sparseprefill
from sparseprefill import SparseConfig
from sparseprefill.evals import lm_eval_model as lem
from tests.tiny_models import VOCAB, tiny_model

REPO_ROOT = Path(__file__).resolve().parents[2]

MC_TASK = "sp_tiny_mc"
GEN_TASK = "sp_tiny_gen"
NUM_DOCS = 4
# Words per context: ~190 characters, so several 64-token blocks at one token per character.
CONTEXT_WORDS = 30
WORDS = ("apple", "river", "stone", "cloud", "tiger", "lamp", "ocean", "violet", "north", "music")
CHOICES = (" apple", " river", " stone")
# keep_everything runs the sparse kernels instead of SDPA: same math, different summation order.
LOGLIK_TOLERANCE = 1e-4
# A narrow A-shape (8 sinks + a 32-token window) on ~190-token prompts: visibly sparse.
NARROW_A_SHAPE = "keep_everything;pattern=a_shape;a_shape.sink_tokens=8;a_shape.local_tokens=32;a_shape.block_size=16"
# The sparse path's kernels fall back to Triton's interpreter on CPU (conftest); a subprocess inherits it.
SUBPROCESS_TIMEOUT_S = 300

OFFLINE_ENV = {"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}


def _go_offline(mp: pytest.MonkeyPatch) -> None:
    """Offline for this process: the variables, plus the constants huggingface_hub and datasets read
    from them at import (either may have been imported by an earlier test)."""
    for name, value in OFFLINE_ENV.items():
        mp.setenv(name, value)
    import datasets.config
    import huggingface_hub.constants

    mp.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    mp.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    mp.setattr(datasets.config, "HF_DATASETS_OFFLINE", True)


def _char_tokenizer():
    """One token per printable ASCII character plus pad/BOS/EOS/UNK: fits the tiny model's vocabulary
    and needs no download. A BPE model with no merges splits text into its characters."""
    from tokenizers import Tokenizer, models
    from transformers import PreTrainedTokenizerFast

    special = ["<pad>", "<s>", "</s>"]
    vocab = {token: i for i, token in enumerate(special + [chr(c) for c in range(32, 127)])}
    vocab["<unk>"] = len(vocab)
    assert len(vocab) <= VOCAB
    backend = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>"))
    return PreTrainedTokenizerFast(
        tokenizer_object=backend, pad_token="<pad>", bos_token="<s>", eos_token="</s>", unk_token="<unk>"
    )


def _write_tasks(root: Path) -> Path:
    rng = random.Random(0)
    docs = [
        {
            "context": " ".join(rng.choice(WORDS) for _ in range(CONTEXT_WORDS)) + " The answer is",
            "choices": list(CHOICES),
            "label": i % len(CHOICES),
            "answer": "apple",
        }
        for i in range(NUM_DOCS)
    ]
    data = root / "docs.jsonl"
    data.write_text("\n".join(json.dumps(d) for d in docs) + "\n")
    tasks = root / "tasks"
    tasks.mkdir()
    # cache_dir keeps the datasets cache of the run inside the temporary directory.
    common = (
        f"dataset_path: json\ndataset_kwargs:\n  data_files:\n    test: {data}\n  cache_dir: {root / 'hf-datasets'}\n"
        "test_split: test\ndoc_to_text: \"{{context}}\"\n"
    )
    (tasks / "mc.yaml").write_text(
        f"task: {MC_TASK}\n{common}output_type: multiple_choice\n"
        "doc_to_choice: \"{{choices}}\"\ndoc_to_target: \"{{label}}\"\n"
        "metric_list:\n  - metric: acc\n    aggregation: mean\n    higher_is_better: true\n"
    )
    (tasks / "gen.yaml").write_text(
        f"task: {GEN_TASK}\n{common}output_type: generate_until\ndoc_to_target: \"{{{{answer}}}}\"\n"
        "generation_kwargs:\n  until: [\"\\n\"]\n  max_gen_toks: 6\n  do_sample: false\n"
        "metric_list:\n  - metric: exact_match\n    aggregation: mean\n    higher_is_better: true\n"
    )
    return tasks


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    root = tmp_path_factory.mktemp("lm_eval")
    model_dir = root / "model"
    # qk_scale gives peaked attention, so a narrow sparse pattern visibly changes the numbers.
    tiny_model("llama", qk_scale=8.0).save_pretrained(model_dir)
    _char_tokenizer().save_pretrained(model_dir)
    return {"root": root, "model": model_dir, "tasks": _write_tasks(root)}


def _evaluate(workspace, extra_args: str, tasks: list[str]):
    with pytest.MonkeyPatch.context() as mp:
        _go_offline(mp)
        return lm_eval.simple_evaluate(
            model=lem.MODEL_NAME,
            model_args=f"pretrained={workspace['model']},device=cpu,dtype=float32,{extra_args}",
            tasks=tasks,
            task_manager=TaskManager(include_path=str(workspace["tasks"])),
            batch_size=2,
            log_samples=True,
        )


@pytest.fixture(scope="module")
def runs(workspace):
    both = [MC_TASK, GEN_TASK]
    return {
        "lossless": _evaluate(workspace, "sparse_config=keep_everything", both),
        "dense": _evaluate(workspace, "sparse_config=keep_everything,dense=true", both),
        "narrow": _evaluate(workspace, f"sparse_config={NARROW_A_SHAPE}", [MC_TASK]),
    }


def _responses(result, task):
    return [sample["filtered_resps"] for sample in sorted(result["samples"][task], key=lambda s: s["doc_id"])]


# ---------------------------------------------------------------------------------------------
# end to end
# ---------------------------------------------------------------------------------------------

def test_model_is_registered_under_its_name():
    from lm_eval.api.registry import get_model
    from lm_eval.models.huggingface import HFLM

    assert get_model("sparseprefill") is lem.SparsePrefillLM
    assert issubclass(lem.SparsePrefillLM, HFLM)


def test_lossless_sparse_run_equals_dense_run(runs):
    lossless, dense = runs["lossless"], runs["dense"]
    sparse_ll, dense_ll = _responses(lossless, MC_TASK), _responses(dense, MC_TASK)
    assert len(sparse_ll) == NUM_DOCS
    for sparse_doc, dense_doc in zip(sparse_ll, dense_ll):
        assert len(sparse_doc) == len(CHOICES)
        for (sparse_value, sparse_greedy), (dense_value, dense_greedy) in zip(sparse_doc, dense_doc):
            assert sparse_value == pytest.approx(dense_value, abs=LOGLIK_TOLERANCE)
            assert sparse_greedy == dense_greedy
    assert _responses(lossless, GEN_TASK) == _responses(dense, GEN_TASK)
    assert lossless["results"][MC_TASK]["acc,none"] == dense["results"][MC_TASK]["acc,none"]


def test_results_record_the_density_the_sparse_path_used(runs):
    report = runs["lossless"]["config"]["sparseprefill"]
    assert report["mode"] == "sparse"
    assert report["model_type"] == "llama"
    assert report["phases"]["sparse_prefill"] > 0  # the sparse path ran, not a short-prompt fallback
    assert "short_prompt" not in report["fallbacks"]
    assert report["density"] == pytest.approx(1.0)  # keep_everything keeps every causal pair
    assert report["config"] == SparseConfig.keep_everything().to_dict()
    assert all(layer["causal_pairs"] > 0 for layer in report["layers"])
    json.dumps(runs["lossless"]["config"], default=str)  # lm-eval writes this into its results file

    dense_report = runs["dense"]["config"]["sparseprefill"]
    assert dense_report["mode"] == "dense"
    assert "density" not in dense_report


def test_narrow_pattern_is_applied_and_changes_the_numbers(runs):
    report = runs["narrow"]["config"]["sparseprefill"]
    assert report["pattern"] == "a_shape"
    assert report["config"]["a_shape"]["local_tokens"] == 32
    assert report["phases"]["sparse_prefill"] > 0
    assert 0.0 < report["density"] < 0.9
    narrow = [value for doc in _responses(runs["narrow"], MC_TASK) for value, _ in doc]
    dense = [value for doc in _responses(runs["dense"], MC_TASK) for value, _ in doc]
    assert max(abs(a - b) for a, b in zip(narrow, dense)) > LOGLIK_TOLERANCE


def test_sparse_stats_and_summary_line(workspace, caplog):
    with pytest.MonkeyPatch.context() as mp:
        _go_offline(mp)
        lm = lem.SparsePrefillLM(pretrained=str(workspace["model"]), device="cpu", dtype="float32",
                                 sparse_config="keep_everything", batch_size=1)
    assert sparseprefill.is_patched(lm.model)
    assert lm.sparse_settings.config == SparseConfig.keep_everything()
    assert lm.sparse_stats().phases == {}  # nothing ran yet
    report = lm.sparse_report()
    assert lem.summarize(report).startswith("sparseprefill: llama pattern=auto density=n/a over 0 sparse")
    assert "min_sparse_len=0" in lem.summarize(report)
    with caplog.at_level("INFO", logger="lm_eval.sparseprefill"):
        info = lm.get_model_info()
    assert info["sparseprefill"]["mode"] == "sparse"
    assert any(record.getMessage().startswith("sparseprefill: llama") for record in caplog.records)


def test_unsupported_model_is_refused_with_what_was_found(tmp_path):
    from transformers import GPT2Config, GPT2LMHeadModel

    config = GPT2Config(vocab_size=VOCAB, n_embd=32, n_layer=1, n_head=2, n_positions=256)
    GPT2LMHeadModel(config).save_pretrained(tmp_path)
    _char_tokenizer().save_pretrained(tmp_path)
    with pytest.MonkeyPatch.context() as mp:
        _go_offline(mp)
        with pytest.raises(sparseprefill.UnsupportedModelError, match="gpt2"):
            lem.SparsePrefillLM(pretrained=str(tmp_path), device="cpu", dtype="float32")


def test_profile_for_another_model_is_refused(workspace):
    with pytest.MonkeyPatch.context() as mp:
        _go_offline(mp)
        with pytest.raises(sparseprefill.ProfileMismatchError):
            lem.SparsePrefillLM(pretrained=str(workspace["model"]), device="cpu", dtype="float32",
                                profile="smollm2-135m-instruct")


def test_bad_arguments_fail_before_the_model_loads(tmp_path):
    missing = tmp_path / "no-such-model"  # would raise OSError if loading were attempted first
    with pytest.raises(ValueError, match="unknown field 'min_sparse'"):
        lem.SparsePrefillLM(pretrained=str(missing), sparse_config="min_sparse=1")
    with pytest.raises(ValueError, match="not a shipped profile"):
        lem.SparsePrefillLM(pretrained=str(missing), profile="no-such-profile")
    with pytest.raises(ValueError, match="dense must be true or false"):
        lem.SparsePrefillLM(pretrained=str(missing), dense="maybe")


# ---------------------------------------------------------------------------------------------
# sparse_config parsing
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("value", [None, "auto", "default", " AUTO "])
def test_presets_give_the_default_config(value):
    assert lem.parse_sparse_config(value) == SparseConfig()


def test_inline_items_are_typed_and_nested():
    config = lem.parse_sparse_config(
        "pattern=block_sparse;min_sparse_len=8192|block_sparse.mass=0.9;block_sparse.top_k=4;"
        "vertical_slash.max_slash=none"
    )
    assert config.pattern is sparseprefill.PatternName.BLOCK_SPARSE
    assert config.min_sparse_len == 8192 and isinstance(config.min_sparse_len, int)
    assert config.block_sparse.mass == 0.9 and config.block_sparse.top_k == 4
    assert config.block_sparse.block_size == SparseConfig().block_sparse.block_size  # untouched field kept
    assert config.vertical_slash.max_slash is None


def test_inline_bools_and_layer_lists():
    config = lem.parse_sparse_config("route_dense_heads=off;dense_layers=0, 2;vertical_slash.fused=yes;"
                                     "vertical_slash.query_windows=1")
    assert config.route_dense_heads is False and config.dense_layers == (0, 2)
    assert config.vertical_slash.fused is True and config.vertical_slash.query_windows == 1
    assert lem.parse_sparse_config({"dense_layers": [1], "route_dense_heads": True}).dense_layers == (1,)
    assert lem.parse_sparse_config("dense_layers=").dense_layers == ()
    with pytest.raises(ValueError, match="route_dense_heads='maybe' is not valid; it requires a bool"):
        lem.parse_sparse_config("route_dense_heads=maybe")
    with pytest.raises(ValueError, match=r"dense_layers='0,x' is not valid; it requires integers \(e.g. dense_layers=0,1\)"):
        lem.parse_sparse_config("dense_layers=0,x")


def test_inline_items_after_a_preset_override_it():
    config = lem.parse_sparse_config("keep_everything;pattern=a_shape;a_shape.local_tokens=512")
    expected = SparseConfig.keep_everything(pattern="a_shape")
    assert config.pattern is sparseprefill.PatternName.A_SHAPE
    assert config.a_shape.local_tokens == 512
    assert config.min_sparse_len == 0 and config.vertical_slash == expected.vertical_slash


def test_json_file_and_mapping(tmp_path):
    config = SparseConfig(pattern="antidiagonal", min_sparse_len=4096, antidiagonal={"stride": 16, "mass": 0.9})
    path = tmp_path / "config.json"
    path.write_text(json.dumps(config.to_dict()))
    assert lem.parse_sparse_config(str(path)) == config
    assert lem.parse_sparse_config(path) == config
    partial = {"min_sparse_len": 1024, "block_sparse": {"top_k": 2}}
    assert lem.parse_sparse_config(partial) == SparseConfig(min_sparse_len=1024, block_sparse={"top_k": 2})
    assert lem.parse_sparse_config(json.dumps(partial)) == lem.parse_sparse_config(partial)


@pytest.mark.parametrize(
    ("value", "message"),
    [
        ("nope=1", r"unknown field 'nope'; SparseConfig has: pattern, min_sparse_len"),
        ("block_sparse.nope=1", r"unknown field 'block_sparse.nope'; BlockSparseConfig has: block_sparse.block_size"),
        ("block_sparse=1", r"block_sparse is a section; set its fields one by one"),
        ("min_sparse_len.x=1", r"min_sparse_len has no fields"),
        ("min_sparse_len=4k", r"min_sparse_len='4k' is not valid; it requires int"),
        ("min_sparse_query_len=none", r"min_sparse_query_len cannot be none; it requires int"),
        ("block_sparse.mass=high", r"block_sparse.mass='high' is not valid; it requires float"),
        ("block_sparse.top_k=2.5", r"block_sparse.top_k='2.5' is not valid; it requires int or none"),
        ("pattern=star", r"pattern='star' is not valid; it requires one of 'auto' \| 'vertical_slash'"),
        ("antidiagonal.stride=3", r"must be a multiple of antidiagonal.stride \(3\)"),
        ("vertical_slash.vertical_mass=1.5", r"vertical_mass must be in \[0, 1\], got 1.5"),
        ("fast;pattern=dense", r"'fast' is not a preset; the first item may be one of auto, default, keep_everything"),
        ("auto;pattern", r"expected key=value, got 'pattern'"),
        ("sparse", r"neither a preset \(auto, default, keep_everything\), an existing JSON file"),
        ({"block_sparse": 3}, r"block_sparse must be an object of BlockSparseConfig fields, got int"),
        ({"min_sparse_len": True}, r"min_sparse_len=True is not valid; it requires int"),
        ("{not json", r"inline JSON is not valid"),
        (3, r"sparse_config must be a preset, a JSON file path or key=value items, got int"),
    ],
)
def test_bad_sparse_config_says_what_was_found_and_what_is_required(value, message):
    with pytest.raises(ValueError, match=message):
        lem.parse_sparse_config(value)


def test_json_file_errors(tmp_path):
    broken = tmp_path / "broken.json"
    broken.write_text("{")
    with pytest.raises(ValueError, match="is not valid JSON"):
        lem.parse_sparse_config(str(broken))
    listed = tmp_path / "list.json"
    listed.write_text("[1]")
    with pytest.raises(ValueError, match="must hold a JSON object of SparseConfig fields, got list"):
        lem.parse_sparse_config(str(listed))
    profile = sparseprefill.profiles.SHIPPED_DIR / "smollm2-135m-instruct.json"
    with pytest.raises(ValueError, match="is a per-head profile, not a SparseConfig; pass it as profile="):
        lem.parse_sparse_config(str(profile))


def test_profile_and_flag_arguments(tmp_path):
    profile, source = lem.resolve_profile("smollm2-135m-instruct")
    assert source == "shipped:smollm2-135m-instruct" and profile.model.model_type == "llama"
    path = sparseprefill.profiles.SHIPPED_DIR / "gemma-3-270m.json"
    assert lem.resolve_profile(str(path))[1] == str(path)
    assert lem.resolve_profile(None) == (None, None)
    with pytest.raises(ValueError, match="available: gemma-3-270m, smollm2-135m-instruct"):
        lem.resolve_profile("llama-9000")
    assert lem.parse_bool("dense", True) is True
    assert lem.parse_bool("dense", "False") is False
    assert lem.parse_bool("dense", "yes") is True
    with pytest.raises(ValueError, match="dense must be true or false, got 'sometimes'"):
        lem.parse_bool("dense", "sometimes")
    settings = lem.resolve_settings("keep_everything", None, "true")
    assert settings.dense and settings.config == SparseConfig.keep_everything()


# ---------------------------------------------------------------------------------------------
# packaging: console script, entry points, missing lm-eval
# ---------------------------------------------------------------------------------------------

def _run_python(code: str, *args: str, cwd: Path = REPO_ROOT) -> subprocess.CompletedProcess:
    env = {**os.environ, **OFFLINE_ENV}
    return subprocess.run(
        [sys.executable, "-c", code, *args], cwd=cwd, env=env, capture_output=True, text=True,
        timeout=SUBPROCESS_TIMEOUT_S,
    )


def test_console_script_is_declared():
    scripts = {ep.name: ep for ep in metadata.entry_points(group="console_scripts")}
    if "sparseprefill-lm-eval" not in scripts:
        pytest.skip("sparseprefill is not pip-installed here (CI installs it with -e)")
    assert scripts["sparseprefill-lm-eval"].value == "sparseprefill.evals.lm_eval_model:main"
    assert scripts["sparseprefill-lm-eval"].load() is lem.main


def test_main_help_is_lm_evals_help():
    result = _run_python("from sparseprefill.evals.lm_eval_model import main; main()", "run", "--help")
    assert result.returncode == 0, result.stderr
    assert "--model_args" in result.stdout and "--tasks" in result.stdout


def test_main_runs_a_task_offline_with_the_sparse_model(workspace):
    out = workspace["root"] / "cli-out"
    # The legacy form without the "run" subcommand, as most lm-eval docs and scripts still write it.
    result = _run_python(
        "from sparseprefill.evals.lm_eval_model import main; main()",
        "--model", "sparseprefill",
        # The CLI passes --device itself; a device= in --model_args would clash with it.
        "--model_args", f"pretrained={workspace['model']},dtype=float32,sparse_config=keep_everything",
        "--device", "cpu", "--tasks", MC_TASK, "--include_path", str(workspace["tasks"]),
        "--batch_size", "2", "--limit", "2", "--output_path", str(out),
        cwd=workspace["root"],
    )
    assert result.returncode == 0, result.stderr[-4000:]
    assert "sparseprefill: llama pattern=auto density=1.0000 over" in result.stderr
    [results_file] = out.rglob("results_*.json")
    report = json.loads(results_file.read_text())["config"]["sparseprefill"]
    assert report["mode"] == "sparse" and report["phases"]["sparse_prefill"] > 0


def test_without_lm_eval_the_module_imports_and_usage_says_what_to_install():
    code = (
        "import sys\n"
        "sys.modules['lm_eval'] = None  # as if lm-eval were not installed\n"
        "from sparseprefill.evals import lm_eval_model as m\n"
        "assert m.parse_sparse_config('min_sparse_len=1').min_sparse_len == 1\n"
        "for use in (lambda: m.SparsePrefillLM(pretrained='x'), m.main):\n"
        "    try:\n"
        "        use()\n"
        "    except ImportError as error:\n"
        "        print('IMPORT-ERROR', error)\n"
    )
    result = _run_python(code)
    assert result.returncode == 0, result.stderr
    lines = [line for line in result.stdout.splitlines() if line.startswith("IMPORT-ERROR")]
    assert len(lines) == 2
    assert all('pip install "sparseprefill[lm-eval]"' in line for line in lines)
