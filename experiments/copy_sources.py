"""Is the mass the antidiagonal estimate misses on copy sources? (CPU, fp32, Qwen2.5-Coder-0.5B.)

For the rows of the last 512 positions whose kept blocks (antidiagonal, mass 0.95) hold less than 0.7 of
the exact mass, take each row's 8 heaviest missed keys ``j`` and count how many tokens before ``j``
repeat the tokens ending at the query ``i`` (``ids[j-1-m] == ids[i-m]``): an induction or copy head's
source is the token after an earlier occurrence of the current n-gram. Prints the missed mass by that
match length, beside the same for the rows' 8 heaviest keys overall.

    python experiments/copy_sources.py 8192     # about 10 minutes on 2 cores

Stop 33, at 8K: 92.7% of the missed top-8 mass lies on keys with no match (93.4% of all top-8 mass),
4.4% on one matching token, 2.6% on two or more: the misses are not copy sources, so a token n-gram
prior would not recover them.
"""
import sys, time, torch
from collections import Counter
from sparseprefill.evals import offline_models
from sparseprefill.evals.logits import reference_input_ids
from sparseprefill.bench.real_model import capture_layers
from sparseprefill.config import AntidiagonalConfig
from sparseprefill.patterns import AntidiagonalPattern
from sparseprefill.kernels.recall import exact_probs
from sparseprefill.kernels.common import default_kv_head_index

L = int(sys.argv[1]) if len(sys.argv) > 1 else 8192
ROWS = 512
torch.set_num_threads(2)
model, tok = offline_models.load_qwen_coder(dtype=torch.float32)
ids = reference_input_ids(tok, L)
t = time.time()
caps = capture_layers(model, ids)
print("captured", time.time() - t, flush=True)
toks = ids[0].tolist()

def match_len(i, j):
    """tokens ids[j-1], ids[j-2], ... equal ids[i], ids[i-1], ...: how many (j is the token after a repeat)."""
    m = 0
    while j - 1 - m >= 0 and i - m >= 0 and toks[j - 1 - m] == toks[i - m] and m < 64:
        m += 1
    return m

pattern = AntidiagonalPattern(AntidiagonalConfig(mass=0.95))
hist_missed = Counter(); hist_all = Counter(); tot_missed = 0.0; tot_all = 0.0
lost_rows = 0
for layer, (q, k, v, scale) in sorted(caps.items()):
    hq, hkv = q.shape[1], k.shape[1]
    kvh = default_kv_head_index(hq, hkv, q.device)
    index = pattern.estimate(q, k, scale=scale, softcap=None, kv_head_index=kvh)
    b_, h_, rq, _ = index.block_index.shape
    blocks = torch.zeros(b_, h_, rq, index.num_kv_blocks, dtype=torch.int32)
    slots = torch.where(index.slot_valid(), index.block_index.long(), 0)
    blocks.scatter_add_(-1, slots, index.slot_valid().to(torch.int32))
    mask = blocks > 0
    probs = exact_probs(q, k, L - ROWS, L, scale=scale, softcap=None, kv_head_index=kvh)[0]  # [H, R, L]
    rows = torch.arange(L - ROWS, L) // index.block_size_q
    keymask = mask[0][:, rows].repeat_interleave(index.block_size_k, dim=-1)[..., :L]  # [H, R, L]
    missed = probs * (~keymask)
    recall = 1 - missed.sum(-1)
    for h in range(hq):
        for r in (recall[h] < 0.7).nonzero().flatten().tolist():
            lost_rows += 1
            i = L - ROWS + r
            vals, keys = missed[h, r].topk(8)
            for val, j in zip(vals.tolist(), keys.tolist()):
                m = min(match_len(i, j), 8)
                hist_missed[m] += val; tot_missed += val
            pv, pk = probs[h, r].topk(8)
            for val, j in zip(pv.tolist(), pk.tolist()):
                m = min(match_len(i, j), 8)
                hist_all[m] += val; tot_all += val
    print(f"layer {layer}: rows with recall < 0.7: {int((recall < 0.7).sum())}", flush=True)
print("lost rows", lost_rows)
print("missed top-8 mass by suffix-match length (ids[j-1-m..j-1] == ids[i-m..i]):")
for m in range(9):
    print(m, round(hist_missed[m] / max(tot_missed, 1e-9), 3), " (top-8 of lost rows, all mass:", round(hist_all[m] / max(tot_all, 1e-9), 3), ")")
