"""The peers' own kernels beside ours, on the same lines: MInference's vertical-slash index conversion
and sparse attention.

MInference (``minference`` on PyPI, an sdist with a small CUDA extension) is never a dependency. The
benchmark finds it in one of two ways:

* installed (``pip install --no-build-isolation minference``, which compiles ``minference.cuda``);
* an unpacked sdist given as ``--minference-src DIR``: its ``csrc/`` is compiled on the spot with
  ``torch.utils.cpp_extension.load`` (nvcc and ninja; about a minute), which needs neither pip, nor
  ``wheel``, nor network on the GPU machine.

Either way only two modules are loaded: the converter ``minference.cuda`` and the Triton kernel file
``minference/ops/pit_sparse_flash_attention_v2.py``. The package's ``__init__`` is not run: it imports
its model patches, which need flash-attn and older transformers classes.

MInference's layout (read from its sources): ``convert_vertical_slash_indexes(seqlens, v_idx, s_idx,
context, 64, 64)`` takes every head's columns ascending and diagonals (query - key) descending, all
``NNZ`` slots real, and returns per 64-row query block the start of each 64-key tile its diagonals
cover and the columns outside them. Our lines differ in count per head, so the lists are padded with
``PEER_PAD``: a diagonal that large lies past every block's end (the converter skips those before
reading the first real one) and a column that large lies past the last range (the converter stops
there). The converter reads past a block's list when no diagonal reaches it, so diagonal 0 must be
kept in every head; our estimators force the local diagonals, and ``minference_lines`` checks it.

MInference's attention takes as many K/V heads as query heads (it repeats K/V for GQA models), so
the benchmark hands it repeated K/V, as MInference's own patch does.
"""

from __future__ import annotations

import importlib
import sys
import types
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch

from ..kernels.geometry import causal_pairs_in_columns, causal_pairs_in_rects, query_block_bounds
from ..kernels.indices import VerticalSlashIndex, VerticalSlashLines

MINFERENCE_BLOCK = 64  # the converter asserts 64-row query blocks and 64-key tiles
PEER_PAD = 1 << 30  # a line position past any prompt (see the module docstring)
LOG2_E = 1.44269504  # MInference's kernel works in base 2: exp2(q * scale * log2(e) . k)
_MINFERENCE_KERNEL_MODULE = "minference.ops.pit_sparse_flash_attention_v2"


class PeerUnavailable(RuntimeError):
    """A peer's package is not importable here; the message says what was looked for."""


@dataclass(frozen=True)
class MInferenceKernels:
    convert: Callable  # convert_vertical_slash_indexes(seqlens, v_idx, s_idx, context, block_m, block_n)
    attend: Callable  # _triton_mixed_sparse_attention(q, k, v, seqlens, *index, sm_scale, block_m, block_n)
    source: str


def _stand_in_package(name: str, path: Path) -> None:
    if name not in sys.modules:
        package = types.ModuleType(name)
        package.__path__ = [str(path)]
        sys.modules[name] = package


def load_minference(source_dir: str | Path | None = None) -> MInferenceKernels:
    """MInference's converter and attention kernel, from an installed package or an unpacked sdist.

    Raises ``PeerUnavailable`` when neither is there (or the sdist fails to compile)."""
    if source_dir is not None:
        root = Path(source_dir)
        sources = [root / "csrc" / "kernels.cpp", root / "csrc" / "vertical_slash_index.cu"]
        missing = [str(p) for p in sources + [root / "minference" / "ops"] if not p.exists()]
        if missing:
            raise PeerUnavailable(f"{root} is not an unpacked minference sdist: missing {', '.join(missing)}")
        from torch.utils.cpp_extension import load

        try:
            extension = load(name="minference_cuda", sources=[str(p) for p in sources],
                             extra_cuda_cflags=["-O3", "-std=c++17"], verbose=False)
        except Exception as exc:  # noqa: BLE001 - a build failure is the peer being unavailable
            raise PeerUnavailable(f"building MInference's CUDA converter from {root} failed: {exc}") from exc
        _stand_in_package("minference", root / "minference")
        _stand_in_package("minference.ops", root / "minference" / "ops")
        sys.modules.setdefault("minference.cuda", extension)
        where = f"sdist at {root}"
    else:
        spec = importlib.util.find_spec("minference")  # finds the package without running its __init__
        if spec is None or not spec.submodule_search_locations:
            raise PeerUnavailable("minference is not installed (pip install --no-build-isolation minference, "
                                  "or pass --minference-src DIR of its unpacked sdist)")
        root = Path(list(spec.submodule_search_locations)[0])
        _stand_in_package("minference", root)
        _stand_in_package("minference.ops", root / "ops")
        where = f"installed at {root}"
    try:
        kernel_module = importlib.import_module(_MINFERENCE_KERNEL_MODULE)
        convert = sys.modules["minference.cuda"].convert_vertical_slash_indexes
    except Exception as exc:  # noqa: BLE001
        raise PeerUnavailable(f"MInference ({where}) did not load: {exc!r}") from exc
    return MInferenceKernels(convert=convert, attend=kernel_module._triton_mixed_sparse_attention, source=where)


