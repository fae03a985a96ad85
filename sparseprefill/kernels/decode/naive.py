"""fp32 references of the decode kernels (also their CPU implementation): per-page key summaries,
page scores and top-k page selection, the exact attention-mass oracle for accuracy reports, and
attention over the listed pages.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..common import attend_gathered, default_kv_head_index, qk_scores

# fp32 reference for the page summaries; also the CPU implementation.

def page_summary_naive(
    k: torch.Tensor,
    page_size: int,
    first_page: int,
    last_page: int,
    minimum: torch.Tensor | None,
    maximum: torch.Tensor | None,
    mean: torch.Tensor | None,
    std: torch.Tensor | None,
) -> None:
    """Write pages ``[first_page, last_page)`` of the summary buffers (``[B, Hkv, capacity, D]``) from
    ``k [B, Hkv, L, D]``; statistics over each page's valid keys (``< L``) only, computed in fp32."""
    b, h, length, d = k.shape
    p = page_size
    n = last_page - first_page
    keys = k[:, :, first_page * p: min(last_page * p, length)].float()
    pad = n * p - keys.shape[2]
    keys = torch.nn.functional.pad(keys, (0, 0, 0, pad)).view(b, h, n, p, d)
    valid = (torch.arange(n * p, device=k.device) + first_page * p < length).view(1, 1, n, p, 1)
    count = valid.sum(3).clamp_min(1).float()  # [1, 1, n, 1]
    if minimum is not None:
        minimum[:, :, first_page:last_page] = keys.masked_fill(~valid, float("inf")).amin(3).to(minimum.dtype)
        maximum[:, :, first_page:last_page] = keys.masked_fill(~valid, float("-inf")).amax(3).to(maximum.dtype)
    if mean is not None:
        mu = (keys * valid).sum(3) / count
        var = (((keys - mu[:, :, :, None]) * valid) ** 2).sum(3) / count
        mean[:, :, first_page:last_page] = mu.to(mean.dtype)
        std[:, :, first_page:last_page] = var.sqrt().to(std.dtype)


# fp32 references for page scoring, plus the exact attention-mass oracle used for accuracy reports.
# 
# Rows: a KV head's group is its ``G = Hq / Hkv`` query heads (head ``h`` reads KV head ``h // G``) times
# the ``T`` decode queries; row ``r = g * T + t`` is query head ``h_kv * G + g`` at query ``t``.

METHOD_QUEST = "quest"
METHOD_MEAN_STD = "mean_std"
REDUCE_MAX = "max"
REDUCE_SUM = "sum"


