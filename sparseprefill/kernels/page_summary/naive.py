"""fp32 reference for the page summaries; also the CPU implementation."""

from __future__ import annotations

import torch


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
