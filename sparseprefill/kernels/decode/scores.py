"""Page scoring and top-k page selection for decode (Quest / LServe / mean+std style).

Scoring (``page_scores``): for each decode query row, a logit estimate per page from its summary,

    "quest":    sum_d max(q_d * min_d, q_d * max_d)          an upper bound on max_{k in page} q . k
    "mean_std": q . mean + c * |q| . std                      centre plus a spread radius

times the softmax ``scale``. Each row's estimates are softmax-normalised over the pages (so rows with
large logits cannot drown the others), then the ``G * T`` rows of a KV group (its ``G`` query heads and
``T`` decode queries) are combined into one score per (batch, KV head, page): ``"max"`` (default,
``log max_r p_r``: a page needed by any one head survives) or ``"sum"`` (``log sum_r p_r``: the group's
total estimated mass). One selection is shared by the group, so the sparse kernel reads each selected
K/V page once for all of its query heads.

Selection (``select_pages``, plain torch, no host sync): a fixed budget of ``budget_tokens // P``
pages per (batch, KV head); the sink pages (covering the first ``sink_tokens``) and the recent pages
(covering the last ``recent_tokens`` and always the last, possibly partial, page) are forced in and
count against the budget; the rest of the budget is the top-k of the other pages by score. Output
(the ``PageList`` contract read by ``sparse_decode_attention``):

    page_index [B, Hkv, W] int32   selected page ids, sorted ascending, unique; slots >= count are -1
    page_count [B, Hkv]    int32   number of valid slots (W = budget pages, fixed, CUDA-graph friendly)

When the cache has no more pages than the budget, every page is selected (dense identity path).
"""

from __future__ import annotations

import torch

from .naive import (
    METHOD_MEAN_STD,
    METHOD_QUEST,
    REDUCE_MAX,
    REDUCE_SUM,
    PageRecall,
    attention_mass_recall,
    exact_page_mass,
    page_scores_naive,
)
from .pages import (
    STATS_MEAN_STD,
    STATS_MINMAX,
    PageSummary,
    check_page_size,
    num_pages_for,
)

__all__ = [
    "DEFAULT_METHOD",
    "DEFAULT_SPREAD_WEIGHT",
    "DEFAULT_GROUP_REDUCE",
    "DEFAULT_BUDGET_TOKENS",
    "DEFAULT_SINK_TOKENS",
    "DEFAULT_RECENT_TOKENS",
    "METHOD_QUEST",
    "METHOD_MEAN_STD",
    "REDUCE_MAX",
    "REDUCE_SUM",
    "STATS_FOR_METHOD",
    "PageRecall",
    "attention_mass_recall",
    "exact_page_mass",
    "page_scores",
    "page_scores_naive",
    "select_pages",
    "top_k_pages",
]

# Mean+std beats the min/max corner bound on modern models at the same metadata size (notes §0, §3.12).
DEFAULT_METHOD = METHOD_MEAN_STD
# c in q . mean + c * |q| . std. Two limits bracket it: a page whose keys sit at the mean except one
# outlier k* has |q| . std ~= |q . (k* - mean)| / sqrt(P - 1), so a needle is recovered at c ~ sqrt(P - 1)
# (~4 for P = 16); for Gaussian pages |q| . std over-estimates the spread of q . k by ~sqrt(2 D / pi),
# asking for c < 1. Measured (sparseprefill bench decode, structured keys, 32K, budget 2048, P 16/32/64):
# mean recall vs the exact top-k was best at c = 0.5-1 (0.69-0.71; Quest 0.65-0.68), c = 2 and 4 lost
# 0.02-0.09. c = 1 keeps the better tail (p5/min) of the two at P = 32/64. Re-tune on real activations.
DEFAULT_SPREAD_WEIGHT = 1.0
# Max of per-head softmax-normalised scores (notes §5): no head's needle is drowned by another head's scale.
DEFAULT_GROUP_REDUCE = REDUCE_MAX
# 2048 tokens: the budget at which Quest reports near-dense accuracy at 32K-128K (notes §3.1, §6.7).
DEFAULT_BUDGET_TOKENS = 2048
# Attention sinks sit in the first few tokens; 64 tokens (4 pages of 16) keeps them at every page size.
DEFAULT_SINK_TOKENS = 64
# The local window most heads attend to; notes §6.7 suggest 256-512 at 128K.
DEFAULT_RECENT_TOKENS = 256

