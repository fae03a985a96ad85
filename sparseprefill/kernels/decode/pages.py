"""Per-page key summaries of a KV cache, for top-k page retrieval during decode (Quest / LServe style).

Layout: keys ``k [B, Hkv, L, D]`` (the HF cache layout) are cut into pages of ``page_size`` tokens;
page ``p`` covers key positions ``[p * P, (p + 1) * P)``, the last page may be partial (only its
valid tokens enter its statistics). Per page and channel the summary holds

    minimum, maximum   the Quest corner statistics (exact: they are elements of ``k``)
    mean, std          the page centroid and the per-channel population standard deviation

each ``[B, Hkv, capacity_pages, D]`` with ``capacity_pages >= num_pages = ceil(L / P)``. Only the first
``num_pages`` pages are meaningful; the extra capacity lets decode appends grow the summary without
reallocating every step.

Incremental update: after keys ``[start, L)`` were written, only pages ``start // P .. ceil(L / P) - 1``
are recomputed (each from its own keys, so the result equals a full rebuild exactly), so a decode step
costs O(new pages) = one page.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch

from .naive import page_summary_naive

__all__ = [
    "DEFAULT_PAGE_SIZE",
    "STATS_MINMAX",
    "STATS_MEAN_STD",
    "PageSummary",
    "check_page_size",
    "page_summary",
    "update_page_summary",
    "page_summary_naive",
]

# 16 tokens: Quest's page and LServe's logical page. Summaries then cost 2 vectors per 16 keys (1/16 of
# the K+V bytes), and 2048 budget tokens are 128 independently chosen pages; 32/64 halve/quarter the
# metadata at a coarser selection.
DEFAULT_PAGE_SIZE = 16
# Page sizes the GPU kernels take: a power of two (tile shapes) and >= 16 (``tl.dot`` needs 16 rows).
MIN_PAGE_SIZE = 16
MAX_PAGE_SIZE = 128

STATS_MINMAX = "minmax"
STATS_MEAN_STD = "mean_std"
ALL_STATS = (STATS_MINMAX, STATS_MEAN_STD)
# Growth factor of the summary buffers when appended keys need more pages than their capacity:
# geometric growth keeps the copy cost amortised O(1) per decode step.
CAPACITY_GROWTH = 2


def check_page_size(page_size: int) -> None:
    if (not isinstance(page_size, int) or page_size < MIN_PAGE_SIZE or page_size > MAX_PAGE_SIZE
            or page_size & (page_size - 1)):
        raise ValueError(f"page_size must be a power of two in [{MIN_PAGE_SIZE}, {MAX_PAGE_SIZE}], got {page_size}")


def num_pages_for(num_tokens: int, page_size: int) -> int:
    return -(-num_tokens // page_size)


@dataclass(frozen=True)
class PageSummary:
    """Per-page statistics of the first ``num_tokens`` keys; see the module docstring for the layout.

    ``minimum``/``maximum`` are None unless ``"minmax"`` was requested, ``mean``/``std`` unless
    ``"mean_std"`` was. Tensors are ``[B, Hkv, capacity_pages, D]`` and may be updated in place by
    ``update_page_summary`` (which returns a new ``PageSummary`` with the new ``num_tokens``).
    """

    page_size: int
    num_tokens: int
    minimum: torch.Tensor | None
    maximum: torch.Tensor | None
    mean: torch.Tensor | None
    std: torch.Tensor | None

    @property
    def num_pages(self) -> int:
        return num_pages_for(self.num_tokens, self.page_size)

    @property
    def tensors(self) -> tuple[torch.Tensor, ...]:
        return tuple(t for t in (self.minimum, self.maximum, self.mean, self.std) if t is not None)

    @property
    def capacity_pages(self) -> int:
        return self.tensors[0].shape[2]

    @property
    def stats(self) -> tuple[str, ...]:
        return tuple(s for s, t in ((STATS_MINMAX, self.minimum), (STATS_MEAN_STD, self.mean)) if t is not None)

    def valid(self) -> "PageSummary":
        """The same summary with every tensor sliced to its ``num_pages`` valid pages (views)."""
        n = self.num_pages
        cut = lambda t: None if t is None else t[:, :, :n]  # noqa: E731
        return replace(self, minimum=cut(self.minimum), maximum=cut(self.maximum), mean=cut(self.mean),
                       std=cut(self.std))


def _check_keys(k: torch.Tensor) -> None:
    if k.ndim != 4:
        raise ValueError(f"k must be [B, Hkv, L, D], got shape {tuple(k.shape)}")
    if k.dtype not in (torch.float16, torch.bfloat16, torch.float32):
        raise TypeError(f"k dtype {k.dtype} unsupported")


def _compute(k: torch.Tensor, summary: PageSummary, first_page: int) -> None:
    """Recompute pages ``first_page .. ceil(L / P) - 1`` of ``summary``'s buffers from ``k`` in place."""
    last_page = num_pages_for(k.shape[2], summary.page_size)
    if last_page <= first_page:
        return
    args = (k, summary.page_size, first_page, last_page, summary.minimum, summary.maximum, summary.mean, summary.std)
    if k.device.type == "cuda":
        # Imported here so the CPU path never needs Triton; on CUDA it is a dependency, not an option.
        from .triton_summary import page_summary_triton

        page_summary_triton(*args)
    else:
        page_summary_naive(*args)


