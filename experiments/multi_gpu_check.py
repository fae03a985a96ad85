"""A patched model split across GPUs with ``device_map="auto"`` computes what it computes on one device.

Builds a random-weight Llama-shaped model (no hub), saves it, loads it once on a single device and
once split across every visible GPU (``max_memory`` forces a split even when one GPU would hold it),
then compares the last-position logits of a long prompt:

- unpatched split vs unpatched single: the reference difference (bf16 reductions on other devices);
- patched with ``SparseConfig.keep_everything()`` split vs unpatched split: the sparse path must equal
  dense up to kernel rounding;
- patched ``auto`` split vs patched ``auto`` single: the dynamic estimate must not depend on where
  the layers live.

    python experiments/multi_gpu_check.py --length 16384 --out results/     # on a 2-GPU machine
    python experiments/multi_gpu_check.py --device cpu --length 512          # the code path, on a CPU
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM

import sparseprefill
from sparseprefill import SparseConfig
from sparseprefill.evals.logits import compare_logits
# Peaked attention (random q/k projections scaled up), so `auto` has structure to find.
from sparseprefill.evals.random_models import save_peaked_llama

# Big enough that attention is real work and layers spread over devices, small enough to build fast.
MODEL_SHAPE = dict(hidden_size=1024, intermediate_size=2816, num_hidden_layers=8, num_attention_heads=16,
                   num_key_value_heads=4, head_dim=64, vocab_size=32000, max_position_embeddings=131072)
SCORED_POSITIONS = 64
# fp32 (no TF32): the comparisons test where layers run and which heads get which pattern, not bf16
# rounding, which a random peaked model amplifies into O(1) logit changes over its layers.
DTYPE = torch.float32


def _load(folder: Path, device: str, split: bool):
    if split:
        gpus = torch.cuda.device_count()
        size = sum(p.numel() * p.element_size() for p in AutoModelForCausalLM.from_pretrained(
            folder, dtype=DTYPE).parameters())
        per_gpu = int(size * 1.2 / gpus) + (64 << 20)  # 60% of the weights per GPU (of 2): forces a split
        max_memory = {i: per_gpu for i in range(gpus)} | {"cpu": 0}
        return AutoModelForCausalLM.from_pretrained(folder, dtype=DTYPE, device_map="auto",
                                                    max_memory=max_memory).eval()
    return AutoModelForCausalLM.from_pretrained(folder, dtype=DTYPE).to(device).eval()


@torch.inference_mode()
def _logits(model, ids):
    first = next(model.parameters()).device
    return model(input_ids=ids.to(first), use_cache=False, logits_to_keep=SCORED_POSITIONS).logits.float().cpu()


def _relative(a: torch.Tensor, b: torch.Tensor) -> float:
    """||a - b|| / ||b|| over the scored logits: random models have tiny top-1 margins, so argmax flips
    say little; the relative error is the stable measure."""
    return float((a - b).norm() / b.norm())


def _run(model, ids, config):
    if config is None:
        return _logits(model, ids), None
    sparseprefill.patch(model, config)
    try:
        return _logits(model, ids), sparseprefill.stats(model).density
    finally:
        sparseprefill.unpatch(model)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--length", type=int, default=16384)
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    split = args.device == "cuda" and torch.cuda.device_count() > 1
    ids = torch.randint(3, MODEL_SHAPE["vocab_size"], (1, args.length), generator=torch.Generator().manual_seed(1))
    auto = SparseConfig(min_sparse_len=0)
    exact = SparseConfig.keep_everything()
    rows = {}
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        save_peaked_llama(folder, MODEL_SHAPE, DTYPE, args.seed)
        start = time.perf_counter()
        single = _load(folder, args.device if args.device != "cuda" else "cuda:0", split=False)
        single_dense, _ = _run(single, ids, None)
        single_auto, single_auto_density = _run(single, ids, auto)
        del single
        torch.cuda.empty_cache() if torch.cuda.is_available() else None
        many = _load(folder, args.device, split=split)
        devices = sorted({str(p.device) for p in many.parameters()})
        many_dense, _ = _run(many, ids, None)
        many_exact, exact_density = _run(many, ids, exact)
        many_auto, many_auto_density = _run(many, ids, auto)
        rows = {
            "devices": devices,
            "length": args.length,
            "dense split vs dense single": compare_logits(single_dense, many_dense).to_dict(),
            "keep_everything split vs dense split": compare_logits(many_dense, many_exact).to_dict()
            | {"density": exact_density},
            "auto split vs auto single": compare_logits(single_auto, many_auto).to_dict()
            | {"density_split": many_auto_density, "density_single": single_auto_density},
            "auto split vs dense split": compare_logits(many_dense, many_auto).to_dict(),
            "relative logit error": {
                "dense split vs dense single (reference)": _relative(many_dense, single_dense),
                "keep_everything split vs dense split": _relative(many_exact, many_dense),
                "auto split vs auto single": _relative(many_auto, single_auto),
                "auto split vs dense split": _relative(many_auto, many_dense),
            },
            "seconds": round(time.perf_counter() - start, 1),
        }
    print(json.dumps(rows, indent=1))
    if args.out:
        Path(args.out).mkdir(parents=True, exist_ok=True)
        (Path(args.out) / "multi_gpu_check.json").write_text(json.dumps(rows, indent=1) + "\n")


if __name__ == "__main__":
    main()
