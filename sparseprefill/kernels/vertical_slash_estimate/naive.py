"""MInference's last-queries estimate: softmax of the last ``n`` queries against every key, summed
down columns (verticals) and along diagonals (slashes)."""

from __future__ import annotations

import torch

from ..common import qk_scores
from ..geometry import query_offset


def vertical_slash_scores_naive(
    q: torch.Tensor,
    k: torch.Tensor,
    *,
    scale: float,
    last_queries: int,
    softcap: float | None,
    kv_head_index: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:
    q_len, k_len = q.shape[2], k.shape[2]
    n = min(last_queries, q_len)
    scores = qk_scores(q[:, :, q_len - n :], k, kv_head_index, scale)
    if softcap is not None:
        scores = softcap * torch.tanh(scores / softcap)
    q_pos = torch.arange(q_len - n, q_len, device=q.device) + query_offset(q_len, k_len)
    k_pos = torch.arange(k_len, device=q.device)
    causal = k_pos[None, :] <= q_pos[:, None]
    probs = torch.softmax(scores.masked_fill(~causal, float("-inf")), dim=-1)
    vertical = probs.sum(dim=-2) / n
    # Diagonal d holds pairs (p, p - d); masked entries are exact zeros, so clamping their d is harmless.
    diag = (q_pos[:, None] - k_pos[None, :]).clamp_(0, k_len - 1)
    slash = torch.zeros_like(probs).scatter_add_(-1, diag.expand_as(probs), probs).sum(dim=-2) / n
    return vertical, slash
