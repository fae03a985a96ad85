"""Profile a model's heads offline, then patch it with the profile.

Runs offline on a CPU with SmolLM2-135M-Instruct (from a PyPI wheel). Profiling measures, for every
head, the attention-mass recall of each candidate pattern/budget against exact attention on
calibration prompts, and keeps the cheapest one that reaches the target recall.

    python examples/profile_then_patch.py            # ~2-4 minutes on 2 CPU cores

The same from the command line:

    sparseprefill profile smollm2 --lengths 1024 2048 --samples 1 --out my_profile.json --plot my_profile.png
"""

import torch

import sparseprefill
from sparseprefill.evals.offline_models import load_smollm2
from sparseprefill.evals.passkey import build_passkey_prompt
from sparseprefill.profiles import save_profile
from sparseprefill.calibrate.profiler import ProfilerOptions, profile_model

model, tokenizer = load_smollm2(dtype=torch.float32)

# 1. Profile (short lengths keep the example quick; real profiles use the lengths you will serve).
options = ProfilerOptions(lengths=(1024, 2048), samples=1, target_recall=0.95)
result = profile_model(model, tokenizer, options)
print(result.summary_table())
save_profile(result.profile, "smollm2_profile.json")

# 2. Patch with it. min_sparse_len=0 makes this short prompt take the sparse path.
sparseprefill.patch(model, sparseprefill.SparseConfig(min_sparse_len=0), profile="smollm2_profile.json")
prompt = build_passkey_prompt(tokenizer, 2048, depth=0.3, seed=7)
inputs = tokenizer(prompt.text, return_tensors="pt")
with torch.inference_mode():
    output = model.generate(**inputs, max_new_tokens=8, do_sample=False)
answer = tokenizer.decode(output[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True)
print(f"pass key {prompt.key}: answered {answer!r} ({'found' if prompt.key in answer else 'missed'})")
print(sparseprefill.stats(model))
