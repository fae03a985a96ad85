"""Options of top-k KV page retrieval for decode (``SparseConfig.decode``): a frozen dataclass, a ``str``
enum and their defaults, each with the reason it has that value. Re-exported by ``config``."""

from __future__ import annotations

import enum
from dataclasses import dataclass, replace
from typing import Any

from ._checks import _check_positive_int, _layer_indices

# Kernel limits and kernel-level defaults are defined where the kernels are, and only imported here.
from .kernels.decode import DEFAULT_BUDGET_TOKENS as DEFAULT_DECODE_BUDGET_TOKENS
from .kernels.decode import DEFAULT_PAGE_SIZE as DEFAULT_DECODE_PAGE_SIZE
from .kernels.decode import DEFAULT_RECENT_TOKENS as DEFAULT_DECODE_RECENT_TOKENS
from .kernels.decode import DEFAULT_SINK_TOKENS as DEFAULT_DECODE_SINK_TOKENS
from .kernels.decode import MAX_PAGE_SIZE as DECODE_MAX_PAGE_SIZE
from .kernels.decode import METHOD_MEAN_STD, METHOD_QUEST
from .kernels.decode import MIN_PAGE_SIZE as DECODE_MIN_PAGE_SIZE

__all__ = ["DecodeMethod", "DecodeRetrievalConfig", "DECODE_SHORTHAND"]


class DecodeMethod(str, enum.Enum):
    """How decode scores a KV page from its summary (``kernels/decode/scores.py``)."""

    MEAN_STD = METHOD_MEAN_STD  # q . mean + |q| . std: beats Quest's bound on modern models (notes §0.2)
    QUEST = METHOD_QUEST  # sum_d max(q_d min_d, q_d max_d): Quest's upper bound on the page's best logit


# Decode retrieval defaults (notes/topk_retrieval.md §0 and §2). The page size (16), its limits and the
# budget / sink / recent sizes are the page kernels' defaults, with their reasons, in kernels/decode.
# The first layers attend almost uniformly (no retrieval structure) and every top-k system keeps them
# dense (Quest, LServe, HiP: the first 2 layers); at 32 layers they add 2/32 of the dense KV read.
DEFAULT_DECODE_DENSE_LAYERS = (0, 1)
# Reuse one selection for this many decode steps (new tokens are always appended to it). Measured on
# SmolLM2-135M, CPU fp32, 4K natural text, budget 512, page 16, 256 greedy tokens
# (experiments/decode_accuracy.py): teacher-forced argmax agreement with dense 0.980 for both 1 and 4
# (250/255 steps), mean KL 0.0089 vs 0.0112 nats, page recall 0.905 vs 0.901, pass-key 2/2 both. On
# the GPU the selection (score + top-k, 0.155 ms of a 0.18 ms sparse step at 128K) dominates a batch-1
# step, so amortising it over 4 steps is what makes the step faster than dense (LServe/HiP reuse too).
DEFAULT_DECODE_RESELECT_EVERY = 4
# Below this cached length decode stays dense. Measured on an H200, Llama-3.1-8B shapes, budget 2048,
# selection reused for 4 steps (benchmarks/results/topk_decode_h200_timing.csv): per layer and step
# the sparse path costs 0.12-0.16 ms whatever the context (selection dominates), dense SDPA decode
# 0.050 ms at 32K and 0.137 ms at 128K at batch 1 (0.25 / 0.94 ms at batch 8). So at batch 1 retrieval
# only pays from ~128K (1.13x there, 0.40x at 32K); at batch 8 from 32K (1.86x; 5.7x at 128K).
# End to end at 32K, batch 1 it measured 0.73x (host overhead per layer on top), hence 128K.
DEFAULT_DECODE_MIN_CONTEXT = 131072
# A follow-up chunk is a question or a turn, not a document: beyond a few hundred new tokens the
# chunk's own causal block dominates and the sparse prefill patterns (which estimate from its last
# queries) are the better tool. Each 64 // G queries of a chunk get their own page selection.
DEFAULT_MAX_FOLLOW_UP_TOKENS = 256
# Shorthand accepted for ``SparseConfig(decode=...)``: the defaults above.
DECODE_SHORTHAND = "topk"