def minference_lines(lines: VerticalSlashLines) -> tuple[torch.Tensor, torch.Tensor]:
    """Our per-head lines as MInference's converter reads them.

    Returns ``(v_idx [B, H, Nv], s_idx [B, H, Ns])`` int32, ``Nv``/``Ns`` the largest per-head counts:
    columns ascending then ``PEER_PAD``, diagonals ``PEER_PAD`` first then descending."""
    def padded(values: torch.Tensor, counts: torch.Tensor, descending: bool) -> torch.Tensor:
        real = torch.arange(values.shape[-1], device=values.device) < counts[..., None]
        ordered = torch.where(real, values.to(torch.int32), PEER_PAD).sort(dim=-1, descending=descending).values
        width = max(int(counts.max()), 1)
        return (ordered[..., -width:] if descending else ordered[..., :width]).contiguous()

    v_idx = padded(lines.vertical_index, lines.vertical_count, descending=False)
    s_idx = padded(lines.slash_offset, lines.slash_count, descending=True)
    if not bool((s_idx[..., -1] == 0).all()):
        raise ValueError("MInference's converter needs diagonal 0 in every head (it reads past the list of a "
                         "block that no diagonal reaches); these lines lack it in some head")
    return v_idx, s_idx


def minference_pairs(block_count: torch.Tensor, block_offset: torch.Tensor, column_count: torch.Tensor,
                     column_index: torch.Tensor, length: int) -> torch.Tensor:
    """``[B, H]`` int64 causal pairs MInference's kernel computes from its index (tiles of 64 keys,
    causally masked, plus columns): the numerator of its density."""
    p0, p1 = query_block_bounds(length, length, MINFERENCE_BLOCK, block_offset.device)
    p0, p1 = p0[:, None], p1[:, None]
    tile_slots = torch.arange(block_offset.shape[-1], device=block_offset.device)
    column_slots = torch.arange(column_index.shape[-1], device=column_index.device)
    per_head = []
    for head in range(block_offset.shape[1]):  # one head at a time: [Rq, NNZ_S] int64 temporaries
        starts = block_offset[:, head].long()
        ends = torch.clamp(starts + MINFERENCE_BLOCK, max=length)
        tiles = causal_pairs_in_rects(p0, p1, starts, ends)
        tiles = torch.where(tile_slots < block_count[:, head, :, None], tiles, 0).sum(dim=(-2, -1))
        columns = causal_pairs_in_columns(p0, p1, column_index[:, head].long())
        columns = torch.where(column_slots < column_count[:, head, :, None], columns, 0).sum(dim=(-2, -1))
        per_head.append(tiles + columns)
    return torch.stack(per_head, dim=1)


def _listed_keys(starts: torch.Tensor, ends: torch.Tensor, ranges_ok: torch.Tensor, columns: torch.Tensor,
                 columns_ok: torch.Tensor, length: int) -> torch.Tensor:
    """``[..., L]`` bool: keys inside any valid ``[start, end)`` (``[..., R]``) or listed as a valid
    column (``[..., C]``). A difference array, so memory stays O(L) per row whatever ``R`` is (at 128K
    a row can hold thousands of ranges)."""
    shape = (*starts.shape[:-1], length + 1)
    delta = torch.zeros(shape, dtype=torch.int32, device=starts.device)
    weight = ranges_ok.to(torch.int32)
    delta.scatter_add_(-1, torch.clamp(starts.long(), 0, length), weight)
    delta.scatter_add_(-1, torch.clamp(ends.long(), 0, length), -weight)
    listed = delta.cumsum(dim=-1)[..., :length] > 0
    hits = torch.zeros(shape, dtype=torch.int32, device=starts.device)
    hits.scatter_add_(-1, torch.where(columns_ok, columns.long(), length), columns_ok.to(torch.int32))
    return listed | (hits[..., :length] > 0)


