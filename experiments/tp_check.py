"""A patched model under transformers tensor parallelism computes what it computes on one GPU.

Run under torchrun; every rank runs this file:

    torchrun --nproc-per-node 2 experiments/tp_check.py --length 16384 --out results/     # 2 GPUs (NCCL)
    torchrun --nproc-per-node 2 experiments/tp_check.py --dry-run --out /tmp/tp            # CPU, gloo, tiny

Rank 0 builds a random-weight Llama-3.1-8B-shaped model (32 query / 8 KV heads of 128, hidden 4096,
fewer layers; no hub) and saves it to a temporary folder. Rank 0 then loads it unsharded on one
device, and every rank loads it with the model's TP plan (``tp_plan="auto"``: each rank holds a
contiguous slice of heads). The last-position logits of one long prompt are compared:

- TP unpatched vs single unpatched: the reference difference (bf16 partial sums all-reduced);
- TP patched vs single patched, for ``auto`` (``SparseConfig(min_sparse_len=0)``) and for a per-head
  profile that gives neighbouring heads different patterns (so each rank must apply the settings of
  its own global heads);
- TP patched vs TP unpatched: what sparsity costs, for context.

Plus warm prefill times (TTFT: one forward with a fresh cache, median of ``--repeats``, the slowest
rank per repeat) for TP unpatched vs TP patched, and single-device ones for context. Writes
``tp_check.json`` and ``tp_check.csv`` (timings) into ``--out``.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import shutil
import statistics
import tempfile
import time
from pathlib import Path

import torch
import torch.distributed as dist
from transformers import AutoModelForCausalLM, LlamaConfig

import sparseprefill
from sparseprefill import SparseConfig
from sparseprefill.evals.logits import compare_logits
from sparseprefill.patchers.tensor_parallel import tp_load_kwargs
from sparseprefill.evals.random_models import save_peaked_llama  # q/k scaled up: patterns find structure
from sparseprefill.profiles import PROFILE_FORMAT, PROFILE_VERSION, model_identity

# Llama-3.1-8B's attention and MLP shapes with fewer layers and a smaller vocabulary (the logits we
# compare are the last positions only, so vocabulary size adds nothing but load time).
GPU_SHAPE = dict(hidden_size=4096, intermediate_size=14336, num_attention_heads=32, num_key_value_heads=8,
                 head_dim=128, vocab_size=32000, max_position_embeddings=131072, rope_theta=500000.0)
# --dry-run: the same code path on CPU in seconds (GQA 4:1 as above).
DRY_SHAPE = dict(hidden_size=128, intermediate_size=256, num_attention_heads=8, num_key_value_heads=2,
                 head_dim=16, vocab_size=512, max_position_embeddings=4096)
SCORED_POSITIONS = 64


def _head_setting(layer: int, head: int, length: int) -> dict:
    """Cycle five settings over (layer + head): the two ranks' halves of a layer get different mixes,
    so a rank applying local head numbers as global ones would run other heads' patterns."""
    choice = (layer + head) % 5
    if choice == 0:
        return {"pattern": "vertical_slash", "vertical_mass": 0.9, "slash_mass": 0.9}
    if choice == 1:
        return {"pattern": "block_sparse", "mass": 0.9}
    if choice == 2:
        return {"pattern": "a_shape", "sink_tokens": 64, "local_tokens": max(64, length // 8)}
    if choice == 3:
        return {"pattern": "antidiagonal", "mass": 0.9}
    return {"pattern": "dense"}


def heterogeneous_profile(config: LlamaConfig, length: int) -> dict:
    """A profile (``sparseprefill.load_profile`` dict) with per-head settings; nothing measured."""
    return {
        "format": PROFILE_FORMAT, "version": PROFILE_VERSION, "model": model_identity(config).to_dict(),
        "calibration": {"source": "experiments/tp_check.py (synthetic)", "lengths": [length], "samples": 0,
                        "objective": "attention_mass_recall", "target": 0.9, "tool_version": "0",
                        "date": time.strftime("%Y-%m-%d")},
        "layers": [[_head_setting(layer, head, length) for head in range(config.num_attention_heads)]
                   for layer in range(config.num_hidden_layers)],
    }


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@torch.inference_mode()
def _logits(model, ids: torch.Tensor, device: torch.device) -> torch.Tensor:
    return model(input_ids=ids.to(device), use_cache=False, logits_to_keep=SCORED_POSITIONS).logits.float().cpu()


@torch.inference_mode()
def _ttft_ms(model, ids: torch.Tensor, device: torch.device, repeats: int, distributed: bool) -> list[float]:
    """Warm prefill times: one untimed forward (Triton compiles, allocator warms), then ``repeats``
    timed ones with a fresh cache each; under TP every rank starts together and a repeat takes as
    long as its slowest rank."""
    ids = ids.to(device)
    model(input_ids=ids, use_cache=True, logits_to_keep=1)
    times = []
    for _ in range(repeats):
        _sync(device)
        if distributed:
            dist.barrier()
        start = time.perf_counter()
        model(input_ids=ids, use_cache=True, logits_to_keep=1)
        _sync(device)
        elapsed = torch.tensor([(time.perf_counter() - start) * 1000.0], device=device)
        if distributed:
            dist.all_reduce(elapsed, op=dist.ReduceOp.MAX)
        times.append(float(elapsed))
    return times


def _variants(config_profile: dict) -> dict:
    """name -> (SparseConfig or None for unpatched, profile or None)."""
    return {"dense": (None, None), "auto": (SparseConfig(min_sparse_len=0), None),
            "profile": (SparseConfig(min_sparse_len=0), config_profile)}


def _run_all(model, ids, device, variants, repeats: int, distributed: bool) -> dict:
    """Logits, TTFT and stats of every variant on one model."""
    out = {}
    for name, (config, profile) in variants.items():
        if config is not None:
            sparseprefill.patch(model, config, profile=profile)
        try:
            logits = _logits(model, ids, device)
            stats = None
            if config is not None:  # of the scored forward alone (the counters keep counting while timed)
                s = sparseprefill.stats(model)
                stats = {"density": s.density, "tp_size": s.tp_size, "tp_rank": s.tp_rank,
                         "phases": dict(s.phases), "fallbacks": dict(s.fallbacks)}
            times = _ttft_ms(model, ids, device, repeats, distributed)
        finally:
            if config is not None:
                sparseprefill.unpatch(model)
        out[name] = {"logits": logits, "ttft_ms": times, "stats": stats}
    return out


def _comparison(reference: torch.Tensor, other: torch.Tensor) -> dict:
    return compare_logits(reference, other).to_dict() | {
        "max_abs_logit_diff": float((reference - other).abs().max()),
        "relative_error": float((reference - other).norm() / reference.norm()),
    }


def _init_distributed(dry_run: bool) -> tuple[int, int, torch.device]:
    """One process group for the script and transformers (which reuses an initialized one)."""
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    if dry_run:
        dist.init_process_group("gloo", rank=rank, world_size=world)
        return rank, world, torch.device("cpu")
    local_rank = int(os.environ["LOCAL_RANK"])
    device = torch.device("cuda", local_rank)
    torch.cuda.set_device(device)
    dist.init_process_group("nccl", rank=rank, world_size=world, device_id=device)
    return rank, world, device


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--length", type=int, default=None, help="prompt tokens (default 16384; 512 with --dry-run)")
    parser.add_argument("--layers", type=int, default=None, help="decoder layers (default 4; 2 with --dry-run)")
    parser.add_argument("--repeats", type=int, default=5, help="timed prefills per variant (median reported)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"),
                        help="float32 (default) for the equality check; bfloat16 for realistic timings")
    parser.add_argument("--out", default=None, help="folder for tp_check.json / tp_check.csv")
    parser.add_argument("--dry-run", action="store_true",
                        help="CPU + gloo, tiny fp32 model: checks the code path, not GPU numbers")
    args = parser.parse_args(argv)
    args.length = args.length or (512 if args.dry_run else 16384)
    args.layers = args.layers or (2 if args.dry_run else 4)
    if args.dry_run:
        args.repeats = min(args.repeats, 2)
    return args


def main(argv=None) -> None:
    args = parse_args(argv)
    if "RANK" not in os.environ:
        raise SystemExit("run under torchrun: torchrun --nproc-per-node 2 experiments/tp_check.py ...")
    rank, world, device = _init_distributed(args.dry_run)
    shape = DRY_SHAPE if args.dry_run else GPU_SHAPE
    dtype = torch.float32 if args.dry_run else getattr(torch, args.dtype)
    if dtype == torch.float32:
        # fp32 compares the head mapping, not bf16 reduction order: random peaked models amplify a
        # last-bit difference (a different all-reduce order under TP) into O(1) logit changes.
        torch.backends.cuda.matmul.allow_tf32 = False
        torch.backends.cudnn.allow_tf32 = False
    start = time.perf_counter()

    # Rank 0 builds and saves; the others learn the folder and wait for the files.
    folder = [tempfile.mkdtemp(prefix="tp_check_") if rank == 0 else None]
    dist.broadcast_object_list(folder, src=0)
    folder = Path(folder[0])
    try:
        if rank == 0:
            save_peaked_llama(folder, dict(shape, num_hidden_layers=args.layers), dtype, args.seed)
        dist.barrier()
        config = LlamaConfig.from_pretrained(folder)
        variants = _variants(heterogeneous_profile(config, args.length))
        ids = torch.randint(3, shape["vocab_size"], (1, args.length), generator=torch.Generator().manual_seed(1))

        single = None
        if rank == 0:  # one device, no TP (the others wait at the barrier)
            model = AutoModelForCausalLM.from_pretrained(folder, dtype=dtype).to(device).eval()
            single = _run_all(model, ids, device, variants, args.repeats, distributed=False)
            del model
            if device.type == "cuda":
                torch.cuda.empty_cache()
        dist.barrier()

        model = AutoModelForCausalLM.from_pretrained(folder, dtype=dtype, **tp_load_kwargs()).eval()
        if getattr(model, "tp_size", None) != world:
            raise RuntimeError(f"expected a TP model of size {world}, got tp_size={getattr(model, 'tp_size', None)}")
        tp = _run_all(model, ids, device, variants, args.repeats, distributed=True)
        # Logits are replicated on every rank; stats are per rank (each rank counts its own heads).
        stats_by_rank = [None] * world
        dist.all_gather_object(stats_by_rank, {name: run["stats"] for name, run in tp.items()})
    finally:  # every rank has loaded by the all_gather above (or one failed and torchrun stops them all)
        if rank == 0:
            shutil.rmtree(folder, ignore_errors=True)

    if rank == 0:
        report = {
            "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu (dry run)",
            "world_size": world, "length": args.length, "layers": args.layers, "dtype": str(dtype),
            "shape": shape, "transformers": __import__("transformers").__version__, "torch": torch.__version__,
            "comparisons": {
                "tp dense vs single dense (reference)": _comparison(single["dense"]["logits"], tp["dense"]["logits"]),
                "tp auto vs single auto": _comparison(single["auto"]["logits"], tp["auto"]["logits"]),
                "tp profile vs single profile": _comparison(single["profile"]["logits"], tp["profile"]["logits"]),
                "tp auto vs tp dense": _comparison(tp["dense"]["logits"], tp["auto"]["logits"]),
                "tp profile vs tp dense": _comparison(tp["dense"]["logits"], tp["profile"]["logits"]),
            },
            "ttft_ms_median": {
                f"{where} {name}": statistics.median(runs[name]["ttft_ms"])
                for where, runs in (("tp", tp), ("single", single)) for name in variants
            },
            "stats": {"single": {name: run["stats"] for name, run in single.items()}, "tp_by_rank": stats_by_rank},
            "seconds": round(time.perf_counter() - start, 1),
        }
        dense_ms = report["ttft_ms_median"]["tp dense"]
        report["tp_speedup_vs_tp_dense"] = {name: dense_ms / report["ttft_ms_median"][f"tp {name}"]
                                            for name in variants if name != "dense"}
        print(json.dumps(report, indent=1))
        if args.out:
            out = Path(args.out)
            out.mkdir(parents=True, exist_ok=True)
            (out / "tp_check.json").write_text(json.dumps(report, indent=1) + "\n")
            with open(out / "tp_check.csv", "w", newline="") as f:
                writer = csv.writer(f)
                writer.writerow(["setup", "variant", "length", "repeat", "ttft_ms"])
                for where, runs in (("tp", tp), ("single", single)):
                    for name in variants:
                        for i, ms in enumerate(runs[name]["ttft_ms"]):
                            writer.writerow([where, name, args.length, i, round(ms, 3)])
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
