"""Dense: every causal key. Used when a head is forced dense (``pattern="dense"``, a profile,
``SparseConfig.dense_layers``); on the GPU it runs SDPA (``fast_dense_attention``), as unpatched."""

from __future__ import annotations

import torch

from ..config import PatternName
from ..kernels import fast_dense_attention
from ..kernels.geometry import causal_pairs_total
from .base import PatternOutput, SparsePattern, attend_heads_dense
from .compiled import register_pattern, run_pattern_op


class DensePattern(SparsePattern):
    name = PatternName.DENSE
    returns_index = False

    def __init__(self):
        # What torch.compile passes to the op that runs this pattern whole (``compiled.py``): a head subset
        # is attended per KV head, which reads the head map on the host.
        self.op_key = register_pattern(self)

    def estimate(self, q, k, *, scale, softcap, kv_head_index):
        return None

    def attend(self, q, k, v, index, *, scale, softcap, kv_head_index, out):
        default = torch.arange(q.shape[1], device=q.device) // max(q.shape[1] // k.shape[1], 1)
        if q.shape[1] % k.shape[1] or not torch.equal(kv_head_index, default):
            # A head subset: attend per KV head so the grouped layout of the dense kernels holds.
            every_head = torch.ones(q.shape[:2], dtype=torch.bool)
            attend_heads_dense(q, k, v, every_head, kv_head_index, scale=scale, softcap=softcap, out=out)
            return out
        return fast_dense_attention(q, k, v, scale=scale, softcap=softcap, out=out)

    def run(self, q, k, v, *, scale, softcap, kv_head_index, out, dense_above=None) -> PatternOutput:
        if torch.compiler.is_compiling():
            return run_pattern_op(self, q, k, v, scale=scale, softcap=softcap, kv_head_index=kv_head_index, out=out,
                                  dense_above=dense_above)
        self.attend(q, k, v, None, scale=scale, softcap=softcap, kv_head_index=kv_head_index, out=out)
        pairs = causal_pairs_total(q.shape[2], k.shape[2])
        return PatternOutput(torch.full(q.shape[:2], pairs, dtype=torch.int64, device=q.device), None)
