"""Patched models under transformers tensor parallelism (``tp_plan="auto"``), on CPU with gloo.

``test_tp_patched_matches_single_process`` saves a tiny random Llama (4 query / 2 KV heads, 2 layers)
and a per-head profile that gives every head of a layer its own pattern, then launches
``torchrun --nproc-per-node 2`` running this file as the worker: each rank loads the model with the
TP plan (rank r attends query heads 2r, 2r+1 and KV head r), patches it and writes its logits. They
must equal, to fp32 rounding, the same model loaded in this process without TP and patched with the
same profile; with a keep-everything config they must equal the unpatched model; and a short greedy
``generate`` with decode retrieval must give the same logits as in one process. The profile is
lossy, and giving a rank the other rank's head settings changes the logits far beyond the tolerance
(asserted below), so a rank that applied global head indices to its local heads would fail.

The other tests check the head-count guard, the refusals and the TP detection without processes.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import types
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, LlamaConfig

import sparseprefill
from sparseprefill import (
    AntidiagonalConfig,
    BlockSparseConfig,
    DecodeRetrievalConfig,
    SparseConfig,
    VerticalSlashConfig,
)
from sparseprefill.patchers.tensor_parallel import tp_load_kwargs

NUM_HEADS, NUM_KV_HEADS, NUM_LAYERS = 4, 2, 2
LENGTH = 300  # several 32-token blocks; min_sparse_len=0 routes it to the sparse path
WORLD = 2
ATOL = 1e-5  # fp32: summation order only (o_proj/MLP partial sums are all-reduced under TP)
TIMEOUT_S = 120

SMALL_BLOCKS = dict(
    antidiagonal=AntidiagonalConfig(block_size=32, stride=8),
    block_sparse=BlockSparseConfig(block_size=32),
    vertical_slash=VerticalSlashConfig(block_size=32, sink_tokens=16, local_tokens=32, last_queries=32),
)
ROUTING = SparseConfig(min_sparse_len=0, **SMALL_BLOCKS)
KEEP_ALL = SparseConfig.keep_everything(
    antidiagonal=AntidiagonalConfig(block_size=32, mass=1.0), block_sparse=BlockSparseConfig(block_size=32, mass=1.0),
)
# Decode retrieval on every layer from the first step (page choice per KV head: local KV heads under TP).
WITH_DECODE = SparseConfig(min_sparse_len=0, decode=DecodeRetrievalConfig(
    page_size=16, budget_tokens=64, sink_tokens=16, recent_tokens=16, min_context=0, dense_layers=()), **SMALL_BLOCKS)
NEW_TOKENS = 4
# One distinct setting per head; the lossy ones (a_shape with a short window, half-mass block
# sparse) make the patched model differ clearly from the dense one.
HEAD_SETTINGS = [
    [{"pattern": "a_shape", "sink_tokens": 4, "local_tokens": 32},
     {"pattern": "dense"},
     {"pattern": "block_sparse", "mass": 0.5},
     {"pattern": "vertical_slash", "vertical_mass": 0.5, "slash_mass": 0.5, "max_vertical": 32, "max_slash": 8}],
    [{"pattern": "dense"},
     {"pattern": "block_sparse", "mass": 0.5},
     {"pattern": "a_shape", "sink_tokens": 0, "local_tokens": 32},
     {"pattern": "antidiagonal", "mass": 0.5}],
]


def tiny_config() -> LlamaConfig:
    return LlamaConfig(
        vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=NUM_LAYERS,
        num_attention_heads=NUM_HEADS, num_key_value_heads=NUM_KV_HEADS, head_dim=16,
        max_position_embeddings=4096, pad_token_id=0, bos_token_id=1, eos_token_id=2,
    )


def profile_dict(config, layers=HEAD_SETTINGS) -> dict:
    from sparseprefill.profiles import PROFILE_FORMAT, PROFILE_VERSION, model_identity

    return {
        "format": PROFILE_FORMAT, "version": PROFILE_VERSION, "model": model_identity(config).to_dict(),
        "calibration": {"source": "test_tensor_parallel", "lengths": [LENGTH], "samples": 0,
                        "objective": "attention_mass_recall", "target": 0.9, "tool_version": "0", "date": "2025-01-01"},
        "layers": layers,
    }


def input_ids() -> torch.Tensor:
    return torch.randint(3, 128, (1, LENGTH), generator=torch.Generator().manual_seed(0))


def logits(model) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids(), use_cache=False).logits.float()


def patched_logits(model, config, profile=None):
    sparseprefill.patch(model, config, profile=profile)
    try:
        return logits(model), sparseprefill.stats(model)
    finally:
        sparseprefill.unpatch(model)


def generated_logits(model, profile) -> tuple[torch.Tensor, dict]:
    """Greedy decode with the profile's prefill and decode retrieval: logits of every new token."""
    sparseprefill.patch(model, WITH_DECODE, profile=profile)
    try:
        with torch.no_grad():
            out = model.generate(input_ids(), max_new_tokens=NEW_TOKENS, do_sample=False, pad_token_id=0,
                                 output_logits=True, return_dict_in_generate=True)
        return torch.stack(out.logits).float(), dict(sparseprefill.stats(model).phases)
    finally:
        sparseprefill.unpatch(model)




