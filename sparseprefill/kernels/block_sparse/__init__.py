"""Block-sparse attention: score ``block_size`` x ``block_size`` blocks (strided antidiagonals as in
XAttention, or mean-pooled q/k), keep blocks by cumulative mass, attend over the kept KV blocks.

Each public function checks its inputs and runs the Triton kernel on CUDA (``triton_*.py``) or its
fp32 reference (``naive.py``) elsewhere. See README.md for the index layout and measured speed.
"""

from __future__ import annotations

import torch

from ..common import (
    check_qkv,
    prepare_sparse_attention,
    resolve_kv_head_index,
)
from ..indices import BlockSparseIndex
from ..mass_select import KEEP_ALL_MASS
from ..recall import checked_recall_blocks
from .columns import blocks_with_columns
from .naive import (
    antidiagonal_block_mass_naive,
    blocks_with_columns_naive,
    block_sparse_attention_naive,
    pooled_block_probs_naive,
    select_blocks_naive,
)

# Rows wider than this many key blocks (2M keys at 128-key blocks) take the sorting reference: the
# Triton selection holds a whole row in registers.
MAX_TRITON_KEY_BLOCKS = 16384

__all__ = ["blocks_with_columns", "blocks_with_columns_naive", "block_sparse_block_recall", "antidiagonal_block_mass", "antidiagonal_block_mass_naive", "pooled_block_probs", "pooled_block_probs_naive", "select_blocks", "select_blocks_naive", "block_sparse_attention", "block_sparse_attention_naive"]

def antidiagonal_block_mass(
    q: torch.Tensor,
    k: torch.Tensor,
    *,
    scale: float,
    stride: int,
    block_size: int,
    softcap: float | None = None,
    kv_head_index: torch.Tensor | None = None,
    alternate: bool = False,
    sampled: bool = False,
) -> torch.Tensor:
    """Estimated attention mass of each ``block_size`` x ``block_size`` block.

    Args:
        q: ``[B, Hq, Lq, D]``; k: ``[B, Hkv, Lk, D]``; ``block_size`` a multiple of ``stride``.
        alternate: odd reshaped rows take their antidiagonal one query earlier. XAttention's fixed
            antidiagonal pairs query ``S m + S - 1 - i`` with key ``S n + i``, offsets ``S - 1 - 2 i``:
            for an even stride only odd offsets, so a slash (a head attending ``q - c`` for a fixed
            ``c``) with an even offset is never sampled. Shifted rows sample the even offsets.
        sampled: score each reshaped row by the softmax mass of its sampled pairs themselves
            (``sum_i exp(s_i)`` per key group over the row's total) instead of XAttention's softmax of
            the mean of the ``S`` logits, which dilutes a spike on one key ``S``-fold in the exponent.
            Same FLOPs, ``S`` exponentials per (row, group) instead of one.

    Returns:
        ``[B, Hq, ceil(Lq / block_size), ceil(Lk / block_size)]`` fp32; each query-block row sums to 1
        over its causally visible blocks.
    """
    _, hq, _, hkv, _, _ = check_qkv(q, k, k)
    if block_size % stride:
        raise ValueError(f"block_size ({block_size}) must be a multiple of stride ({stride})")
    kv_head_index = resolve_kv_head_index(kv_head_index, hq, hkv, q.device)
    if q.device.type == "cuda":
        from .triton_antidiagonal import antidiagonal_block_mass_triton

        return antidiagonal_block_mass_triton(
            q, k, scale=scale, stride=stride, block_size=block_size, softcap=softcap, kv_head_index=kv_head_index,
            alternate=alternate, sampled=sampled,
        )
    return antidiagonal_block_mass_naive(
        q, k, scale=scale, stride=stride, block_size=block_size, softcap=softcap, kv_head_index=kv_head_index,
        alternate=alternate, sampled=sampled,
    )


def pooled_block_probs(
    q: torch.Tensor,
    k: torch.Tensor,
    *,
    scale: float,
    block_size: int,
    softcap: float | None = None,
    kv_head_index: torch.Tensor | None = None,
) -> torch.Tensor:
    """Softmax over causal KV blocks of ``mean(Q block) . mean(K block) * scale``.

    Args:
        q: ``[B, Hq, Lq, D]``; k: ``[B, Hkv, Lk, D]``.

    Returns ``[B, Hq, ceil(Lq / bs), ceil(Lk / bs)]`` fp32, rows summing to 1.
    """
    _, hq, _, hkv, _, _ = check_qkv(q, k, k)
    kv_head_index = resolve_kv_head_index(kv_head_index, hq, hkv, q.device)
    if q.device.type == "cuda":
        from .triton_pooled import pooled_block_probs_triton

        return pooled_block_probs_triton(
            q, k, scale=scale, block_size=block_size, softcap=softcap, kv_head_index=kv_head_index
        )
    return pooled_block_probs_naive(
        q, k, scale=scale, block_size=block_size, softcap=softcap, kv_head_index=kv_head_index
    )


