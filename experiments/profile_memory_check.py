"""The profiler on the GPU at long lengths: time and peak memory on a random-weight model with
Llama-3.1-8B attention shapes (32 query / 8 KV heads, head_dim 128), 2 layers, bf16.

Weights are random, so the chosen patterns mean nothing; the point is that recall is measured
blockwise (memory bounded by the chunk, not by L x L: at 32K one head's full attention matrix alone
would be 4 GiB in fp32) and that every step runs on CUDA.

    python experiments/profile_memory_check.py --lengths 16384 32768
"""

from __future__ import annotations

import argparse
import time

import torch
from transformers import AutoModelForCausalLM, LlamaConfig

from sparseprefill.calibrate.profiler import ProfilerOptions, profile_model

VOCAB = 512


class ByteTokenizer:
    def __call__(self, text):
        return {"input_ids": [1 + ord(c) % (VOCAB - 1) for c in text]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--lengths", type=int, nargs="+", default=[16384, 32768])
    args = parser.parse_args()
    config = LlamaConfig(vocab_size=VOCAB, hidden_size=4096, intermediate_size=1024, num_hidden_layers=2,
                         num_attention_heads=32, num_key_value_heads=8, max_position_embeddings=max(args.lengths) * 2)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16).cuda().eval()
    weights = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    result = profile_model(model, ByteTokenizer(), ProfilerOptions(lengths=tuple(args.lengths), samples=1))
    seconds = time.perf_counter() - start
    peak = torch.cuda.max_memory_allocated() - weights
    print(result.summary_table())
    print(f"lengths {args.lengths}: profiled in {seconds:.1f} s on {torch.cuda.get_device_name()}, "
          f"peak memory above the weights {peak / 2**30:.2f} GiB "
          f"(one head's fp32 L x L at {max(args.lengths)}: {max(args.lengths) ** 2 * 4 / 2**30:.1f} GiB)")


if __name__ == "__main__":
    main()