@dataclass(frozen=True)
class DecodeRetrievalConfig:
    """Top-k KV page retrieval for decode (``Lq == 1``): read only the best pages of the cache.

    Per layer, the cached keys are cut into ``page_size``-token pages with a mean/std (or min/max)
    summary each; every ``reselect_every`` decode steps each KV head scores its pages against its
    query heads' current queries and keeps the top ``budget_tokens // page_size`` pages, always
    including the pages holding the first ``sink_tokens`` and the last ``recent_tokens`` keys (tokens
    decoded since the last selection are always added). Attention is exact over the kept pages.

    Attributes:
        page_size: tokens per page (power of two in [16, 128]).
        budget_tokens: tokens (pages * page_size) attended per batch row and KV head, sink and recent
            pages included; a budget >= the context keeps everything (exactly dense).
        sink_tokens, recent_tokens: always-kept prefix and suffix of the cache.
        method: ``"mean_std"`` or ``"quest"`` page scores.
        dense_layers: layer indices that always decode dense.
        reselect_every: decode steps a selection is reused for (1 = select every step).
        min_context: cached keys below which decode stays dense.
        follow_up_chunks: also serve short prefill chunks after a cached context of at least
            ``min_context`` keys (a second question about the same document) by page retrieval,
            instead of the sparse prefill patterns. Off by default: it is an option to measure.
        max_follow_up_tokens: chunks with more new tokens than this keep the prefill patterns.
    """

    page_size: int = DEFAULT_DECODE_PAGE_SIZE
    budget_tokens: int = DEFAULT_DECODE_BUDGET_TOKENS
    sink_tokens: int = DEFAULT_DECODE_SINK_TOKENS
    recent_tokens: int = DEFAULT_DECODE_RECENT_TOKENS
    method: DecodeMethod | str = DecodeMethod.MEAN_STD
    dense_layers: tuple[int, ...] = DEFAULT_DECODE_DENSE_LAYERS
    reselect_every: int = DEFAULT_DECODE_RESELECT_EVERY
    min_context: int = DEFAULT_DECODE_MIN_CONTEXT
    follow_up_chunks: bool = False
    max_follow_up_tokens: int = DEFAULT_MAX_FOLLOW_UP_TOKENS

    def __post_init__(self) -> None:
        if not isinstance(self.follow_up_chunks, bool):
            raise TypeError(f"decode.follow_up_chunks must be a bool, got {self.follow_up_chunks!r}")
        _check_positive_int("decode.max_follow_up_tokens", self.max_follow_up_tokens)
        try:
            object.__setattr__(self, "method", DecodeMethod(self.method))
        except ValueError:
            valid = ", ".join(repr(m.value) for m in DecodeMethod)
            raise ValueError(f"unknown decode.method {self.method!r}; expected one of {valid}") from None
        _check_positive_int("decode.page_size", self.page_size)
        if (self.page_size < DECODE_MIN_PAGE_SIZE or self.page_size > DECODE_MAX_PAGE_SIZE
                or self.page_size & (self.page_size - 1)):
            raise ValueError(f"decode.page_size must be a power of two in [{DECODE_MIN_PAGE_SIZE}, "
                             f"{DECODE_MAX_PAGE_SIZE}], got {self.page_size}")
        _check_positive_int("decode.budget_tokens", self.budget_tokens)
        _check_positive_int("decode.sink_tokens", self.sink_tokens, allow_zero=True)
        _check_positive_int("decode.recent_tokens", self.recent_tokens, allow_zero=True)
        _check_positive_int("decode.reselect_every", self.reselect_every)
        _check_positive_int("decode.min_context", self.min_context, allow_zero=True)
        # The selection forces the sink pages, the recent pages (one more when the window is not page
        # aligned) and the last page; they must fit in the budget with room to spare for retrieval.
        pages = self.budget_tokens // self.page_size
        forced = -(-self.sink_tokens // self.page_size) + -(-self.recent_tokens // self.page_size) + 1
        if pages < forced:
            raise ValueError(
                f"decode.budget_tokens={self.budget_tokens} is {pages} pages of {self.page_size}, fewer than the "
                f"{forced} pages the {self.sink_tokens} sink and {self.recent_tokens} recent tokens always take")
        object.__setattr__(self, "dense_layers", _layer_indices("decode.dense_layers", self.dense_layers))

    @classmethod
    def keep_everything(cls, **overrides: Any) -> DecodeRetrievalConfig:
        """A budget far above any context and no context threshold: the sparse decode path attends every
        key (exactly dense), which proves the plumbing before proving the selection."""
        base = cls(budget_tokens=2**40, min_context=0, dense_layers=())
        return replace(base, **overrides)

    def to_dict(self) -> dict[str, Any]:
        return {"page_size": self.page_size, "budget_tokens": self.budget_tokens, "sink_tokens": self.sink_tokens,
                "recent_tokens": self.recent_tokens, "method": self.method.value,
                "dense_layers": list(self.dense_layers), "reselect_every": self.reselect_every,
                "min_context": self.min_context, "follow_up_chunks": self.follow_up_chunks,
                "max_follow_up_tokens": self.max_follow_up_tokens}
