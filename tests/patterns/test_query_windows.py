"""Vertical-slash with several query windows (``VerticalSlashConfig.query_windows``): the windows'
placement, their mean line scores against an independent fp32 reference (GQA, odd lengths, chunked
queries), and a head whose middle rows attend to a column the last rows ignore."""

from __future__ import annotations

import pytest
import torch

from sparseprefill.config import VerticalSlashConfig
from sparseprefill.kernels.common import default_kv_head_index
from sparseprefill.kernels.vertical_slash import vertical_slash_scores
from sparseprefill.patterns import VerticalSlashPattern
from sparseprefill.kernels.geometry import spread_window_ends

from tests.reference import torch_single_thread  # noqa: F401  (autouse fixture)

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


@pytest.mark.parametrize("q_len,rows,windows", [(1000, 64, 4), (257, 64, 4), (100, 64, 4), (64, 64, 3), (10, 64, 2),
                                                (513, 50, 1), (4096, 64, 16)])
def test_windows_end_at_the_prompt_end_spread_evenly_and_never_overlap(q_len, rows, windows):
    ends = spread_window_ends(q_len, rows, windows)
    assert ends[-1] == q_len
    assert 1 <= len(ends) <= windows
    assert len(ends) == max(1, min(windows, q_len // rows))
    starts = [max(0, e - rows) for e in ends]
    assert all(s_next >= e for e, s_next in zip(ends, starts[1:])), (ends, starts)
    gaps = [b - a for a, b in zip([0] + ends, ends)]
    assert max(gaps) - min(gaps) <= 1  # evenly spread


def _reference_scores(q, k, scale, rows, ends):
    """Mean over windows of each window's column and diagonal probability mass, by explicit loops."""
    b, hq, q_len, _ = q.shape
    k_len = k.shape[2]
    offset = k_len - q_len
    kv = default_kv_head_index(hq, k.shape[1], q.device)
    vertical = torch.zeros(b, hq, k_len, dtype=torch.float64)
    slash = torch.zeros_like(vertical)
    for end in ends:
        start = max(0, end - rows)
        for r in range(start, end):
            pos = offset + r
            logits = torch.einsum("bhd,bhkd->bhk", q[:, :, r].double(), k[:, kv, : pos + 1].double()) * scale
            p = torch.softmax(logits, -1) / (end - start) / len(ends)
            vertical[..., : pos + 1] += p
            slash[..., : pos + 1] += p.flip(-1)  # diagonal d = pos - key
    return vertical, slash


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("b,hq,hkv,q_len,k_len,d,rows,windows", [
    (1, 4, 2, 301, 301, 16, 32, 3),
    (2, 3, 1, 250, 400, 32, 40, 4),  # chunked: queries are the last 250 of 400 keys
    (1, 6, 6, 97, 97, 64, 64, 4),  # too short for more than one window
])
def test_window_scores_match_the_fp32_reference(device, b, hq, hkv, q_len, k_len, d, rows, windows):
    g = torch.Generator().manual_seed(q_len * 7 + k_len)
    q = (torch.randn(b, hq, q_len, d, generator=g) * 1.5).to(device)
    k = (torch.randn(b, hkv, k_len, d, generator=g) * 1.5).to(device)
    scale = d ** -0.5
    pattern = VerticalSlashPattern(VerticalSlashConfig(last_queries=rows, query_windows=windows))
    vertical, slash = pattern.line_scores(q, k, scale=scale, softcap=None,
                                          kv_head_index=default_kv_head_index(hq, hkv, q.device))
    ref_v, ref_s = _reference_scores(q.cpu(), k.cpu(), scale, rows, spread_window_ends(q_len, rows, windows))
    torch.testing.assert_close(vertical.cpu().double(), ref_v, atol=2e-5, rtol=1e-4)
    torch.testing.assert_close(slash.cpu().double(), ref_s, atol=2e-5, rtol=1e-4)
    torch.testing.assert_close(vertical.sum(-1).cpu().double(), torch.ones(b, hq, dtype=torch.float64), atol=1e-4, rtol=0)


def test_one_window_is_the_last_queries_estimate():
    g = torch.Generator().manual_seed(3)
    q, k = torch.randn(1, 4, 200, 16, generator=g), torch.randn(1, 2, 200, 16, generator=g)
    kv = default_kv_head_index(4, 2, q.device)
    got = VerticalSlashPattern(VerticalSlashConfig(last_queries=48, query_windows=1)).line_scores(q, k, scale=0.25, softcap=None,
                                                                                 kv_head_index=kv)
    want = vertical_slash_scores(q, k, scale=0.25, last_queries=48, softcap=None, kv_head_index=kv)
    for a, b in zip(got, want):
        assert torch.equal(a, b)


def test_a_column_only_the_middle_rows_attend_to_is_found_by_spread_windows_only():
    """Rows 256-511 attend to key 200 (a stripe the last rows never look at); the last-rows estimate
    misses it, four windows spread over the prompt keep it."""
    length, d, column = 1024, 32, 200
    g = torch.Generator().manual_seed(0)
    q = torch.randn(1, 1, length, d, generator=g) * 0.1
    k = torch.randn(1, 1, length, d, generator=g) * 0.1
    u = torch.zeros(d)
    u[0] = 1.0
    k[0, 0, column] = u * 6.0
    q[0, 0, 256:512] += u * 6.0
    kv = default_kv_head_index(1, 1, q.device)

    def columns(windows):
        cfg = VerticalSlashConfig(last_queries=64, query_windows=windows, sink_tokens=1, local_tokens=8,
                                  vertical_mass=0.9, slash_mass=0.9)
        index = VerticalSlashPattern(cfg).estimate(q, k, scale=d ** -0.5, softcap=None, kv_head_index=kv)
        last_block = index.column_index[0, 0, -1]
        return set(last_block[index.column_valid()[0, 0, -1]].tolist())

    assert column not in columns(1)
    assert column in columns(4)


def test_query_windows_must_be_a_positive_int():
    with pytest.raises(ValueError, match="query_windows"):
        VerticalSlashConfig(query_windows=0)