def minference_block_keys(block_count: torch.Tensor, block_offset: torch.Tensor, column_count: torch.Tensor,
                          column_index: torch.Tensor, blocks: torch.Tensor, length: int) -> torch.Tensor:
    """``[B, H, len(blocks), L]`` bool: keys MInference's index lists for the query blocks ``blocks``
    (no causal mask applied)."""
    offsets = block_offset[:, :, blocks]
    tiles_ok = torch.arange(offsets.shape[-1], device=offsets.device) < block_count[:, :, blocks, None]
    columns = column_index[:, :, blocks]
    columns_ok = torch.arange(columns.shape[-1], device=columns.device) < column_count[:, :, blocks, None]
    return _listed_keys(offsets, offsets.long() + MINFERENCE_BLOCK, tiles_ok, columns, columns_ok, length)


def index_block_keys(index: VerticalSlashIndex, blocks: torch.Tensor) -> torch.Tensor:
    """``[B, H, len(blocks), Lk]`` bool: keys our ``VerticalSlashIndex`` lists for the query blocks
    ``blocks`` (the rows of ``index.to_dense_mask`` without the ``L x L`` tensor)."""
    column_count, column_index = index.block_columns(blocks)
    columns_ok = torch.arange(column_index.shape[-1], device=column_index.device) < column_count[..., None]
    range_count, range_start, range_end = index.block_ranges(blocks)
    ranges_ok = torch.arange(range_start.shape[-1], device=range_start.device) < range_count[..., None]
    return _listed_keys(range_start, range_end, ranges_ok, column_index, columns_ok, index.k_len)


def block_rows_reference(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, keys: torch.Tensor,
                         blocks: torch.Tensor, block_q: int, scale: float,
                         kv_head_index: torch.Tensor, round_scaled_queries: bool = False) -> torch.Tensor:
    """fp32 causal attention of the query blocks ``blocks`` over the listed ``keys [B, H, nb, Lk]``.

    q ``[B, H, L, D]`` (self-attention), k/v ``[B, Hkv, L, D]``; returns ``[B, H, nb, block_q, D]``
    (rows past the prompt are zero). ``round_scaled_queries``: round ``q * scale * log2(e)`` to q's
    dtype first, as MInference's kernel does before its dot product. On logits of 10-15 (sinks) that
    rounding alone moves bf16 outputs by about 0.025, more than the kernel tests' tolerance, so a
    check of which keys a kernel attends must model it rather than loosen the tolerance."""
    length = q.shape[2]
    rows = blocks[:, None] * block_q + torch.arange(block_q, device=q.device)  # [nb, block_q]
    row_ok = rows < length
    rows = torch.clamp(rows, max=length - 1)
    causal = torch.arange(length, device=q.device) <= rows[..., None]  # [nb, block_q, Lk]
    heads = []
    for head in range(q.shape[1]):  # one head at a time: [nb, block_q, Lk] fp32 logits at 128K
        qf = q[:, head, rows].float()  # [B, nb, block_q, D]
        kf, vf = k[:, kv_head_index[head]].float(), v[:, kv_head_index[head]].float()  # [B, Lk, D]
        if round_scaled_queries:
            qf = (qf * (scale * LOG2_E)).to(q.dtype).float()
            logits = torch.einsum("bnqd,bkd->bnqk", qf, kf) / LOG2_E
        else:
            logits = torch.einsum("bnqd,bkd->bnqk", qf, kf) * scale
        logits = logits.masked_fill(~(keys[:, head, :, None, :] & causal), float("-inf"))
        heads.append(torch.einsum("bnqk,bkd->bnqd", torch.softmax(logits, dim=-1).nan_to_num(0.0), vf))
    return torch.stack(heads, dim=1) * row_ok[..., None]


def gather_block_rows(out: torch.Tensor, blocks: torch.Tensor, block_q: int) -> torch.Tensor:
    """``out [B, H, L, D]`` -> ``[B, H, nb, block_q, D]`` rows of the query blocks ``blocks``."""
    length = out.shape[2]
    rows = blocks[:, None] * block_q + torch.arange(block_q, device=out.device)
    gathered = out[:, :, torch.clamp(rows, max=length - 1)].float()
    return gathered * (rows < length)[..., None]


__all__ = [
    "MINFERENCE_BLOCK",
    "MInferenceKernels",
    "PEER_PAD",
    "PeerUnavailable",
    "block_rows_reference",
    "gather_block_rows",
    "index_block_keys",
    "load_minference",
    "minference_block_keys",
    "minference_lines",
    "minference_pairs",
]
