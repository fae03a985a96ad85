"""Independent brute-force references for the kernel and pattern tests.

The references import nothing from ``sparseprefill``: they read only the public fields of the index
dataclasses (``block_count``, ``block_index``, ``range_*``, ``column_*``, block sizes and lengths)
and rebuild every mask, probability and score with plain Python loops and float64 math, so that a
bug in the package's shared helpers (geometry, ``attend_gathered``, ``compact``, ...) cannot hide in
the reference as well.

Conventions re-derived from the package docs (not from its code):
  * bottom-right causal alignment: local query row ``i`` sits at key position ``Lk - Lq + i``;
  * sliding window ``W``: position ``p`` sees key ``j`` iff ``p - W < j <= p``;
  * soft-capping: ``c * tanh(s / c)`` applied to the scaled logits;
  * a row that sees no key outputs exactly 0.

The last section builds random test inputs (q/k/v, random indices, random lines); it constructs the
index dataclasses from ``sparseprefill.kernels.indices`` and nothing else from the package.
"""

from __future__ import annotations

import math
import os
from dataclasses import fields, replace

import pytest
import torch


@pytest.fixture(autouse=True, scope="module")
def torch_single_thread():
    """Run a test module with one intra-op thread (restored afterwards). These tests use tiny
    tensors, where OpenMP start-up and spin-waiting on a loaded 2-core runner cost 10-100x the
    work itself; imported (autouse) by each test module that uses this reference."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


# ----------------------------------------------------------------------------------------------
# token-level masks


def query_position(i: int, q_len: int, k_len: int) -> int:
    """Key position of local query row ``i`` (bottom-right alignment)."""
    return k_len - q_len + i


def sees(p: int, j: int, window: int | None) -> bool:
    """Does query position ``p`` see key ``j`` (causal + optional sliding window)?"""
    if j > p:
        return False
    if window is not None and j <= p - window:
        return False
    return True


def causal_mask(q_len: int, k_len: int, window: int | None = None) -> torch.Tensor:
    """``[Lq, Lk]`` bool visibility, built entry by entry."""
    rows = []
    for i in range(q_len):
        p = query_position(i, q_len, k_len)
        rows.append([sees(p, j, window) for j in range(k_len)])
    return torch.tensor(rows, dtype=torch.bool).reshape(q_len, k_len)


def block_rows(r: int, block_size_q: int, q_len: int) -> range:
    return range(r * block_size_q, min((r + 1) * block_size_q, q_len))


def block_sparse_listed_mask(index) -> torch.Tensor:
    """``[B, H, Lq, Lk]`` bool: keys listed by a ``BlockSparseIndex`` (no causal mask), built by
    looping over batch rows, heads, query blocks and the first ``block_count`` (and ``column_count``)
    slots only."""
    count = index.block_count.tolist()
    ids = index.block_index.tolist()
    b_n, h_n, rq = index.block_count.shape
    mask = torch.zeros(b_n, h_n, index.q_len, index.k_len, dtype=torch.bool)
    for b in range(b_n):
        for h in range(h_n):
            for r in range(rq):
                rows = block_rows(r, index.block_size_q, index.q_len)
                for slot in range(count[b][h][r]):
                    c = ids[b][h][r][slot]
                    k0 = c * index.block_size_k
                    k1 = min(k0 + index.block_size_k, index.k_len)
                    if rows and k1 > k0:
                        mask[b, h, rows.start : rows.stop, k0:k1] = True
                if index.column_index is not None:
                    for slot in range(int(index.column_count[b, h, r])):
                        j = int(index.column_index[b, h, r, slot])
                        if 0 <= j < index.k_len:
                            mask[b, h, rows.start : rows.stop, j] = True
    return mask


def on_cpu(index):
    """An index dataclass (any of ``kernels.indices``) with every tensor field moved to the CPU, for
    comparisons against CPU references."""
    return replace(index, **{f.name: getattr(index, f.name).cpu() for f in fields(index)
                             if isinstance(getattr(index, f.name), torch.Tensor)})


def vertical_slash_listed_mask(index) -> torch.Tensor:
    """``[B, H, Lq, Lk]`` bool: keys listed by a ``VerticalSlashIndex`` (no causal mask)."""
    index = index.with_block_lists()
    rc, rs, re_ = index.range_count.tolist(), index.range_start.tolist(), index.range_end.tolist()
    cc, ci = index.column_count.tolist(), index.column_index.tolist()
    b_n, h_n, rq = index.range_count.shape
    mask = torch.zeros(b_n, h_n, index.q_len, index.k_len, dtype=torch.bool)
    for b in range(b_n):
        for h in range(h_n):
            for r in range(rq):
                rows = block_rows(r, index.block_size_q, index.q_len)
                for slot in range(rc[b][h][r]):
                    for j in range(rs[b][h][r][slot], re_[b][h][r][slot]):
                        if 0 <= j < index.k_len:
                            mask[b, h, rows.start : rows.stop, j] = True
                for slot in range(cc[b][h][r]):
                    j = ci[b][h][r][slot]
                    if 0 <= j < index.k_len:
                        mask[b, h, rows.start : rows.stop, j] = True
    return mask


def vertical_slash_key_multiplicity(index) -> torch.Tensor:
    """``[B, H, Rq, Lk]`` int: how many times each key is listed for each query block (ranges and
    columns together). An index is well formed only if every entry is 0 or 1."""
    index = index.with_block_lists()
    rc, rs, re_ = index.range_count.tolist(), index.range_start.tolist(), index.range_end.tolist()
    cc, ci = index.column_count.tolist(), index.column_index.tolist()
    b_n, h_n, rq = index.range_count.shape
    mult = torch.zeros(b_n, h_n, rq, index.k_len, dtype=torch.int64)
    for b in range(b_n):
        for h in range(h_n):
            for r in range(rq):
                for slot in range(rc[b][h][r]):
                    for j in range(rs[b][h][r][slot], re_[b][h][r][slot]):
                        mult[b, h, r, j] += 1
                for slot in range(cc[b][h][r]):
                    mult[b, h, r, ci[b][h][r][slot]] += 1
    return mult


def lines_block_keys(
    verticals: list[int], slashes: list[int], r: int, block_size_q: int, q_len: int, k_len: int
) -> set[int]:
    """Keys a set of vertical columns and slash diagonals cover for query block ``r``: ``j`` is
    covered iff it is a vertical with ``j <= last row position`` or ``p - j`` is a slash for some
    row position ``p`` of the block (and ``0 <= j < Lk``)."""
    positions = [query_position(i, q_len, k_len) for i in block_rows(r, block_size_q, q_len)]
    keys: set[int] = set()
    if not positions:
        return keys
    last = max(positions)
    for j in verticals:
        if 0 <= j <= last and j < k_len:
            keys.add(j)
    for d in slashes:
        for p in positions:
            j = p - d
            if 0 <= j < k_len:
                keys.add(j)
    return keys


def lines_mask(
    verticals: list[list[list[int]]], slashes: list[list[list[int]]], block_size_q: int, q_len: int, k_len: int
) -> torch.Tensor:
    """``[B, H, Lq, Lk]`` bool from per-(batch, head) line lists, at query-block granularity."""
    b_n, h_n = len(verticals), len(verticals[0])
    rq = -(-q_len // block_size_q)
    mask = torch.zeros(b_n, h_n, q_len, k_len, dtype=torch.bool)
    for b in range(b_n):
        for h in range(h_n):
            for r in range(rq):
                rows = block_rows(r, block_size_q, q_len)
                for j in lines_block_keys(verticals[b][h], slashes[b][h], r, block_size_q, q_len, k_len):
                    mask[b, h, rows.start : rows.stop, j] = True
    return mask


# ----------------------------------------------------------------------------------------------
# attention


def default_kv_heads(hq: int, hkv: int) -> list[int]:
    group = hq // hkv
    return [h // group for h in range(hq)]


def _kv_heads(kv_head_index, hq: int, hkv: int) -> list[int]:
    if kv_head_index is None:
        return default_kv_heads(hq, hkv)
    return [int(x) for x in kv_head_index.tolist()]


def attention_reference(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    scale: float,
    listed: torch.Tensor | None = None,
    window: int | None = None,
    softcap: float | None = None,
    kv_head_index: torch.Tensor | None = None,
    key_padding_mask: torch.Tensor | None = None,
    return_probs: bool = False,
):
    """float64 masked softmax attention, one (batch, head) at a time.

    ``listed [B, Hq, Lq, Lk]`` bool (keys the index lists; None = all), intersected with the causal
    (+window) mask and ``key_padding_mask [B, Lk]``. Rows with no visible key give 0 (and all-zero
    probabilities). Returns ``[B, Hq, Lq, D]`` float64 (and ``[B, Hq, Lq, Lk]`` probabilities).
    """
    b_n, hq, q_len, d = q.shape
    hkv, k_len = k.shape[1], k.shape[2]
    heads = _kv_heads(kv_head_index, hq, hkv)
    vis = causal_mask(q_len, k_len, window)
    out = torch.zeros(b_n, hq, q_len, d, dtype=torch.float64)
    probs_all = torch.zeros(b_n, hq, q_len, k_len, dtype=torch.float64)
    for b in range(b_n):
        for h in range(hq):
            kh = heads[h]
            s = (q[b, h].double() @ k[b, kh].double().T) * scale
            if softcap is not None:
                s = softcap * torch.tanh(s / softcap)
            allowed = vis.clone()
            if listed is not None:
                allowed &= listed[b, h]
            if key_padding_mask is not None:
                allowed &= key_padding_mask[b].bool()[None, :]
            # softmax over the allowed keys of each row; rows with none keep all-zero weights
            s = s.masked_fill(~allowed, float("-inf"))
            has_key = allowed.any(-1, keepdim=True)
            row_max = torch.where(has_key, s.amax(-1, keepdim=True), torch.zeros_like(s[:, :1]))
            w = torch.exp(s - row_max)  # exactly 0 where not allowed
            w = torch.where(has_key, w / w.sum(-1, keepdim=True).clamp_min(1e-300), torch.zeros_like(w))
            probs_all[b, h] = w
            out[b, h] = w @ v[b, kh].double()
    if return_probs:
        return out, probs_all
    return out


def dense_probs(q, k, *, scale, softcap=None, kv_head_index=None, window=None) -> torch.Tensor:
    """``[B, Hq, Lq, Lk]`` float64 causal softmax probabilities."""
    v = torch.zeros(k.shape[0], k.shape[1], k.shape[2], 1, dtype=k.dtype)
    _, probs = attention_reference(
        q, k, v, scale=scale, softcap=softcap, kv_head_index=kv_head_index, window=window, return_probs=True
    )
    return probs


def pair_count(listed: torch.Tensor | None, q_len: int, k_len: int, window: int | None = None) -> torch.Tensor:
    """``[B, H]`` int64 number of listed and visible (query, key) pairs."""
    vis = causal_mask(q_len, k_len, window)
    if listed is None:
        return torch.tensor(int(vis.sum()))
    return (listed & vis).sum(dim=(-1, -2))


# ----------------------------------------------------------------------------------------------
# estimation


def vertical_slash_scores_reference(q, k, *, scale, last_queries, softcap=None, kv_head_index=None):
    """Mean over the last ``n`` query rows of their causal probabilities, per key column and per
    diagonal ``d = p - j``. float64 ``[B, Hq, Lk]`` each."""
    b_n, hq, q_len, _ = q.shape
    k_len = k.shape[2]
    n = min(last_queries, q_len)
    probs = dense_probs(q, k, scale=scale, softcap=softcap, kv_head_index=kv_head_index)
    vertical = torch.zeros(b_n, hq, k_len, dtype=torch.float64)
    slash = torch.zeros(b_n, hq, k_len, dtype=torch.float64)
    for b in range(b_n):
        for h in range(hq):
            pr = probs[b, h].tolist()
            vert = [0.0] * k_len
            sl = [0.0] * k_len
            for i in range(q_len - n, q_len):
                p = query_position(i, q_len, k_len)
                for j in range(k_len):
                    if j <= p:
                        vert[j] += pr[i][j] / n
                        sl[p - j] += pr[i][j] / n
            vertical[b, h] = torch.tensor(vert, dtype=torch.float64)
            slash[b, h] = torch.tensor(sl, dtype=torch.float64)
    return vertical, slash


def antidiagonal_block_mass_reference(q, k, *, scale, stride, block_size, softcap=None, kv_head_index=None,
                                      alternate=False, sampled=False):
    """XAttention's strided antidiagonal scores by explicit loops (float64).

    Query rows are grouped ``S`` at a time from local row 0, keys from key 0 (missing rows/keys of a
    last partial group count as zero vectors). Group row ``m`` scores group column ``n`` with
    ``sum_i q[S m + S - 1 - i] . k[S n + i] * scale / S``. Column ``n`` is visible to row ``m`` iff
    its first key ``S n`` is <= the position of the group's last real query. Each group row is
    softmaxed over its visible columns; the probabilities are summed into
    ``block_size x block_size`` blocks (query blocks in local rows, key blocks in key positions)
    and averaged over the group rows of each query block. ``alternate``: odd group rows use
    ``q[S m + S - 2 - i]`` instead.
    """
    b_n, hq, q_len, _ = q.shape
    hkv, k_len = k.shape[1], k.shape[2]
    heads = _kv_heads(kv_head_index, hq, hkv)
    s_ = stride
    n_rows = -(-q_len // s_)
    n_cols = -(-k_len // s_)
    rq = -(-q_len // block_size)
    rk = -(-k_len // block_size)
    mass = torch.zeros(b_n, hq, rq, rk, dtype=torch.float64)
    rows_per_block = [0] * rq
    for m in range(n_rows):
        rows_per_block[(m * s_) // block_size] += 1
    for b in range(b_n):
        for h in range(hq):
            # all pairwise dot products, float64, as nested lists
            gram = (q[b, h].double() @ k[b, heads[h]].double().T).tolist()
            for m in range(n_rows):
                if sampled:
                    # Each sampled pair (S m + S - 1 - i [- 1], S n + i) on its own: exact logit, dropped
                    # outside the sequences or in its query's future; one softmax over the row's pairs.
                    weights = {}
                    for n in range(n_cols):
                        for i in range(s_):
                            qi = s_ * m + s_ - 1 - i - (m % 2 if alternate else 0)
                            kj = s_ * n + i
                            if qi < q_len and kj < k_len and kj <= query_position(qi, q_len, k_len):
                                sc = gram[qi][kj] * scale
                                if softcap is not None:
                                    sc = softcap * math.tanh(sc / softcap)
                                weights.setdefault(n, []).append(sc)
                    if weights:
                        mx = max(max(v) for v in weights.values())
                        z = sum(math.exp(x - mx) for v in weights.values() for x in v)
                        r = (m * s_) // block_size
                        for n, v in weights.items():
                            mass[b, h, r, (n * s_) // block_size] += sum(math.exp(x - mx) for x in v) / z
                    continue
                last_row = min(s_ * m + s_ - 1, q_len - 1)
                p_last = query_position(last_row, q_len, k_len)
                scores = []
                cols = []
                for n in range(n_cols):
                    if s_ * n > p_last:
                        continue
                    total = 0.0
                    for i in range(s_):
                        qi = s_ * m + s_ - 1 - i - (m % 2 if alternate else 0)
                        kj = s_ * n + i
                        if qi < q_len and kj < k_len:
                            total += gram[qi][kj]
                    sc = total * scale / s_
                    if softcap is not None:
                        sc = softcap * math.tanh(sc / softcap)
                    scores.append(sc)
                    cols.append(n)
                mx = max(scores)
                w = [math.exp(x - mx) for x in scores]
                z = sum(w)
                r = (m * s_) // block_size
                for n, wi in zip(cols, w):
                    c = (n * s_) // block_size
                    mass[b, h, r, c] += wi / z
            for r in range(rq):
                mass[b, h, r] /= rows_per_block[r]
    return mass


def exact_block_mass(probs: torch.Tensor, q_len: int, k_len: int, block_size: int) -> torch.Tensor:
    """``[B, H, Rq, Rk]``: mean over the rows of each query block of the probability mass that falls
    in each key block (the quantity the antidiagonal estimate approximates)."""
    b_n, h_n = probs.shape[:2]
    rq, rk = -(-q_len // block_size), -(-k_len // block_size)
    mass = torch.zeros(b_n, h_n, rq, rk, dtype=torch.float64)
    for r in range(rq):
        rows = block_rows(r, block_size, q_len)
        for c in range(rk):
            mass[:, :, r, c] = probs[:, :, rows.start : rows.stop, c * block_size : (c + 1) * block_size].sum(-1).mean(-1)
    return mass


def pooled_block_probs_reference(q, k, *, scale, block_size, softcap=None, kv_head_index=None):
    """Softmax over causally reachable KV blocks (first key <= last query position of the block)
    of ``mean(q rows of block) . mean(keys of block) * scale``. float64."""
    b_n, hq, q_len, _ = q.shape
    hkv, k_len = k.shape[1], k.shape[2]
    heads = _kv_heads(kv_head_index, hq, hkv)
    rq, rk = -(-q_len // block_size), -(-k_len // block_size)
    out = torch.zeros(b_n, hq, rq, rk, dtype=torch.float64)
    for b in range(b_n):
        for h in range(hq):
            for r in range(rq):
                rows = block_rows(r, block_size, q_len)
                q_mean = q[b, h, rows.start : rows.stop].double().mean(0)
                p_last = query_position(rows.stop - 1, q_len, k_len)
                scores = {}
                for c in range(rk):
                    if c * block_size > p_last:
                        continue
                    k_mean = k[b, heads[h], c * block_size : min((c + 1) * block_size, k_len)].double().mean(0)
                    sc = float(q_mean @ k_mean) * scale
                    if softcap is not None:
                        sc = softcap * math.tanh(sc / softcap)
                    scores[c] = sc
                mx = max(scores.values())
                z = sum(math.exp(x - mx) for x in scores.values())
                for c, x in scores.items():
                    out[b, h, r, c] = math.exp(x - mx) / z
    return out


def causal_block_sets(q_len: int, k_len: int, block_size_q: int, block_size_k: int, sink_blocks: int,
                      local_blocks: int = 0):
    """Per query block ``r``: (valid KV blocks, diagonal KV blocks, sink KV blocks) as Python sets.

    valid: the block holds a key <= the block's last query position; diagonal: the block holds a
    key inside ``[first - local_blocks x block_size_k, last]`` query position of the block (the
    diagonal and the local band); sink: block id < ``sink_blocks`` (and valid)."""
    rq = -(-q_len // block_size_q)
    rk = -(-k_len // block_size_k)
    out = []
    for r in range(rq):
        rows = block_rows(r, block_size_q, q_len)
        p0 = query_position(rows.start, q_len, k_len)
        p1 = query_position(rows.stop - 1, q_len, k_len)
        valid, diag, sink = set(), set(), set()
        for c in range(rk):
            keys = range(c * block_size_k, min((c + 1) * block_size_k, k_len))
            if keys.start <= p1:
                valid.add(c)
                if any(p0 - local_blocks * block_size_k <= j <= p1 for j in keys):
                    diag.add(c)
                if c < sink_blocks:
                    sink.add(c)
        out.append((valid, diag, sink))
    return out


# ----------------------------------------------------------------------------------------------
# random test inputs (the only place that touches the package: the index dataclasses)


def make_qkv(seed: int, b: int, hq: int, hkv: int, q_len: int, k_len: int, d: int, dtype=torch.float32, spread: float = 1.0):
    """Random q ``[B, Hq, Lq, D]``, k/v ``[B, Hkv, Lk, D]`` in ``dtype``. ``spread`` scales q so the
    logits are peaky enough for the mask to matter."""
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(b, hq, q_len, d, generator=gen) * spread
    k = torch.randn(b, hkv, k_len, d, generator=gen)
    v = torch.randn(b, hkv, k_len, d, generator=gen)
    return q.to(dtype), k.to(dtype), v.to(dtype)


def random_block_sparse_index(
    rng, b: int, h: int, q_len: int, k_len: int, block_size_q: int, block_size_k: int, density: float,
    *, extra_slots: int = 2, garbage_padding: bool = True,
):
    """Each (batch, head, query block) lists a random subset of *all* KV blocks (future blocks
    included: the kernel must mask them causally), sorted; padding slots hold random ids (or -1)
    that the kernel must ignore."""
    from sparseprefill.kernels.indices import BlockSparseIndex

    rq = -(-q_len // block_size_q)
    rk = -(-k_len // block_size_k)
    chosen = [[[sorted(c for c in range(rk) if rng.random() < density) for _ in range(rq)] for _ in range(h)] for _ in range(b)]
    width = max(max(len(ids) for per_b in chosen for per_h in per_b for ids in per_h), 1) + extra_slots
    count = torch.zeros(b, h, rq, dtype=torch.int32)
    index = torch.zeros(b, h, rq, width, dtype=torch.int32)
    for bi in range(b):
        for hi in range(h):
            for r in range(rq):
                ids = chosen[bi][hi][r]
                pad = [rng.randrange(-1, rk) if garbage_padding else -1 for _ in range(width - len(ids))]
                count[bi, hi, r] = len(ids)
                index[bi, hi, r] = torch.tensor(ids + pad, dtype=torch.int32)
    return BlockSparseIndex(
        block_count=count, block_index=index, block_size_q=block_size_q, block_size_k=block_size_k,
        q_len=q_len, k_len=k_len,
    )


def random_vertical_slash_index(
    rng, b: int, h: int, q_len: int, k_len: int, block_size_q: int, density: float, *, garbage_padding: bool = True
):
    """A directly built (not via the converter) random index: a random key subset per query block,
    split into sorted disjoint ranges (random run breaks) and single columns."""
    from sparseprefill.kernels.indices import VerticalSlashIndex

    rq = -(-q_len // block_size_q)
    per = {}
    for bi in range(b):
        for hi in range(h):
            for r in range(rq):
                keys = [j for j in range(k_len) if rng.random() < density]
                ranges, columns = [], []
                i = 0
                while i < len(keys):
                    # a maximal run of consecutive keys, cut at random points
                    run_end = i
                    while run_end + 1 < len(keys) and keys[run_end + 1] == keys[run_end] + 1 and rng.random() < 0.85:
                        run_end += 1
                    if run_end > i or rng.random() < 0.5:
                        ranges.append((keys[i], keys[run_end] + 1))
                    else:
                        columns.append(keys[i])
                    i = run_end + 1
                per[bi, hi, r] = (ranges, columns)
    m = max(max((len(x[0]) for x in per.values()), default=0), 1) + 1
    v = max(max((len(x[1]) for x in per.values()), default=0), 1) + 1
    rc = torch.zeros(b, h, rq, dtype=torch.int32)
    rs = torch.zeros(b, h, rq, m, dtype=torch.int32)
    re_ = torch.zeros(b, h, rq, m, dtype=torch.int32)
    cc = torch.zeros(b, h, rq, dtype=torch.int32)
    ci = torch.zeros(b, h, rq, v, dtype=torch.int32)
    for (bi, hi, r), (ranges, columns) in per.items():
        rc[bi, hi, r] = len(ranges)
        cc[bi, hi, r] = len(columns)
        for slot in range(m):
            if slot < len(ranges):
                rs[bi, hi, r, slot], re_[bi, hi, r, slot] = ranges[slot]
            elif garbage_padding:
                a = rng.randrange(0, k_len)
                rs[bi, hi, r, slot], re_[bi, hi, r, slot] = a, min(k_len, a + rng.randrange(1, 9))
        for slot in range(v):
            if slot < len(columns):
                ci[bi, hi, r, slot] = columns[slot]
            elif garbage_padding:
                ci[bi, hi, r, slot] = rng.randrange(-1, k_len)
    return VerticalSlashIndex(
        range_count=rc, range_start=rs, range_end=re_, column_count=cc, column_index=ci,
        block_size_q=block_size_q, q_len=q_len, k_len=k_len,
    )


def random_lines(rng, b: int, h: int, k_len: int, n_vertical: int, n_slash: int, *, garbage_padding: bool = True):
    """Random vertical columns (sorted, distinct) and slash offsets (distinct, *unsorted*) per
    (batch, head), with per-(batch, head) counts <= the requested maxima and padded slots.

    Returns ``(vertical_index [B,H,Nv], vertical_count [B,H], slash_offset [B,H,Ns], slash_count
    [B,H], verticals, slashes)`` where the last two are nested Python lists of the real lines."""
    nv, ns = max(n_vertical, 1), max(n_slash, 1)
    vi = torch.full((b, h, nv), -1, dtype=torch.int64)
    vc = torch.zeros(b, h, dtype=torch.int64)
    so = torch.full((b, h, ns), -1, dtype=torch.int64)
    sc = torch.zeros(b, h, dtype=torch.int64)
    verticals = [[[] for _ in range(h)] for _ in range(b)]
    slashes = [[[] for _ in range(h)] for _ in range(b)]
    for bi in range(b):
        for hi in range(h):
            cv = rng.randint(0, min(n_vertical, k_len))
            cs = rng.randint(0, min(n_slash, k_len))
            cols = sorted(rng.sample(range(k_len), cv))
            diags = rng.sample(range(k_len), cs)
            verticals[bi][hi], slashes[bi][hi] = cols, diags
            vc[bi, hi], sc[bi, hi] = cv, cs
            for slot in range(nv):
                if slot < cv:
                    vi[bi, hi, slot] = cols[slot]
                elif garbage_padding:
                    vi[bi, hi, slot] = rng.randrange(-1, k_len)
            for slot in range(ns):
                if slot < cs:
                    so[bi, hi, slot] = diags[slot]
                elif garbage_padding:
                    so[bi, hi, slot] = rng.randrange(-1, k_len)
    return vi, vc, so, sc, verticals, slashes


# ------------------------------------------------------------------------------------------------
# GPU fuzz settings, shared by the hypothesis fuzzes that run compiled kernels on the GPU machine

FUZZ_EXAMPLES = int(os.environ.get("SPARSEPREFILL_FUZZ_EXAMPLES", "1000"))
# Triton compiles a kernel per new shape specialisation on one CPU core, which bounds a fuzz's speed;
# shards with distinct seeds run in parallel processes and together cover more cases.
FUZZ_SHARD = os.environ.get("SPARSEPREFILL_FUZZ_SHARD")


# A fuzz prints its running count this often (with ``-s``): a run cut by a timeout still shows how many
# cases passed (hypothesis runs every case inside one test, whose result prints only at the end).
FUZZ_PROGRESS_EVERY = 25


def fuzz_progress(name: str, passed: int) -> None:
    if passed % FUZZ_PROGRESS_EVERY == 0:
        print(f"{name} fuzz: {passed} cases passed", flush=True)


def gpu_fuzz(test):
    """``FUZZ_EXAMPLES`` deterministic cases per test; ``SPARSEPREFILL_FUZZ_SHARD=n`` draws stream ``n``."""
    from hypothesis import HealthCheck, seed, settings

    configured = settings(max_examples=FUZZ_EXAMPLES, deadline=None, derandomize=FUZZ_SHARD is None, database=None,
                          suppress_health_check=list(HealthCheck))(test)
    return seed(int(FUZZ_SHARD))(configured) if FUZZ_SHARD is not None else configured


def run_fullgraph(fn, *args, backend: str = "aot_eager"):
    """``fn(*args)`` compiled with ``torch.compile(fullgraph=True)`` (a graph break fails the call), with
    dynamo's caches cleared before and after so no other test's compiled code is reused."""
    torch._dynamo.reset()
    try:
        return torch.compile(fn, fullgraph=True, backend=backend)(*args)
    finally:
        torch._dynamo.reset()


def run_pattern(pattern, q, k, v, kv_head_index, dense_above):
    """``pattern.run`` into a NaN-filled output: ``(out, computed_pairs [B, H], dense_heads as a tensor)``."""
    out = torch.full_like(q, float("nan"))
    result = pattern.run(q, k, v, scale=q.shape[-1] ** -0.5, softcap=None, kv_head_index=kv_head_index, out=out,
                         dense_above=dense_above)
    return out, result.computed_pairs, torch.as_tensor(result.dense_heads)


def median(x: torch.Tensor) -> float:
    """The upper median of ``x``'s elements (an element of ``x``, so a threshold at it splits them)."""
    return float(x.flatten().sort().values[x.numel() // 2])


# (Lq, Lk) of the routed-run comparisons: a fresh prefill and a chunk, neither a multiple of a block.
ROUTING_LENGTHS = [(200, 200), (150, 233)]


def routing_case(seed: int, pattern_cls, config, q_len: int, k_len: int):
    """``pattern_cls(config)``, inputs for a routed-run comparison (2 batch rows, 6 query / 2 KV heads,
    head_dim 32) and each head's density under it without routing: ``(pattern, q, k, v, kv_head_index,
    causal pairs, density [B, H])``."""
    pattern = pattern_cls(config)
    b, hq, hkv, d = 2, 6, 2, 32
    q, k, v = make_qkv(seed, b, hq, hkv, q_len, k_len, d, spread=2.0)
    kv_head_index = torch.arange(hq) // (hq // hkv)
    _, plain_pairs, _ = run_pattern(pattern, q, k, v, kv_head_index, None)
    causal = int(pair_count(None, q_len, k_len))
    return pattern, q, k, v, kv_head_index, causal, plain_pairs.double() / causal