METHODS = (METHOD_QUEST, METHOD_MEAN_STD)
# The summary statistics each scoring method reads.
STATS_FOR_METHOD = {METHOD_QUEST: (STATS_MINMAX,), METHOD_MEAN_STD: (STATS_MEAN_STD,)}
REDUCES = (REDUCE_MAX, REDUCE_SUM)


def _summary_pair(summary: PageSummary, method: str) -> tuple[torch.Tensor, torch.Tensor]:
    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}")
    valid = summary.valid()
    first, second = (valid.minimum, valid.maximum) if method == METHOD_QUEST else (valid.mean, valid.std)
    if first is None:
        raise ValueError(f"method {method!r} needs the summary's {'minmax' if method == METHOD_QUEST else 'mean_std'} stats")
    return first, second


def page_scores(
    q: torch.Tensor,
    summary: PageSummary,
    *,
    scale: float,
    method: str = DEFAULT_METHOD,
    spread_weight: float = DEFAULT_SPREAD_WEIGHT,
    group_reduce: str = DEFAULT_GROUP_REDUCE,
) -> torch.Tensor:
    """Score the summary's pages for decode queries ``q [B, Hq, T, D]`` (``Hq = G * Hkv``, head ``h``
    reads KV head ``h // G``).

    Returns:
        ``[B, Hkv, num_pages]`` fp32: natural log of the group-combined page probability (each row's
        page logits softmax-normalised over the pages, then max or sum over the group's rows).
    """
    first, second = _summary_pair(summary, method)
    if group_reduce not in REDUCES:
        raise ValueError(f"group_reduce must be one of {REDUCES}, got {group_reduce!r}")
    if q.ndim != 4 or q.shape[0] != first.shape[0] or q.shape[3] != first.shape[3]:
        raise ValueError(f"q {tuple(q.shape)} does not match the summary {tuple(first.shape)} ([B, Hkv, N, D])")
    if q.shape[1] % first.shape[1]:
        raise ValueError(f"query heads ({q.shape[1]}) must be a multiple of KV heads ({first.shape[1]})")
    if summary.num_pages == 0:
        raise ValueError("the summary covers no keys")
    kwargs = dict(scale=scale, method=method, spread_weight=spread_weight, group_reduce=group_reduce)
    if q.device.type == "cuda":
        # Imported here so the CPU path never needs Triton; on CUDA it is a dependency, not an option.
        from .triton_score import page_scores_triton

        return page_scores_triton(q, first, second, **kwargs)
    return page_scores_naive(q, first, second, **kwargs)