def page_logits_naive(
    q: torch.Tensor,
    first: torch.Tensor,
    second: torch.Tensor,
    *,
    scale: float,
    method: str,
    spread_weight: float,
) -> torch.Tensor:
    """Per-row page logit estimates ``[B, Hkv, G * T, N]`` fp32 (natural scale, times ``scale``).

    ``first, second [B, Hkv, N, D]``: (min, max) for ``"quest"`` -> ``sum_d max(q_d min_d, q_d max_d)``;
    (mean, std) for ``"mean_std"`` -> ``q . mean + spread_weight * |q| . std``.
    """
    b, hq, t, d = q.shape
    hkv = first.shape[1]
    rows = q.float().reshape(b, hkv, (hq // hkv) * t, d)
    a, s = first.float(), second.float()
    if method == METHOD_QUEST:
        logits = torch.maximum(rows[:, :, :, None, :] * a[:, :, None], rows[:, :, :, None, :] * s[:, :, None]).sum(-1)
    elif method == METHOD_MEAN_STD:
        logits = rows @ a.transpose(-1, -2) + spread_weight * (rows.abs() @ s.transpose(-1, -2))
    else:
        raise ValueError(f"unknown method {method!r}")
    return logits * scale


def page_scores_naive(
    q: torch.Tensor,
    first: torch.Tensor,
    second: torch.Tensor,
    *,
    scale: float,
    method: str,
    spread_weight: float,
    group_reduce: str,
) -> torch.Tensor:
    """``[B, Hkv, N]`` fp32: log of the group-combined page probability. Each row's page logits are
    softmax-normalised over the N pages, then combined over the ``G * T`` rows of the KV group by max
    (``log max_r p_r``) or sum (``log sum_r p_r``)."""
    logp = torch.log_softmax(page_logits_naive(q, first, second, scale=scale, method=method,
                                               spread_weight=spread_weight), dim=-1)
    if group_reduce == REDUCE_MAX:
        return logp.amax(2)
    if group_reduce == REDUCE_SUM:
        return torch.logsumexp(logp, 2)
    raise ValueError(f"unknown group_reduce {group_reduce!r}")


@dataclass(frozen=True)
class PageRecall:
    """Exact attention mass (fp32 softmax over all ``L`` keys) per query head and decode query,
    ``[B, Hq, T]`` each: captured by the selected pages, and by the oracle page set of the same size.

    The oracle for a (batch, KV head) takes the ``count`` pages with the largest exact mass summed over
    the group's rows (the best set one shared selection per KV head can have for the group's total
    mass); ``recall = selected_mass / oracle_mass``.
    """

    selected_mass: torch.Tensor
    oracle_mass: torch.Tensor

    @property
    def recall(self) -> torch.Tensor:
        return self.selected_mass / self.oracle_mass.clamp_min(torch.finfo(torch.float32).tiny)


def exact_page_mass(q: torch.Tensor, k: torch.Tensor, *, page_size: int, scale: float) -> torch.Tensor:
    """``[B, Hq, T, N]`` fp32: exact softmax mass of each page for each query head and decode query
    (query ``t`` at key position ``L - T + t``, causal)."""
    b, hq, t, _ = q.shape
    hkv, length = k.shape[1], k.shape[2]
    kv_head_index = default_kv_head_index(hq, hkv, q.device)
    scores = qk_scores(q, k, kv_head_index, scale)
    q_pos = torch.arange(t, device=q.device) + length - t
    future = torch.arange(length, device=q.device)[None, :] > q_pos[:, None]
    probs = torch.softmax(scores.masked_fill(future, float("-inf")), dim=-1)
    n = -(-length // page_size)
    probs = torch.nn.functional.pad(probs, (0, n * page_size - length))
    return probs.view(b, hq, t, n, page_size).sum(-1)


def selected_mask(page_index: torch.Tensor, page_count: torch.Tensor, num_pages: int) -> torch.Tensor:
    """``[B, Hkv, N]`` bool from a page list (slots ``>= count`` ignored)."""
    slots = torch.arange(page_index.shape[-1], device=page_index.device)
    ok = slots < page_count[..., None]
    ids = torch.where(ok, page_index.long(), num_pages)
    mask = torch.zeros(*page_index.shape[:2], num_pages + 1, dtype=torch.bool, device=page_index.device)
    mask.scatter_(-1, ids, True)
    return mask[..., :num_pages]


def attention_mass_recall(
    q: torch.Tensor,
    k: torch.Tensor,
    page_index: torch.Tensor,
    page_count: torch.Tensor,
    *,
    page_size: int,
    scale: float,
) -> PageRecall:
    """Attention-mass recall of a page selection ``page_index [B, Hkv, W]`` / ``page_count [B, Hkv]``
    for decode queries ``q [B, Hq, T, D]`` against keys ``k [B, Hkv, L, D]`` (fp32, exact)."""
    b, hq, t, _ = q.shape
    hkv = k.shape[1]
    page_index, page_count = page_index.to(q.device), page_count.to(q.device)
    mass = exact_page_mass(q, k, page_size=page_size, scale=scale)
    n = mass.shape[-1]
    kv_head_index = default_kv_head_index(hq, hkv, q.device)
    chosen = selected_mask(page_index, page_count, n)[:, kv_head_index, None, :]  # [B, Hq, 1, N]
    selected = (mass * chosen).sum(-1)
    group_mass = mass.reshape(b, hkv, (hq // hkv) * t, n).sum(2)
    width = int(page_count.max()) if page_count.numel() else 0
    width = min(max(width, 1), n)
    top = group_mass.topk(width, dim=-1).indices
    top = torch.where(torch.arange(width, device=q.device) < page_count[..., None], top, -1)
    oracle_count = torch.clamp(page_count, max=n)
    oracle = selected_mask(top.to(torch.int32), oracle_count, n)[:, kv_head_index, None, :]
    return PageRecall(selected_mass=selected, oracle_mass=(mass * oracle).sum(-1))


# fp32 reference for sparse decode attention; also the CPU implementation. Gathers the listed pages'
# keys of each query head's KV head and runs an exact softmax over them.

def page_key_positions(page_index: torch.Tensor, page_count: torch.Tensor, page_size: int,
                       k_len: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``[B, Hkv, W * P]`` key positions of the listed pages and their validity (slot < count, key < L)."""
    within = torch.arange(page_size, device=page_index.device)
    positions = (page_index.long()[..., None] * page_size + within).flatten(-2)
    slots = torch.arange(page_index.shape[-1], device=page_index.device)
    listed = (slots < page_count[..., None].long()) & (page_index >= 0)
    valid = (listed[..., None] & (positions.view(*page_index.shape, page_size) < k_len)).flatten(-2)
    return positions, valid


def sparse_decode_attention_naive(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    page_index: torch.Tensor | None,
    page_count: torch.Tensor | None,
    *,
    page_size: int,
    scale: float,
    softcap: float | None,
    out: torch.Tensor,
) -> torch.Tensor:
    """Reference of ``sparse_decode_attention``: ``q [B, Hq, T, D]``, ``k, v [B, Hkv, L, D]``, optional
    ``page_index [B, Hkv, W]`` / ``page_count [B, Hkv]`` (None: every key) -> ``out [B, Hq, T, D]``."""
    b, hq, t, _ = q.shape
    hkv, k_len = k.shape[1], k.shape[2]
    kv_head_index = default_kv_head_index(hq, hkv, q.device)
    if page_index is None:
        positions = torch.arange(k_len, device=q.device).expand(b, hq, k_len)
        valid = torch.ones(b, hq, k_len, dtype=torch.bool, device=q.device)
    else:
        positions, valid = page_key_positions(page_index, page_count, page_size, k_len)
        positions, valid = positions[:, kv_head_index], valid[:, kv_head_index]
    q_positions = torch.arange(t, device=q.device) + k_len - t
    result = attend_gathered(q, k, v, positions, valid, q_positions, kv_head_index, scale, None, softcap)
    out.copy_(result.to(out.dtype))
    return out
