"""Long-context perplexity, dense vs sparse, with logits computed a chunk of positions at a time.

One forward of the decoder over the whole window (that is what the sparse prefill changes), then
the LM head runs over ``LOGIT_CHUNK`` positions at a time: full-window logits would be
``L x vocab`` floats (8 GB in fp32 for Gemma 3's 262K vocabulary at 8K tokens).

Only the window's tail is scored (positions with at least ``context_fraction`` of the window before
them, by default the second half): early positions see short contexts that both paths compute
almost exactly, and averaging them in would dilute the long-context difference being measured.
The per-window score is the mean negative log-likelihood (nats per token); perplexity is its exp.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import torch

from .report import EvalReport, SampleScore, Variant, applied, run_metadata

__all__ = ["LOGIT_CHUNK", "PerplexityOptions", "chunked_nll", "text_windows", "load_text", "run_perplexity"]

# Positions per LM-head chunk: 1024 x 262K vocab x 4 bytes = 1 GB at most in fp32.
LOGIT_CHUNK = 1024
DEFAULT_WINDOWS = 8
DEFAULT_CONTEXT_FRACTION = 0.5
BUILTIN_TEXT = "builtin"  # the Python reference manual (sparseprefill.evals.logits.reference_text), always offline


@dataclass(frozen=True)
class PerplexityOptions:
    """Attributes:
        lengths: window lengths in tokens.
        windows: windows per length (consecutive, non-overlapping, from the start of the text).
        text: ``builtin``, a prepared haystack source (``paul_graham``, ``austen``) or a text file path.
        context_fraction: score positions whose context is at least this share of the window.
    """

    lengths: tuple[int, ...] = (4096,)
    windows: int = DEFAULT_WINDOWS
    text: str = BUILTIN_TEXT
    context_fraction: float = DEFAULT_CONTEXT_FRACTION

    def __post_init__(self) -> None:
        if not self.lengths or min(self.lengths) < 2:
            raise ValueError(f"lengths must be >= 2 tokens, got {self.lengths}")
        if self.windows < 1:
            raise ValueError("windows must be >= 1")
        if not 0.0 <= self.context_fraction < 1.0:
            raise ValueError(f"context_fraction must be in [0, 1), got {self.context_fraction}")


def load_text(source: str) -> str:
    """The text named by ``source``: ``builtin``, a prepared haystack source, or a file path."""
    if source == BUILTIN_TEXT:
        from .logits import reference_text

        return reference_text()
    path = Path(source).expanduser()
    if path.is_file():
        return path.read_text(encoding="utf-8")
    from .data import HaystackSource, haystack_text

    known = [s.value for s in HaystackSource]
    if source in known:
        return haystack_text(source)
    raise ValueError(f"text {source!r} is not a file, {BUILTIN_TEXT!r}, or a prepared source ({', '.join(known)})")


def text_windows(tokenizer: Any, text: str, length: int, count: int) -> list[torch.Tensor]:
    """``count`` consecutive windows of ``length`` tokens ([1, length] int64 each)."""
    needed = length * count
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    if len(ids) < needed:
        raise ValueError(f"the text has {len(ids)} tokens; {count} windows of {length} need {needed}. Use fewer "
                         "windows or a longer text (--text FILE, or 'austen' after sparseprefill prepare-data)")
    return [torch.tensor([ids[i * length : (i + 1) * length]]) for i in range(count)]


def _output_logits(model: Any, hidden: torch.Tensor) -> torch.Tensor:
    logits = model.get_output_embeddings()(hidden).float()
    cap = getattr(model.config, "final_logit_softcapping", None)
    if cap:
        logits = cap * torch.tanh(logits / cap)
    return logits


@torch.inference_mode()
def chunked_nll(model: Any, input_ids: torch.Tensor, first_scored: int = 0, chunk: int = LOGIT_CHUNK) -> torch.Tensor:
    """Negative log-likelihood of tokens ``first_scored + 1 .. L - 1`` of ``input_ids [1, L]``.

    Returns ``[L - 1 - first_scored]`` fp32: entry ``i`` is ``-log p(x[t+1] | x[:t+1])`` for
    ``t = first_scored + i``. The decoder runs once; the LM head runs ``chunk`` positions at a time.
    """
    device = next(model.parameters()).device
    ids = input_ids.to(device)
    hidden = model.get_decoder()(input_ids=ids, use_cache=False).last_hidden_state
    targets = ids[0, 1:]
    losses = []
    for start in range(first_scored, ids.shape[1] - 1, chunk):
        stop = min(start + chunk, ids.shape[1] - 1)
        logits = _output_logits(model, hidden[0, start:stop])
        losses.append(torch.nn.functional.cross_entropy(logits, targets[start:stop], reduction="none"))
    return torch.cat(losses).cpu()


def run_perplexity(
    model: Any,
    tokenizer: Any,
    variants: Sequence[Variant],
    options: PerplexityOptions = PerplexityOptions(),
    *,
    model_name: str = "model",
    progress: bool = True,
) -> EvalReport:
    """Per-window mean NLL of every variant (dense first) on the same windows."""
    from tqdm.auto import tqdm

    start = time.perf_counter()
    text = load_text(options.text)
    windows = {length: text_windows(tokenizer, text, length, options.windows) for length in options.lengths}
    scores: list[SampleScore] = []
    with tqdm(total=len(variants) * options.windows * len(options.lengths), desc="perplexity", unit="window",
              disable=not progress) as bar:
        for variant in variants:
            with applied(model, variant) as meter:
                for length, items in windows.items():
                    first = int(length * options.context_fraction)
                    for index, ids in enumerate(items):
                        meter.reset()
                        nll = chunked_nll(model, ids, first_scored=first)
                        density, _ = meter.read()
                        mean = float(nll.mean())
                        scores.append(SampleScore(task="ppl", length=length, index=index, variant=variant.name,
                                                  score=mean, density=density,
                                                  extra={"perplexity": float(torch.exp(nll.mean())),
                                                         "scored_tokens": int(nll.numel())}))
                        bar.update(1)
    meta = run_metadata(model) | {
        "seconds": round(time.perf_counter() - start, 1),
        "perplexity": {"text": options.text, "lengths": list(options.lengths), "windows": options.windows,
                       "context_fraction": options.context_fraction, "logit_chunk": LOGIT_CHUNK},
    }
    return EvalReport(kind="ppl", model=model_name, variants=list(variants), samples=scores,
                      metric="NLL (nats/token; perplexity = exp)", higher_is_better=False, meta=meta)
