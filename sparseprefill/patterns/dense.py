"""Dense: every causal key. Used when a head is forced dense (``pattern="dense"``, a profile)."""

from __future__ import annotations

import torch

from ..config import PatternName
from ..kernels import dense_attention
from ..kernels.geometry import causal_pairs_total
from .base import PatternOutput, SparsePattern


class DensePattern(SparsePattern):
    name = PatternName.DENSE

    def estimate(self, q, k, *, scale, softcap, kv_head_index):
        return None

    def attend(self, q, k, v, index, *, scale, softcap, kv_head_index, out):
        default = torch.arange(q.shape[1], device=q.device) // max(q.shape[1] // k.shape[1], 1)
        if q.shape[1] % k.shape[1] or not torch.equal(kv_head_index, default):
            # A head subset: attend per KV head so the grouped layout of dense_attention holds.
            for kv_head in torch.unique(kv_head_index).tolist():
                heads = torch.nonzero(kv_head_index == kv_head).flatten()
                part, _ = dense_attention(q[:, heads], k[:, kv_head, None], v[:, kv_head, None], scale=scale, softcap=softcap)
                out[:, heads] = part
            return out
        dense_attention(q, k, v, scale=scale, softcap=softcap, out=out)
        return out

    def run(self, q, k, v, *, scale, softcap, kv_head_index, out) -> PatternOutput:
        self.attend(q, k, v, None, scale=scale, softcap=softcap, kv_head_index=kv_head_index, out=out)
        pairs = causal_pairs_total(q.shape[2], k.shape[2])
        return PatternOutput(torch.full(q.shape[:2], pairs, dtype=torch.int64, device=q.device), None)
