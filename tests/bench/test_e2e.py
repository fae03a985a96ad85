"""`sparseprefill bench e2e` on the CPU: shipped configs, argument parsing, fixed budgets, the dry run."""

from __future__ import annotations

import argparse
import csv
import math

import pytest
import torch

import sparseprefill
from sparseprefill.bench import e2e

# Public model-card values the shipped configs must carry (the benchmark's whole point is their shapes).
EXPECTED = {
    "llama-3.1-8b": dict(model_type="llama", hidden_size=4096, num_hidden_layers=32, num_attention_heads=32,
                         num_key_value_heads=8, intermediate_size=14336, vocab_size=128256,
                         max_position_embeddings=131072),
    "qwen2.5-7b": dict(model_type="qwen2", hidden_size=3584, num_hidden_layers=28, num_attention_heads=28,
                       num_key_value_heads=4, intermediate_size=18944, vocab_size=152064),
    "mistral-7b": dict(model_type="mistral", hidden_size=4096, num_hidden_layers=32, num_attention_heads=32,
                       num_key_value_heads=8, intermediate_size=14336, vocab_size=32768),
    "qwen3-8b": dict(model_type="qwen3", hidden_size=4096, num_hidden_layers=36, num_attention_heads=32,
                     num_key_value_heads=8, intermediate_size=12288, vocab_size=151936),
}


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_shipped_config_loads_as_supported_family(name):
    assert name in e2e.shipped_configs()
    config = e2e.load_arch_config(name)
    for key, value in EXPECTED[name].items():
        assert getattr(config, key) == value, key
    assert config.model_type in sparseprefill.SUPPORTED_FAMILIES
    assert not getattr(config, "use_sliding_window", False) and getattr(config, "sliding_window", None) in (None, 131072)


def test_llama31_config_has_llama3_rope_scaling():
    config = e2e.load_arch_config("llama-3.1-8b")
    rope = getattr(config, "rope_parameters", None) or config.rope_scaling
    assert rope["rope_type"] == "llama3" and rope["factor"] == 8.0
    assert rope["original_max_position_embeddings"] == 8192
    assert rope.get("rope_theta", getattr(config, "rope_theta", None)) == 500000.0


def test_unknown_config_names_the_shipped_ones():
    with pytest.raises(FileNotFoundError, match="llama-3.1-8b"):
        e2e.load_arch_config("no-such-model")


def test_tiny_config_is_a_small_model_of_the_same_family():
    config = e2e.tiny_config("qwen2.5-7b")
    assert config.model_type == "qwen2" and config.num_hidden_layers == 2 and config.hidden_size == 64


@pytest.mark.parametrize(("text", "expected"), [
    ("4k,8k", [4096, 8192]),
    (["4K", "16384"], [4096, 16384]),
    ("4k, 8k 128k", [4096, 8192, 131072]),
    ("0.5k", [512]),
    ("1m", [1048576]),
])
def test_parse_lengths(text, expected):
    assert e2e.parse_lengths(text) == expected


@pytest.mark.parametrize("bad", ["4x", "", "-1k", "0", "1.3"])
def test_parse_lengths_rejects(bad):
    with pytest.raises(argparse.ArgumentTypeError):
        e2e.parse_lengths(bad)


def test_parse_densities():
    assert e2e.parse_densities("0.05,0.1") == [0.05, 0.1]
    assert e2e.parse_densities(["0.2", "dynamic"]) == [0.2, e2e.DYNAMIC]
    with pytest.raises(argparse.ArgumentTypeError):
        e2e.parse_densities("1.5")


def test_cli_arguments_parse():
    parser = argparse.ArgumentParser()
    e2e.add_arguments(parser)
    args = parser.parse_args(["--lengths", "4k,8k", "32K", "--density", "0.1,0.2", "--configs", "llama-3.1-8b,qwen2.5-7b"])
    assert e2e.parse_lengths(args.lengths) == [4096, 8192, 32768]
    assert e2e.parse_densities(args.density) == [0.1, 0.2]
    assert e2e._csv_list(args.configs) == ["llama-3.1-8b", "qwen2.5-7b"]
    assert args.lengths is not None and args.out is None and not args.dry_run