def block_sparse_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    index: BlockSparseIndex,
    *,
    scale: float,
    window: int | None = None,
    softcap: float | None = None,
    kv_head_index: torch.Tensor | None = None,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """Causal attention over the KV blocks listed by ``index``.

    Args:
        q: ``[B, Hq, Lq, D]``; k, v: ``[B, Hkv, Lk, D]``, queries bottom-right aligned to the keys.
        index: ``BlockSparseIndex`` with shape ``[B, Hq, ceil(Lq / block_size_q), N]``.
        scale: softmax scale (the model's ``scaling``).
        window: sliding window (keys ``p - window < j <= p``) or None.
        softcap: Gemma-2 style logit soft-capping ``c * tanh(s / c)`` or None.
        kv_head_index: ``[Hq]`` KV head of each query head; default ``h // (Hq / Hkv)``.
        out: optional ``[B, Hq, Lq, D]`` destination (may be a strided view).

    Returns:
        ``[B, Hq, Lq, D]`` in q's dtype (``out`` if given).
    """
    kv_head_index, out = prepare_sparse_attention(q, k, v, index, index.block_count.shape[:2], kv_head_index, out)
    if q.device.type == "cuda":
        # Imported here so the CPU path never needs Triton; on CUDA it is a dependency, not an option.
        from .triton_attention import block_sparse_attention_triton

        return block_sparse_attention_triton(
            q, k, v, index, scale=scale, window=window, softcap=softcap, kv_head_index=kv_head_index, out=out
        )
    return block_sparse_attention_naive(
        q, k, v, index, scale=scale, window=window, softcap=softcap, kv_head_index=kv_head_index, out=out
    )


def select_blocks(
    block_scores: torch.Tensor,
    *,
    q_len: int,
    k_len: int,
    block_size_q: int,
    block_size_k: int,
    mass: float,
    top_k: int | None = None,
    sink_blocks: int = 1,
    local_blocks: int = 0,
) -> BlockSparseIndex:
    """Scores ``[B, H, Rq, Rk]`` (non-negative, e.g. softmaxed block mass) -> ``BlockSparseIndex``
    keeping, per query-block row, sink + diagonal blocks, the ``local_blocks`` key blocks before the
    diagonal (a local band: a query attending to one key a few hundred positions back is invisible in
    a score averaged over the block's rows) and the best others up to ``mass`` (or the ``top_k`` best
    others). Forced blocks count towards the mass.

    On CUDA the mass rule runs as one Triton launch without a sort (``triton_select.py``), whose lists
    are padded to the full ``Rk`` so the host never reads a count; ``top_k``, a keep-all ``mass`` and
    other devices take the sorting reference (``select_blocks_naive``), whose lists are padded to the
    longest row.
    """
    expected = (-(-q_len // block_size_q), -(-k_len // block_size_k))
    if block_scores.dim() != 4 or tuple(block_scores.shape[-2:]) != expected:
        raise ValueError(f"block_scores {tuple(block_scores.shape)} do not match block grid {expected}")
    if local_blocks < 0 or sink_blocks < 0:
        raise ValueError(f"sink_blocks ({sink_blocks}) and local_blocks ({local_blocks}) must be >= 0")
    if block_scores.device.type == "cuda" and top_k is None and mass < KEEP_ALL_MASS \
            and expected[1] <= MAX_TRITON_KEY_BLOCKS:
        from .triton_select import select_blocks_triton

        return select_blocks_triton(block_scores, q_len=q_len, k_len=k_len, block_size_q=block_size_q,
                                    block_size_k=block_size_k, mass=mass, sink_blocks=sink_blocks,
                                    local_blocks=local_blocks)
    return select_blocks_naive(block_scores, q_len=q_len, k_len=k_len, block_size_q=block_size_q,
                               block_size_k=block_size_k, mass=mass, top_k=top_k, sink_blocks=sink_blocks,
                               local_blocks=local_blocks)


def block_sparse_block_recall(
    q: torch.Tensor,
    k: torch.Tensor,
    index: BlockSparseIndex,
    blocks,
    *,
    scale: float,
    softcap: float | None = None,
    kv_head_index: torch.Tensor | None = None,
    per_row: bool = False,
) -> torch.Tensor:
    """Mean recall of a block-sparse ``index`` on whole query blocks: for each query block ``blocks[i]``,
    the share of each row's exact causal attention mass that the block's kept KV blocks hold, averaged
    over the block's rows (``per_row``: each row's share, not averaged).

    Args:
        q: ``[B, Hq, Lq, D]``; k: ``[B, Hkv, Lk, D]``; index: ``BlockSparseIndex`` over ``Hq`` heads.
        blocks: ``[nb]`` int query-block numbers, on the host (a list or CPU tensor).

    Returns:
        ``[B, Hq, nb]`` fp32 in [0, 1] (``per_row``: ``[B, Hq, nb, block_size_q]``, NaN on rows past the
        prompt). On the GPU the vertical-slash recall kernel reads the checked
        rows as ranges (one per kept KV block) and never holds the ``rows x Lk`` probabilities; the
        reference (``block_recall_naive``) does.
    """
    from ..vertical_slash.naive import block_recall_naive

    kv_head_index, blocks = checked_recall_blocks(q, k, index, blocks, kv_head_index)
    if q.device.type == "cuda":
        from .triton_recall import block_sparse_recall_triton

        return block_sparse_recall_triton(q, k, index, blocks, scale=scale, softcap=softcap,
                                          kv_head_index=kv_head_index, per_row=per_row)
    return block_recall_naive(q, k, index, blocks, scale=scale, softcap=softcap, kv_head_index=kv_head_index,
                              per_row=per_row)
