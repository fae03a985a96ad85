"""``bench.real_model.agreement``: the accuracy columns of the real-model tables."""

from __future__ import annotations

import math

import torch

from sparseprefill.bench.real_model import agreement


def test_agreement_gives_top1_with_its_binomial_standard_error():
    g = torch.Generator().manual_seed(0)
    positions, vocab = 400, 50
    reference = torch.randn(1, positions + 1, vocab, generator=g)
    logits = reference.clone()
    # Move the argmax of every 10th scored position elsewhere: top-1 agreement 0.9 exactly.
    for p in range(0, positions, 10):
        logits[0, p, reference[0, p].argmin()] = reference[0, p].max() + 1.0
    ids = torch.randint(0, vocab, (1, 2 * positions), generator=g)
    row = agreement(reference, logits, ids)
    assert math.isclose(row["top1"], 0.9, rel_tol=1e-6)
    assert math.isclose(row["top1_se"], math.sqrt(0.9 * 0.1 / positions), rel_tol=1e-5)
    same = agreement(reference, reference, ids)
    assert same["top1"] == 1.0 and same["top1_se"] == 0.0 and same["nll_delta"] == 0.0