def test_without_cuda_the_real_run_refuses_clearly(capsys, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert e2e.main(["--lengths", "4k", "--no-progress"]) == 1
    assert "needs a CUDA GPU" in capsys.readouterr().err


@pytest.mark.parametrize(("pattern", "tolerance"), [("vertical_slash", 0.06), ("block_sparse", 0.03)])
def test_fixed_density_is_measured_near_the_target(pattern, tolerance):
    """A tiny random model at 2048 tokens (min_sparse_len lowered to 512): stats' measured density is
    close to the requested 0.3, and the prediction the budget was sized from agrees."""
    torch.manual_seed(0)
    model = e2e.build_model(e2e.tiny_config("llama-3.1-8b"), device=torch.device("cpu"), dtype=torch.float32)
    length, target = 2048, 0.3
    cfg, predicted, note = e2e.fixed_budget_config(pattern, length, target, min_sparse_len=512,
                                                   device=torch.device("cpu"))
    assert note == ""
    assert abs(predicted - target) < tolerance
    sparseprefill.patch(model, cfg)
    ids = torch.randint(0, model.config.vocab_size, (1, length), generator=torch.Generator().manual_seed(1))
    with torch.inference_mode():
        model(ids, logits_to_keep=1, use_cache=False)
    stats = sparseprefill.stats(model)
    assert stats.phases["sparse_prefill"] == model.config.num_hidden_layers
    assert abs(stats.density - target) < tolerance


def test_target_below_the_floor_says_so():
    cfg, predicted, note = e2e.fixed_budget_config("vertical_slash", 1024, 0.05, min_sparse_len=0,
                                                   device=torch.device("cpu"))
    assert predicted > 0.05 and "floor" in note
    assert cfg.vertical_slash.vertical_mass == 1.0 and cfg.vertical_slash.max_slash == 1


def test_dry_run_writes_rows_with_every_column_and_a_png(tmp_path, capsys):
    pytest.importorskip("matplotlib")
    out = tmp_path / "e2e"
    assert e2e.main(["--dry-run", "--lengths", "128,512", "--new-tokens", "3", "--out", str(out), "--no-progress"]) == 0
    printed = capsys.readouterr().out
    assert "FIXED budget" in printed and "e2e_ttft" in printed
    with open(out / "e2e.csv", newline="") as f:
        reader = csv.DictReader(f)
        assert tuple(reader.fieldnames) == e2e.CSV_FIELDS
        rows = list(reader)
    ops = {(r["op"], r["length"], r["variant"]) for r in rows}
    for length in ("128", "512"):
        for variant in e2e.DEFAULT_VARIANTS:
            for op in ("e2e_ttft", "e2e_ttft_cache", "e2e_decode"):
                assert (op, length, variant) in ops
    always = set(e2e.CSV_FIELDS) - {"note", "density_target"}
    for r in rows:
        missing = [k for k in always if r[k] == ""]
        assert not missing, (r["op"], r["variant"], missing)
        assert math.isfinite(float(r["ms"])) and float(r["ms"]) > 0
    sparse = [r for r in rows if r["variant"] == "sparse" and r["op"] == "e2e_ttft"]
    short, = [r for r in sparse if r["length"] == "128"]
    assert float(short["density"]) == 1.0 and "ran dense" in short["note"]  # below the lowered min_sparse_len
    long, = [r for r in sparse if r["length"] == "512"]
    assert 0.0 < float(long["density"]) < 1.0 and "fixed budget" in long["note"]
    assert long["density_target"] == str(e2e.DRY_RUN_DENSITY)
    baseline = [r for r in rows if r["variant"] == e2e.BASELINE]
    assert all(float(r["speedup_vs_dense_cudnn"]) == 1.0 for r in baseline)
    png = out / "e2e.png"
    assert png.exists() and png.stat().st_size > 10_000