# ------------------------------------------------------------------------------------------------
# The worker: ``torchrun --nproc-per-node 2 tests/patchers/test_tensor_parallel.py MODEL_DIR PROFILE OUT_DIR``
# ------------------------------------------------------------------------------------------------


def _worker(model_dir: str, profile_path: str, out_dir: str) -> None:
    import torch.distributed as dist

    from sparseprefill.patchers import observe_prefill

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32, **tp_load_kwargs()).eval()
    rank = dist.get_rank()
    result = {"tp_size": model.tp_size, "rank": rank}
    tensors = {"unpatched": logits(model)}
    tensors["profile"], stats = patched_logits(model, ROUTING, profile_path)
    result["stats"] = stats.to_dict()
    result["stats_text"] = str(stats)
    tensors["keep_all"], keep_stats = patched_logits(model, KEEP_ALL)
    result["keep_all_phases"] = dict(keep_stats.phases)
    tensors["decode"], result["decode_phases"] = generated_logits(model, profile_path)
    # The observer/inspector hooks key results by global head; they refuse a sharded model.
    sparseprefill.patch(model, ROUTING)
    try:
        with observe_prefill(model, lambda *a, **k: None):
            pass
    except RuntimeError as exc:
        result["observer_error"] = str(exc)
    sparseprefill.unpatch(model)
    torch.save(tensors, Path(out_dir) / f"logits_rank{rank}.pt")
    (Path(out_dir) / f"result_rank{rank}.json").write_text(json.dumps(result))
    dist.barrier()
    dist.destroy_process_group()


# ------------------------------------------------------------------------------------------------
# Tests
# ------------------------------------------------------------------------------------------------


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _distributed_unavailable() -> str | None:
    import torch.distributed as dist

    if not dist.is_available():
        return "torch.distributed is not available in this torch build"
    if not dist.is_gloo_available():
        return "the gloo backend is not available in this torch build"
    return None


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """A tiny Llama with peaked attention (q/k scaled: lossy patterns then change the output) and its profile."""
    folder = tmp_path_factory.mktemp("tp")
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(tiny_config()).eval()
    with torch.no_grad():
        for layer in model.model.layers:
            layer.self_attn.q_proj.weight.mul_(8.0)
            layer.self_attn.k_proj.weight.mul_(8.0)
    model.save_pretrained(folder / "model")
    profile = folder / "profile.json"
    profile.write_text(json.dumps(profile_dict(model.config)))
    return folder / "model", profile


def test_tp_patched_matches_single_process(saved, tmp_path):
    reason = _distributed_unavailable()
    if reason:
        pytest.skip(reason)
    model_dir, profile = saved
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore")
    command = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "1", "--nproc-per-node", str(WORLD),
               "--master-addr", "127.0.0.1", "--master-port", str(_free_port()),
               __file__, str(model_dir), str(profile), str(tmp_path)]
    run = subprocess.run(command, env=env, capture_output=True, text=True, timeout=TIMEOUT_S)
    assert run.returncode == 0, f"torchrun failed:\n{run.stdout[-4000:]}\n{run.stderr[-6000:]}"

    single = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    reference = logits(single)
    single_profile, _ = patched_logits(single, ROUTING, profile)
    # Teeth: the profile is lossy, and each rank applying the other rank's head settings (what global
    # head indices on local heads amount to) gives clearly different logits.
    swapped = [layer[2:] + layer[:2] for layer in HEAD_SETTINGS]
    wrong_heads, _ = patched_logits(single, ROUTING, profile_dict(single.config, swapped))
    single_decode, _ = generated_logits(single, profile)
    assert (single_profile - reference).abs().max() > 100 * ATOL
    assert (wrong_heads - single_profile).abs().max() > 100 * ATOL

    for rank in range(WORLD):
        result = json.loads((tmp_path / f"result_rank{rank}.json").read_text())
        tensors = torch.load(tmp_path / f"logits_rank{rank}.pt")
        assert result["tp_size"] == WORLD and result["rank"] == rank
        torch.testing.assert_close(tensors["unpatched"], reference, atol=ATOL, rtol=0)
        torch.testing.assert_close(tensors["profile"], single_profile, atol=ATOL, rtol=0)
        torch.testing.assert_close(tensors["keep_all"], reference, atol=ATOL, rtol=0)
        torch.testing.assert_close(tensors["decode"], single_decode, atol=ATOL, rtol=0)
        assert result["decode_phases"] == {"sparse_prefill": NUM_LAYERS, "sparse_decode": NUM_LAYERS * (NEW_TOKENS - 1)}
        stats = result["stats"]
        assert (stats["tp_size"], stats["tp_rank"]) == (WORLD, rank)
        assert f"tensor parallel rank {rank} of {WORLD}" in result["stats_text"]
        assert stats["phases"] == {"sparse_prefill": NUM_LAYERS} and not stats["fallbacks"]
        assert result["keep_all_phases"] == {"sparse_prefill": NUM_LAYERS}
        # Each rank ran exactly its own two heads' patterns.
        per_rank = NUM_HEADS // WORLD
        for layer, layer_stats in enumerate(stats["layers"]):
            mine = HEAD_SETTINGS[layer][rank * per_rank:(rank + 1) * per_rank]
            assert layer_stats["patterns"] == {s["pattern"]: 1 for s in mine}
        assert "sharded" in result["observer_error"]


