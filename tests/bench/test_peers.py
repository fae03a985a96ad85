"""The peer adapters of ``bench/peers.py`` on the CPU: our lines in MInference's layout, its index read
back as keys and pairs, and the fp32 block-row reference the GPU benchmark checks every kernel with.

MInference's converter is a CUDA extension; ``_convert_like_minference`` below is a plain-Python
model of its loop (written from its documented behaviour: diagonals descending, each covering a
64-key tile that grows by whole tiles, columns kept when they fall before the current tile run), so
the adapters are tested without a GPU. The GPU benchmark compares the real converter's output with
an fp32 reference of the keys it lists before timing it."""

import pytest
import torch

from sparseprefill.bench import peers
from sparseprefill.kernels import build_vertical_slash_index
from sparseprefill.kernels.geometry import visible
from sparseprefill.kernels.indices import VerticalSlashLines
from sparseprefill.kernels.vertical_slash.naive import vertical_slash_attention_naive

BLOCK = peers.MINFERENCE_BLOCK


def _convert_like_minference(v_idx: torch.Tensor, s_idx: torch.Tensor, length: int):
    """Per (batch, head, 64-row block): tile starts of the diagonals' key runs and the columns before
    the current run; the four tensors MInference's converter returns."""
    b, h, nv = v_idx.shape
    ns = s_idx.shape[-1]
    rows = -(-length // BLOCK)
    block_count = torch.zeros(b, h, rows, dtype=torch.int32)
    block_offset = torch.zeros(b, h, rows, ns, dtype=torch.int32)
    column_count = torch.zeros(b, h, rows, dtype=torch.int32)
    column_index = torch.zeros(b, h, rows, nv, dtype=torch.int32)
    for bi in range(b):
        for hi in range(h):
            verticals, slashes = v_idx[bi, hi].tolist(), s_idx[bi, hi].tolist()
            for r in range(rows):
                end_m = (r + 1) * BLOCK
                tiles, columns = [], []
                s = next(i for i, d in enumerate(slashes) if d < end_m)
                top = max(end_m - slashes[s], BLOCK)
                start, end = top - BLOCK, top
                s += 1
                v = 0
                while True:
                    column = verticals[v] if v < nv else end_m + BLOCK
                    if column < end:
                        if column < start:
                            columns.append(column)
                        v += 1
                        continue
                    if s >= ns:
                        tiles.extend(range(start, end, BLOCK))
                        break
                    top = max(end_m - slashes[s], BLOCK)
                    s += 1
                    if top > end + BLOCK:
                        tiles.extend(range(start, end, BLOCK))
                        start, end = top - BLOCK, top
                    elif top > end:
                        end += BLOCK
                block_count[bi, hi, r] = len(tiles)
                block_offset[bi, hi, r, : len(tiles)] = torch.tensor(tiles, dtype=torch.int32)
                column_count[bi, hi, r] = len(columns)
                column_index[bi, hi, r, : len(columns)] = torch.tensor(columns, dtype=torch.int32)
    return block_count, block_offset, column_count, column_index


def _random_lines(length: int, heads: int, seed: int) -> VerticalSlashLines:
    """Per-head lines of different counts (padding -1 past each count), diagonal 0 and column 0 kept."""
    g = torch.Generator().manual_seed(seed)
    width = length // 4
    vertical = torch.full((1, heads, width), -1, dtype=torch.int32)
    slash = torch.full((1, heads, width), -1, dtype=torch.int32)
    v_count = torch.zeros(1, heads, dtype=torch.int32)
    s_count = torch.zeros(1, heads, dtype=torch.int32)
    for head in range(heads):
        n_v = int(torch.randint(1, width, (1,), generator=g))
        n_s = int(torch.randint(1, width, (1,), generator=g))
        cols = torch.cat([torch.tensor([0]), torch.randperm(length - 1, generator=g)[: n_v - 1] + 1]).sort().values
        diags = torch.cat([torch.tensor([0]), torch.randperm(length - 1, generator=g)[: n_s - 1] + 1]).sort().values
        vertical[0, head, :n_v], slash[0, head, :n_s] = cols.to(torch.int32), diags.to(torch.int32)
        v_count[0, head], s_count[0, head] = n_v, n_s
    return VerticalSlashLines(vertical, v_count, slash, s_count, block_size_q=BLOCK, q_len=length, k_len=length,
                              block_pairs=torch.zeros(1, heads, -(-length // BLOCK), dtype=torch.int64))


def _index(lines: VerticalSlashLines):
    return build_vertical_slash_index(lines.vertical_index, lines.vertical_count, lines.slash_offset,
                                      lines.slash_count, q_len=lines.q_len, k_len=lines.k_len, block_size_q=BLOCK)


def _causal_rows(keys: torch.Tensor, blocks: torch.Tensor, length: int) -> torch.Tensor:
    """``[B, H, nb, L]`` listed keys -> ``[B, H, nb, 64, L]`` visible listed keys of each row."""
    rows = blocks[:, None] * BLOCK + torch.arange(BLOCK)
    ok = visible(rows[..., None], torch.arange(length), None) & (rows < length)[..., None]
    return keys[:, :, :, None, :] & ok


@pytest.mark.parametrize("length,seed", [(256, 0), (448, 1), (640, 2)])
def test_minference_layout_lists_our_keys_plus_tile_rounding(length, seed):
    lines = _random_lines(length, heads=3, seed=seed)
    v_idx, s_idx = peers.minference_lines(lines)
    theirs = _convert_like_minference(v_idx, s_idx, length)
    index = _index(lines)
    blocks = torch.arange(length // BLOCK)
    mine = _causal_rows(peers.index_block_keys(index, blocks), blocks, length)
    their_keys = peers.minference_block_keys(*theirs, blocks, length)
    listed = _causal_rows(their_keys, blocks, length)
    assert bool((listed | ~mine).all()), "MInference's layout lost keys our index lists"
    extra = listed & ~mine
    # What MInference adds is tile rounding: within a tile (64 keys) after the end of one of our ranges.
    ends = torch.where(index.range_valid(), index.range_end, -(10**9))[:, :, :, None, :]
    keys = torch.arange(length)[:, None]
    near_end = ((keys >= ends) & (keys < ends + BLOCK)).any(dim=-1)  # [B, H, nb, L]
    assert bool((~extra | near_end[:, :, :, None, :]).all())
    # Its pair count is the causal count of the keys it lists.
    assert torch.equal(peers.minference_pairs(*theirs, length), listed.sum(dim=(2, 3, 4)))


def test_minference_padding_is_inert():
    """A head converted alone (no padding) lists the same keys as in a batch padded to longer heads."""
    length = 384
    lines = _random_lines(length, heads=4, seed=5)
    v_idx, s_idx = peers.minference_lines(lines)
    assert v_idx.shape[-1] == int(lines.vertical_count.max()) and s_idx.shape[-1] == int(lines.slash_count.max())
    blocks = torch.arange(length // BLOCK)
    together = peers.minference_block_keys(*_convert_like_minference(v_idx, s_idx, length), blocks, length)
    for head in range(4):
        n_v, n_s = int(lines.vertical_count[0, head]), int(lines.slash_count[0, head])
        alone_v = lines.vertical_index[:, head : head + 1, :n_v].sort(dim=-1).values
        alone_s = lines.slash_offset[:, head : head + 1, :n_s].sort(dim=-1, descending=True).values
        alone = peers.minference_block_keys(*_convert_like_minference(alone_v, alone_s, length), blocks, length)
        assert torch.equal(together[:, head : head + 1], alone)


def test_minference_lines_need_diagonal_zero():
    lines = _random_lines(256, heads=2, seed=3)
    slash = lines.slash_offset.clone()
    slash[0, 1, : int(lines.slash_count[0, 1])] += 1  # head 1 loses diagonal 0, its list stays sorted
    broken = VerticalSlashLines(lines.vertical_index, lines.vertical_count, slash, lines.slash_count,
                                block_size_q=BLOCK, q_len=256, k_len=256, block_pairs=lines.block_pairs)
    with pytest.raises(ValueError, match="diagonal 0"):
        peers.minference_lines(broken)


@pytest.mark.parametrize("heads,kv_heads,head_dim", [(4, 2, 64), (3, 1, 128)])
def test_block_rows_reference_matches_the_naive_kernel(heads, kv_heads, head_dim):
    length = 320
    lines = _random_lines(length, heads=heads, seed=heads)
    index = _index(lines)
    g = torch.Generator().manual_seed(7)
    q = torch.randn(1, heads, length, head_dim, generator=g)
    k = torch.randn(1, kv_heads, length, head_dim, generator=g)
    v = torch.randn(1, kv_heads, length, head_dim, generator=g)
    kv_head_index = torch.arange(heads) // (heads // kv_heads)
    scale = head_dim**-0.5
    full = vertical_slash_attention_naive(q, k, v, index, scale=scale, window=None, softcap=None,
                                          kv_head_index=kv_head_index, out=torch.full_like(q, float("nan")))
    blocks = torch.tensor([0, 2, length // BLOCK - 1])
    reference = peers.block_rows_reference(q, k, v, peers.index_block_keys(index, blocks), blocks, BLOCK, scale,
                                           kv_head_index)
    torch.testing.assert_close(peers.gather_block_rows(full, blocks, BLOCK), reference, atol=2e-5, rtol=2e-5)
    # The check can fail: a reference over other keys disagrees.
    shifted = peers.index_block_keys(index, blocks).roll(1, dims=-1)
    wrong = peers.block_rows_reference(q, k, v, shifted, blocks, BLOCK, scale, kv_head_index)
    assert (peers.gather_block_rows(full, blocks, BLOCK) - wrong).abs().max() > 1e-2


def test_load_minference_says_what_it_looked_for(tmp_path):
    with pytest.raises(peers.PeerUnavailable, match="not an unpacked minference sdist"):
        peers.load_minference(tmp_path)


def _fake_minference(wrong: bool = False) -> peers.MInferenceKernels:
    """MInference's two entry points modelled on the CPU: the converter above and an fp32 attention
    over the keys its index lists, from queries rounded as its kernel rounds them (``wrong`` drops the last listed key of every row's tile run)."""
    def convert(seqlens, v_idx, s_idx, context, block_m, block_n):
        assert (block_m, block_n) == (BLOCK, BLOCK) and int(seqlens[0]) == context
        return _convert_like_minference(v_idx.cpu(), s_idx.cpu(), context)

    def attend(q, k, v, seqlens, block_count, block_offset, column_count, column_index, sm_scale, block_m, block_n):
        length = q.shape[2]
        blocks = torch.arange(length // BLOCK)
        keys = peers.minference_block_keys(block_count, block_offset, column_count, column_index, blocks, length)
        if wrong:
            keys = keys.roll(1, dims=-1)
        rows = peers.block_rows_reference(q, k, v, keys, blocks, BLOCK, sm_scale, torch.arange(q.shape[1]),
                                          round_scaled_queries=True)
        return rows.reshape(q.shape).to(q.dtype)

    return peers.MInferenceKernels(convert=convert, attend=attend, source="CPU model")


@pytest.mark.parametrize("wrong", [False, True])
def test_bench_kernels_peer_rows_check_before_timing(wrong, capsys):
    from sparseprefill.bench.kernels import run_peers

    rows = run_peers([256], _fake_minference(wrong), heads=4, kv_heads=2, head_dim=64, gpu="cpu", commit="test",
                     device="cpu")
    providers = {(row.op, row.provider) for row in rows}
    ours = {("vertical_slash_index", "sparseprefill:auto"), ("vertical_slash_attention", "sparseprefill:auto")}
    assert ours <= providers
    timed_theirs = any(provider.startswith("minference") for _, provider in providers)
    assert timed_theirs is not wrong
    if wrong:
        assert "not timed" in capsys.readouterr().err
    assert all(0.0 < row.density <= 1.0 and row.ms > 0 for row in rows)


def test_reference_with_rounded_scaled_queries():
    """Rounding q * scale * log2(e) to bf16 is what the option models: with fp32 inputs it is a no-op
    up to float error, with bf16 inputs it reproduces an attention computed from the rounded queries."""
    length, heads, head_dim = 192, 2, 64
    g = torch.Generator().manual_seed(11)
    q = 3 * torch.randn(1, heads, length, head_dim, generator=g)
    k, v = torch.randn(2, 1, 1, length, head_dim, generator=g)
    keys = torch.ones(1, heads, 2, length, dtype=torch.bool)
    blocks, kv_head_index, scale = torch.tensor([0, 2]), torch.zeros(heads, dtype=torch.long), head_dim**-0.5
    plain = peers.block_rows_reference(q, k, v, keys, blocks, BLOCK, scale, kv_head_index)
    rounded = peers.block_rows_reference(q, k, v, keys, blocks, BLOCK, scale, kv_head_index, round_scaled_queries=True)
    torch.testing.assert_close(rounded, plain, atol=1e-5, rtol=1e-5)
    q16 = q.bfloat16()
    rounded16 = peers.block_rows_reference(q16, k, v, keys, blocks, BLOCK, scale, kv_head_index,
                                           round_scaled_queries=True)
    manual_q = (q16.float() * scale * peers.LOG2_E).bfloat16().float() / (scale * peers.LOG2_E)
    manual = peers.block_rows_reference(manual_q, k, v, keys, blocks, BLOCK, scale, kv_head_index)
    torch.testing.assert_close(rounded16, manual, atol=1e-5, rtol=1e-5)
    assert (rounded16 - peers.block_rows_reference(q16, k, v, keys, blocks, BLOCK, scale, kv_head_index)).abs().max() > 0
