"""``bench kernels --qk-from``: real q/k/v captured from a model, each configuration timed beside SDPA on
the same layers (CPU here: a tiny Llama saved with a tokenizer, as a Hugging Face path)."""

from __future__ import annotations

import csv

import pytest
import torch

from sparseprefill import AntidiagonalConfig, SparseConfig
from sparseprefill.bench import kernels
from sparseprefill.bench.real_qk import FIELDS, _layers, plot_real_qk, run_real_qk

from transformers import AutoModelForCausalLM

from tests.tiny_models import peak_attention, tiny_config, tiny_model
from tests.tiny_tokenizer import tiny_tokenizer

PEAKED_QK = 8.0  # peaked attention, so the estimates keep less than everything

@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny_llama")
    tokenizer = tiny_tokenizer()
    torch.manual_seed(0)
    config = tiny_config("llama")
    config.vocab_size = len(tokenizer)
    model = AutoModelForCausalLM.from_config(config).eval()
    peak_attention(model, PEAKED_QK)
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return str(path)


def test_rows_for_every_layer_and_config_with_densities_from_the_real_capture(model_dir, tmp_path):
    configs = {"default": SparseConfig(min_sparse_len=0),
               "columns": SparseConfig(pattern="antidiagonal", min_sparse_len=0,
                                       antidiagonal=AntidiagonalConfig(block_size=32, mass=0.9, vertical_share=0.05))}
    rows = run_real_qk(model_dir, [200], configs=configs, layers=[0, 1], device="cpu", dtype=torch.float32,
                       out_dir=tmp_path)
    with open(tmp_path / "real_qk.csv") as handle:
        written = list(csv.DictReader(handle))
    assert len(written) == len(rows) == 2 * (2 + 3 * len(configs)) and set(written[0]) == set(FIELDS)
    for layer in (0, 1):
        ops = {(r["op"], r["config"]): r for r in rows if r["layer"] == layer}
        assert ops[("dense_cudnn", "")]["vs_cudnn"] == 1.0
        for name in configs:
            layer_row, patched, estimate = (ops[(op, name)] for op in ("sparse_layer", "patched_layer", "estimate"))
            assert 0 < layer_row["density"] <= 1 and layer_row["density"] == estimate["density"]
            assert patched["density"] == layer_row["density"]  # the patcher routes heads on the GPU only
            assert layer_row["ms"] > 0 and patched["ms"] > 0 and estimate["ms"] > 0
    assert plot_real_qk(tmp_path / "real_qk.csv", tmp_path / "real_qk.png").stat().st_size > 0


def test_bad_arguments_are_refused_before_any_model_loads(capsys):
    assert kernels.main(["--qk-from", "nowhere", "--qk-configs", "nope"]) == 2
    assert "unknown" in capsys.readouterr().err
    assert kernels.main(["--qk-layers", "3"]) == 2
    assert "need --qk-from" in capsys.readouterr().err
    model = tiny_model("llama")
    with pytest.raises(ValueError, match=f"outside the model's {model.config.num_hidden_layers} layers"):
        _layers(model, [5])
    assert _layers(model, None) == list(range(model.config.num_hidden_layers))


def test_the_patched_layer_routes_like_the_patcher():
    """``patched_layer`` passes the kernel's break-even density where ``patch()`` routes heads (the GPU,
    ``route_dense_heads``), and nothing elsewhere."""
    from sparseprefill.bench.real_qk import patched_dense_above
    from sparseprefill.patterns import build_pattern
    from sparseprefill.patterns.cost import dense_break_even

    config = SparseConfig(min_sparse_len=0)
    pattern = build_pattern(config.pattern, config)
    assert patched_dense_above(config, pattern, 64, "cuda") == dense_break_even(pattern.name, 64) is not None
    assert patched_dense_above(config, pattern, 64, "cpu") is None
    unrouted = SparseConfig(min_sparse_len=0, route_dense_heads=False)
    assert patched_dense_above(unrouted, pattern, 64, "cuda") is None