def test_head_count_mismatch_raises():
    """A call whose head counts differ from the plan's (a model sharded after patch) must raise, not
    index the wrong heads."""
    from sparseprefill.patchers.attention import sparseprefill_attention

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(tiny_config()).eval()
    sparseprefill.patch(model, ROUTING)
    try:
        module = model.model.layers[0].self_attn
        q = torch.randn(1, NUM_HEADS // 2, 64, 16)  # rank 0's slice of a 2-way split
        k = torch.randn(1, NUM_KV_HEADS // 2, 64, 16)
        with pytest.raises(RuntimeError, match=r"2 query / 1 KV heads, but the patch planned for 4 / 2"):
            sparseprefill_attention(module, q, k, k, None)
    finally:
        sparseprefill.unpatch(model)


def _fake_tp_model(tp_plan: dict, rank: int = 1, size: int = 2, heads=(NUM_HEADS, NUM_KV_HEADS)):
    """An unsharded model dressed as TP rank ``rank`` of ``size`` (what patch reads: tp_size, mesh, plan)."""
    config = tiny_config()
    config.num_attention_heads, config.num_key_value_heads = heads
    model = AutoModelForCausalLM.from_config(config).eval()
    model._tp_size = size
    model._device_mesh = types.SimpleNamespace(
        ndim=1, mesh_dim_names=None, size=lambda: size, get_local_rank=lambda: rank)
    model._tp_plan = tp_plan
    return model


SHARDED_PLAN = {f"model.layers.*.self_attn.{p}_proj": "colwise" for p in "qkv"} | {
    "model.layers.*.self_attn.o_proj": "rowwise"}


def test_plans_are_remapped_to_the_rank_slice():
    from sparseprefill.profiles import load_profile

    model = _fake_tp_model(SHARDED_PLAN, rank=1)
    sparseprefill.patch(model, ROUTING, profile=profile_dict(model.config))
    try:
        state = model._sparseprefill_state
        assert (state.tensor_parallel.size, state.tensor_parallel.rank) == (2, 1)
        assert state.head_counts == {0: (2, 1), 1: (2, 1)}
        profile = load_profile(profile_dict(model.config))
        for layer, plan in state.plans.items():
            assert sorted(h for g in plan.groups for h in g.heads) == [0, 1]
            for group in plan.groups:
                for h in group.heads:  # local head h of rank 1 is global head 2 + h
                    assert group.pattern.name.value == profile.layers[layer][2 + h].pattern.value
        assert "tensor parallel rank 1 of 2" in str(sparseprefill.stats(model))
    finally:
        sparseprefill.unpatch(model)


def test_gathered_projections_keep_global_plans():
    """Phi-3's plan gathers the fused qkv output: every rank attends all heads."""
    model = _fake_tp_model({"model.layers.*.self_attn.qkv_proj": "colwise_gather_output",
                            "model.layers.*.self_attn.o_proj": "rowwise_split_input"})
    sparseprefill.patch(model, ROUTING)
    try:
        state = model._sparseprefill_state
        assert not state.tensor_parallel.heads_sharded
        assert state.head_counts == {0: (4, 2), 1: (4, 2)}
        assert state.plans[0].groups[0].heads == (0, 1, 2, 3)
    finally:
        sparseprefill.unpatch(model)


@pytest.mark.parametrize("plan, heads, message", [
    (SHARDED_PLAN, (4, 1), "do not split evenly over tp_size=2"),
    (SHARDED_PLAN, (6, 3), "do not split evenly over tp_size=2"),
    ({"model.layers.*.self_attn.qkv_proj": "colwise"}, (4, 2), "attention projection styles"),
    (SHARDED_PLAN | {"model.layers.*.self_attn.k_proj": "colwise_gather_output"}, (4, 2),
     "attention projection styles"),
])
def test_unsupported_tp_layouts_are_refused(plan, heads, message):
    model = _fake_tp_model(plan, heads=heads)
    with pytest.raises(sparseprefill.UnsupportedModelError, match=message):
        sparseprefill.patch(model, ROUTING)
    assert not sparseprefill.is_patched(model)


if __name__ == "__main__":
    _worker(*sys.argv[1:])