def _allocate(k: torch.Tensor, capacity: int, stats: tuple[str, ...], dtype: torch.dtype) -> dict:
    b, h, _, d = k.shape
    make = lambda: torch.empty(b, h, capacity, d, dtype=dtype, device=k.device)  # noqa: E731
    minmax, meanstd = STATS_MINMAX in stats, STATS_MEAN_STD in stats
    return dict(minimum=make() if minmax else None, maximum=make() if minmax else None,
                mean=make() if meanstd else None, std=make() if meanstd else None)


def page_summary(
    k: torch.Tensor,
    *,
    page_size: int = DEFAULT_PAGE_SIZE,
    stats: tuple[str, ...] = ALL_STATS,
    dtype: torch.dtype | None = None,
    capacity_pages: int | None = None,
) -> PageSummary:
    """Build the page summaries of all keys ``k [B, Hkv, L, D]`` (bulk build at the end of prefill).

    Args:
        page_size: tokens per page (power of two in [16, 128]).
        stats: which statistics to keep: ``"minmax"`` (Quest) and/or ``"mean_std"``.
        dtype: storage dtype of the summaries; default ``k.dtype`` (min/max stay exact, mean/std are
            computed in fp32 and rounded once).
        capacity_pages: allocate room for this many pages (>= ``ceil(L / P)``); default exactly that.

    Returns:
        ``PageSummary`` with ``num_tokens = L``.
    """
    _check_keys(k)
    check_page_size(page_size)
    stats = tuple(stats)
    if not stats or any(s not in ALL_STATS for s in stats):
        raise ValueError(f"stats must be a non-empty subset of {ALL_STATS}, got {stats}")
    n = num_pages_for(k.shape[2], page_size)
    capacity = n if capacity_pages is None else capacity_pages
    if capacity < n:
        raise ValueError(f"capacity_pages={capacity} < {n} pages needed for {k.shape[2]} keys")
    summary = PageSummary(page_size, k.shape[2], **_allocate(k, max(capacity, 1), stats, dtype or k.dtype))
    _compute(k, summary, 0)
    return summary


def update_page_summary(summary: PageSummary, k: torch.Tensor, *, start: int | None = None) -> PageSummary:
    """Bring ``summary`` up to date after keys ``[start, L)`` of ``k [B, Hkv, L, D]`` were written.

    Recomputes only pages ``start // P`` to ``ceil(L / P) - 1`` (the partial page that received keys and
    the new ones), in place when the buffers have room; otherwise the buffers grow geometrically (the old
    pages are copied once). ``start`` defaults to ``summary.num_tokens`` (an append) and may be smaller
    (keys rewritten) but not larger (keys in between would be missing).

    Returns:
        a ``PageSummary`` with ``num_tokens = L`` (sharing the buffers when they did not grow).
    """
    _check_keys(k)
    start = summary.num_tokens if start is None else start
    if not 0 <= start <= summary.num_tokens:
        raise ValueError(f"start={start} must be in [0, {summary.num_tokens}] (the summarised prefix)")
    if k.shape[2] < start:
        raise ValueError(f"k has {k.shape[2]} keys < start={start}")
    ref = summary.tensors[0]
    if k.shape[:2] != ref.shape[:2] or k.shape[3] != ref.shape[3] or k.device != ref.device:
        raise ValueError(f"k {tuple(k.shape)} on {k.device} does not match the summary {tuple(ref.shape)} on {ref.device}")
    needed = num_pages_for(k.shape[2], summary.page_size)
    if needed > summary.capacity_pages:
        capacity = max(needed, CAPACITY_GROWTH * summary.capacity_pages)
        grown = _allocate(k, capacity, summary.stats, ref.dtype)
        keep = summary.num_pages
        for name, t in grown.items():
            if t is not None:
                t[:, :, :keep] = getattr(summary, name)[:, :, :keep]
        summary = replace(summary, **grown)
    summary = replace(summary, num_tokens=k.shape[2])
    _compute(k, summary, start // summary.page_size)
    return summary
