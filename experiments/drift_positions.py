"""Where a sparse candidate's answers drift: its worst positions, and the heads that lost mass there.

On Qwen2.5-Coder-0.5B-Instruct (YaRN above 32K) over natural long text, per length and candidate
(``real_speed.py``'s named configurations): one dense cuDNN forward (the reference) and one patched
forward. For each scored position (the last ``--positions``): KL(dense || sparse) and the two arg-max
tokens. Inside the patched forward, per layer and query head, the recall of each scored row: the share
of that row's exact attention mass (on the patched forward's own q/k) that the head's selection keeps
(``kernels.recall.window_recall``; 1.0 where a head ran dense). A low-recall head at a high-KL position
is a first-order cause; a drift with every head near full recall comes from errors carried in from
earlier positions instead.

Writes, per run: ``positions.csv`` (each scored position: KL, tokens, the lowest and the mean recall over
layers and heads, the lowest-recall heads),
``heads.csv`` (per layer and head: density, mean and 5th-percentile recall over the scored rows and the
mean over the ``--worst`` positions), ``missed.csv`` (at each of the ``--worst`` positions, for its lowest-recall
heads: where the mass their blocks missed lies, by key distance, on the 8 heaviest missed keys, and on
the head's top 1% vertical columns from the last 64 queries) and ``recall.png`` (per candidate, a layer x head map of the mean
recall at the worst positions, beside the KL of every position against the mass lost there).

    python experiments/drift_positions.py --lengths 65536 --candidates antidiag_m95 antidiag_sm95 --out DIR  # GPU
    python experiments/drift_positions.py --lengths 4096 --device cpu --dtype float32 --candidates antidiag_m95 --out DIR
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

import sparseprefill
from sparseprefill.bench.common import git_commit, gpu_name, write_csv
from sparseprefill.bench.plot import pyplot, save_figure
from sparseprefill.bench.real_model import load_qwen_models, log, scored_logits
from sparseprefill.evals import offline_models
from sparseprefill.evals.logits import reference_input_ids
from sparseprefill.kernels.common import default_kv_head_index
from sparseprefill.kernels.geometry import causal_pairs_total
from sparseprefill.kernels.indices import BlockSparseIndex
from sparseprefill.kernels.recall import exact_probs, window_recall
from sparseprefill.patchers import inspect_prefill

from real_candidates import CANDIDATES  # noqa: E402  (one set of named configurations)

# Heads listed per position in positions.csv, lowest recall first.
LISTED_HEADS = 6
CONTEXT_TOKENS = 12
# What the mass a block selection missed looks like (missed.csv), per head and scored row: its share at
# each key distance (tokens before the query), on the row's 8 heaviest missed keys, and on the head's
# vertical columns (the top 1% of keys by mean exact probability over the last 64 queries: what a
# vertical-slash estimate would keep whatever the blocks).
DISTANCE_EDGES = (1024, 8192, 32768)
TOP_MISSED_KEYS = 8
VERTICAL_QUERIES = 64
VERTICAL_SHARE = 0.01
MISSED_FIELDS = ("missed", "near_1k", "1k_8k", "8k_32k", "beyond_32k", "top8_keys", "on_verticals")


def missed_mass_shape(index, q, k, rows: int, *, scale, softcap, kv_head_index) -> torch.Tensor:
    """``[H, rows, len(MISSED_FIELDS)]`` for the last ``rows`` query rows of a block-sparse selection."""
    q_len, k_len = q.shape[2], k.shape[2]
    r0 = q_len - rows
    probs = exact_probs(q, k, r0, q_len, scale=scale, softcap=softcap, kv_head_index=kv_head_index)[0]  # [H, P, Lk]
    heads = probs.shape[0]
    query_blocks = torch.arange(r0, q_len, device=q.device) // index.block_size_q
    kept_blocks = torch.zeros(heads, rows, index.num_kv_blocks + 1, dtype=torch.bool, device=q.device)
    ids = torch.where(index.slot_valid()[0][:, query_blocks], index.block_index[0][:, query_blocks].long(),
                      index.num_kv_blocks)  # padding slots land in a spare column
    kept_blocks.scatter_(-1, ids, True)
    kept = kept_blocks[..., :-1].repeat_interleave(index.block_size_k, -1)[..., :k_len]
    lost = torch.where(kept, 0.0, probs)
    total_lost = lost.sum(-1)
    denominator = total_lost.clamp_min(1e-30)
    query_pos = torch.arange(r0, q_len, device=q.device) + (k_len - q_len)
    distance = query_pos[:, None] - torch.arange(k_len, device=q.device)[None, :]  # [P, Lk]
    edges = (0, *DISTANCE_EDGES, k_len + 1)
    by_distance = [torch.where((distance >= lo) & (distance < hi), lost, 0.0).sum(-1) / denominator
                   for lo, hi in zip(edges[:-1], edges[1:])]
    top = lost.topk(min(TOP_MISSED_KEYS, k_len), dim=-1).values.sum(-1) / denominator
    column_mass = probs[:, -VERTICAL_QUERIES:].mean(1)  # [H, Lk]
    n_columns = max(1, int(VERTICAL_SHARE * k_len))
    columns = column_mass.topk(n_columns, dim=-1).indices
    on_columns = torch.gather(lost, -1, columns[:, None, :].expand(-1, rows, -1)).sum(-1) / denominator
    return torch.stack([total_lost, *by_distance, top, on_columns], -1)


class RowRecall:
    """The inspector: ``recall[layer] [H, P]`` for the last ``P`` query rows, ``density[layer] [H]``."""

    def __init__(self, rows: int):
        self.rows = rows
        self.recall: dict[int, torch.Tensor] = {}
        self.density: dict[int, torch.Tensor] = {}
        self.missed: dict[int, torch.Tensor] = {}  # [H, P, len(MISSED_FIELDS)]

    def __call__(self, layer, q, k, v, out, selections, *, scale, softcap) -> None:
        hq, q_len, k_len = q.shape[1], q.shape[2], k.shape[2]
        kv_of_head = default_kv_head_index(hq, k.shape[1], q.device)
        recall = torch.ones(hq, self.rows)
        density = torch.ones(hq)
        missed = torch.full((hq, self.rows, len(MISSED_FIELDS)), float("nan"))
        for heads, index in selections:
            if index is None:
                continue
            head_ids = torch.tensor(heads, device=q.device)
            (rows,) = window_recall([index], q[:, head_ids], k, q_len - self.rows, q_len, scale=scale,
                                    softcap=softcap, kv_head_index=kv_of_head[head_ids])
            recall[list(heads)] = rows[0].float().cpu()
            density[list(heads)] = (index.computed_pairs()[0].float() / causal_pairs_total(q_len, k_len)).cpu()
            if isinstance(index, BlockSparseIndex):
                missed[list(heads)] = missed_mass_shape(index, q[:, head_ids], k, self.rows, scale=scale, softcap=softcap,
                                                        kv_head_index=kv_of_head[head_ids]).cpu()
        self.recall[layer] = recall
        self.density[layer] = density
        self.missed[layer] = missed


def position_kl(reference: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
    """KL(reference || logits) per position of ``[1, P, V]`` logits: ``[P]``."""
    ref = torch.log_softmax(reference[0].float(), -1)
    got = torch.log_softmax(logits[0].float(), -1)
    return (ref.exp() * (ref - got)).sum(-1)


def study(model, tok, ids, reference, length: int, name: str, args, gpu: str):
    """One candidate at one length against ``reference``, the dense logits of the scored positions."""
    positions = args.positions
    probe = RowRecall(positions + 1)
    sparseprefill.patch(model, CANDIDATES[name])
    try:
        with inspect_prefill(model, probe):
            logits = scored_logits(model, ids, positions)[:, :-1]
    finally:
        sparseprefill.unpatch(model)
    kl = position_kl(reference, logits).cpu()
    dense_top, sparse_top = reference[0].argmax(-1).cpu(), logits[0].argmax(-1).cpu()
    layers = sorted(probe.recall)
    # The logits at scored position j come from query row L - positions - 1 + j: rows [:-1] of the probe.
    recall = torch.stack([probe.recall[layer][:, :-1] for layer in layers])  # [layers, H, P]
    density = torch.stack([probe.density[layer] for layer in layers])  # [layers, H]
    worst = kl.argsort(descending=True)[: args.worst]
    position_rows = []
    for j in range(positions):
        flat = recall[:, :, j].flatten()
        order = flat.argsort()[:LISTED_HEADS]
        heads = " ".join(f"L{int(i) // recall.shape[1]}H{int(i) % recall.shape[1]}:{float(flat[i]):.3f}" for i in order)
        row = length - positions - 1 + j
        position_rows.append(dict(
            length=length, candidate=name, position=row, kl=float(kl[j]), top1_agrees=bool(dense_top[j] == sparse_top[j]),
            dense_token=tok.decode([int(dense_top[j])]), sparse_token=tok.decode([int(sparse_top[j])]),
            context=tok.decode(ids[0, max(row - CONTEXT_TOKENS, 0): row + 1].tolist()),
            min_recall=float(flat.min()), mean_lost=float(1 - flat.mean()), lowest_heads=heads, gpu=gpu, commit=args.commit))
    head_rows = []
    for li, layer in enumerate(layers):
        for head in range(recall.shape[1]):
            rows = recall[li, head]
            head_rows.append(dict(
                length=length, candidate=name, layer=layer, head=head, density=float(density[li, head]),
                recall_mean=float(rows.mean()), recall_p5=float(rows.quantile(0.05)),
                recall_at_worst=float(rows[worst].mean()), gpu=gpu, commit=args.commit))
    top1 = float((dense_top == sparse_top).float().mean())
    log(f"{length} {name}: top-1 {top1:.4f}, KL mean {float(kl.mean()):.4f} max {float(kl.max()):.3f}; worst positions "
        + ", ".join(f"{length - positions - 1 + int(j)} (KL {float(kl[j]):.2f}, min recall {float(recall[:, :, j].min()):.3f})"
                    for j in worst[:4]))
    missed = torch.stack([probe.missed[layer][:, :-1] for layer in layers])  # [layers, H, P, fields]
    missed_rows = []
    for j in worst.tolist():
        flat = recall[:, :, j].flatten()
        for i in flat.argsort()[:LISTED_HEADS].tolist():
            layer, head = divmod(i, recall.shape[1])
            missed_rows.append(dict(length=length, candidate=name, position=length - positions - 1 + j, kl=float(kl[j]),
                                    layer=layers[layer], head=head, recall=float(flat[i]),
                                    **{field: float(v) for field, v in zip(MISSED_FIELDS, missed[layer, head, j])},
                                    gpu=gpu, commit=args.commit))
    return position_rows, head_rows, missed_rows, dict(kl=kl, recall=recall, worst=worst, name=name, length=length)


def plot(panels, path: Path) -> Path:
    plt = pyplot()
    fig, axes = plt.subplots(len(panels), 2, figsize=(12, 3.6 * len(panels)), squeeze=False)
    for (heat, scatter), panel in zip(axes, panels):
        at_worst = panel["recall"][:, :, panel["worst"]].mean(-1)
        image = heat.imshow(at_worst.numpy(), aspect="auto", vmin=0.5, vmax=1.0, cmap="viridis")
        heat.set(title=f"{panel['name']} at {panel['length'] // 1024}K: recall at the {len(panel['worst'])} worst positions",
                 xlabel="query head", ylabel="layer")
        fig.colorbar(image, ax=heat)
        lost = 1 - panel["recall"].flatten(0, 1).mean(0)
        scatter.scatter(lost.numpy(), panel["kl"].numpy(), s=6)
        scatter.set(yscale="log", xlabel="exact mass lost at the position, mean over layers and heads",
                    ylabel="KL(dense || sparse)", title="every scored position")
    return save_figure(fig, path)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--lengths", type=int, nargs="+", default=[65536])
    ap.add_argument("--candidates", nargs="+", default=["antidiag_m95"], choices=list(CANDIDATES))
    ap.add_argument("--positions", type=int, default=512, help="scored positions at the end of the prompt")
    ap.add_argument("--worst", type=int, default=16, help="positions of highest KL the head summary averages over")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    ap.add_argument("--gguf", help="a carried GGUF file to install into the cache first")
    ap.add_argument("--metadata", help="tokenizer/config folder from offline_models.export_metadata")
    ap.add_argument("--out", default=".cache/drift_positions")
    args = ap.parse_args(argv)
    top = offline_models.QWEN_CODER.long_context_positions
    if any(n < 2 * args.positions or n > top for n in args.lengths):
        ap.error(f"lengths must lie in [{2 * args.positions}, {top}]")
    if not 0 < args.worst <= args.positions:
        ap.error(f"--worst must lie in [1, --positions], got {args.worst}")
    args.commit = git_commit()
    gpu = gpu_name(args.device) if args.device == "cuda" else "cpu"
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    models = load_qwen_models(args.lengths, device=args.device, dtype=args.dtype, gguf=args.gguf, metadata=args.metadata)
    position_rows, head_rows, missed_rows, panels = [], [], [], []
    for length in args.lengths:
        model, tok = models[length > offline_models.QWEN_NATIVE_CONTEXT]
        ids = reference_input_ids(tok, length).to(args.device)
        reference = scored_logits(model, ids, args.positions)[:, :-1]
        for name in args.candidates:
            positions, heads, missed, panel = study(model, tok, ids, reference, length, name, args, gpu)
            position_rows += positions
            head_rows += heads
            missed_rows += missed
            panels.append(panel)
            write_csv(out_dir / "positions.csv", list(position_rows[0]), position_rows)
            write_csv(out_dir / "heads.csv", list(head_rows[0]), head_rows)
            if missed_rows:
                write_csv(out_dir / "missed.csv", list(missed_rows[0]), missed_rows)
    print(plot(panels, out_dir / "recall.png"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