def forced_pages(num_tokens: int, page_size: int, sink_tokens: int, recent_tokens: int,
                 device: torch.device | str = "cpu") -> torch.Tensor:
    """``[num_pages]`` bool: the sink pages (covering keys ``< sink_tokens``) and the recent pages
    (covering keys ``>= num_tokens - recent_tokens``, and always the last page)."""
    n = num_pages_for(num_tokens, page_size)
    pages = torch.arange(n, device=device)
    first_recent = min(max(num_tokens - recent_tokens, 0) // page_size, n - 1)
    return (pages * page_size < sink_tokens) | (pages >= first_recent)


def budget_pages_for(page_size: int, budget_tokens: int, sink_tokens: int, recent_tokens: int) -> int:
    """Pages per (batch, KV head) for ``budget_tokens``; checks the forced pages fit (a recent window
    not aligned to pages spans one page more than ``ceil(recent / P)``)."""
    budget = budget_tokens // page_size
    forced = -(-sink_tokens // page_size) + -(-recent_tokens // page_size) + 1
    if budget < forced:
        raise ValueError(f"budget of {budget_tokens} tokens = {budget} pages of {page_size} cannot hold the "
                         f"{forced} sink/recent pages ({sink_tokens} sink, {recent_tokens} recent tokens)")
    return budget


def select_pages(
    scores: torch.Tensor,
    *,
    num_tokens: int,
    page_size: int,
    budget_tokens: int = DEFAULT_BUDGET_TOKENS,
    sink_tokens: int = DEFAULT_SINK_TOKENS,
    recent_tokens: int = DEFAULT_RECENT_TOKENS,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-k page selection (see the module docstring for the budget and output contract).

    Args:
        scores: ``[B, Hkv, >= num_pages]`` (higher is better; only the first ``num_pages`` are read).
        num_tokens: cached keys ``L`` (``num_pages = ceil(L / P)``).

    Returns:
        ``(page_index [B, Hkv, W] int32, page_count [B, Hkv] int32)``, ``W = budget_tokens // P``.
    """
    check_page_size(page_size)
    width = budget_pages_for(page_size, budget_tokens, sink_tokens, recent_tokens)
    n = num_pages_for(num_tokens, page_size)
    if scores.ndim != 3 or scores.shape[-1] < n:
        raise ValueError(f"scores must be [B, Hkv, >= {n}], got {tuple(scores.shape)}")
    b, h = scores.shape[:2]
    device = scores.device
    if n <= width:
        slots = torch.arange(width, device=device, dtype=torch.int32)
        index = torch.where(slots < n, slots, -1).expand(b, h, width).contiguous()
        return index, torch.full((b, h), n, dtype=torch.int32, device=device)
    # The forced pages are a prefix (sink) and a suffix (recent + last page) of the page range, so the
    # top-k runs on the middle slice alone: no mask over all pages, no fp32 copy, and the result is the
    # sorted concatenation sink < sorted(middle top-k) < recent (fewer launches per decode step).
    sink_pages = -(-sink_tokens // page_size)
    first_recent = min(max(num_tokens - recent_tokens, 0) // page_size, n - 1)
    free = width - sink_pages - (n - first_recent)
    if sink_pages > first_recent or free < 0 or free > first_recent - sink_pages:
        # Overlapping sink and recent windows (cannot happen when n > width and the budget holds the forced
        # pages; kept as the general definition): fp32 scores with the forced pages at +inf.
        forced = forced_pages(num_tokens, page_size, sink_tokens, recent_tokens, device)
        ranked = scores[..., :n].float().masked_fill(forced, float("inf"))
        top = torch.topk(ranked, width, dim=-1, sorted=False).indices
        index = torch.sort(top, dim=-1).values.to(torch.int32)
        return index, torch.full((b, h), width, dtype=torch.int32, device=device)
    middle = torch.topk(scores[..., sink_pages:first_recent], free, dim=-1, sorted=False).indices
    middle = torch.sort(middle, dim=-1).values + sink_pages
    ends = torch.cat([torch.arange(sink_pages, device=device), torch.arange(first_recent, n, device=device)])
    index = torch.cat([ends[:sink_pages].expand(b, h, -1), middle, ends[sink_pages:].expand(b, h, -1)], dim=-1)
    return index.to(torch.int32), torch.full((b, h), width, dtype=torch.int32, device=device)


def top_k_pages(
    q: torch.Tensor,
    summary: PageSummary,
    *,
    scale: float,
    method: str = DEFAULT_METHOD,
    spread_weight: float = DEFAULT_SPREAD_WEIGHT,
    group_reduce: str = DEFAULT_GROUP_REDUCE,
    budget_tokens: int = DEFAULT_BUDGET_TOKENS,
    sink_tokens: int = DEFAULT_SINK_TOKENS,
    recent_tokens: int = DEFAULT_RECENT_TOKENS,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``page_scores`` then ``select_pages``; skips scoring when every page fits the budget."""
    page_size = summary.page_size
    width = budget_pages_for(page_size, budget_tokens, sink_tokens, recent_tokens)
    if summary.num_pages <= width:
        scores = torch.zeros(q.shape[0], summary.tensors[0].shape[1], summary.num_pages, device=q.device)
    else:
        scores = page_scores(q, summary, scale=scale, method=method, spread_weight=spread_weight,
                             group_reduce=group_reduce)
    return select_pages(scores, num_tokens=summary.num_tokens, page_size=page_size, budget_tokens=budget_tokens,
                        sink_tokens=sink_tokens, recent_tokens=recent_tokens)
