"""The two estimate paths written at stop 37 and still off, on one layer's real q/k, beside the shipped ones.

For a vertical-slash pattern on captured ``q [B, H, L, D]``, ``k [B, Hkv, L, D]`` (``real_speed.py``'s
timing part calls this per layer):

* line selection: ``select_line_kinds_triton`` by sort (shipped) and by search (``LINE_SELECT_BY_SEARCH``)
  on the estimate's own scores, masses and caps; times, and how many rows kept a different count
  (exact scores agree; real ones may differ at the boundary line, ``tests/kernels/test_triton_select.py``);
* index conversion: ``build_vertical_slash_index_triton`` from visible diagonals and from head runs
  (``INDEX_FROM_HEAD_RUNS``, shipped since stop 39) on the estimate's own lines, with its range pieces; times, and whether
  both list the same ranges and columns (they must);
* per-head ranges (``ranges_per_head=True``, stop 40, off in the default's per-block layout): the
  conversion and the attention reading them, beside the shipped per-block ranges, and whether they list
  the same pairs;
* the estimate with heads routed dense from their lines (``routed_estimate(from_lines=True)``, the
  default since stop 39: ``DENSE_HEADS_FROM_LINES``; heads whose lines alone reach the break-even get no index rows), against ``estimate_index`` (every head's rows), and how many heads
  it routed from their lines;
* the held-out recall check (``unpredictable_heads``) with its keys split across programs at several widths
  (``RECALL_SPLIT_KEYS`` is 8192, chosen at 128K where 8 checked blocks gave 112 programs): at 32K four
  checked blocks and 8192-key splits give a few hundred programs, each walking its keys twice in turn.

Both are measured as the estimate launches them (no host read added); the times are do_bench medians
through the caller's ``timed_ms``.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from conversion_timing import same_index  # this folder is on sys.path
from sparseprefill.kernels.vertical_slash.select import KEEP_ALL_MASS
from sparseprefill.kernels.vertical_slash.triton_attention import vertical_slash_attention_triton
from sparseprefill.kernels.vertical_slash.triton_index import build_vertical_slash_index_triton
from sparseprefill.kernels.vertical_slash.triton_recall import block_recall_triton
from sparseprefill.kernels.vertical_slash.triton_select import select_line_kinds_triton
from sparseprefill.kernels.geometry import causal_pairs_total
from sparseprefill.patterns.cost import dense_break_even
from sparseprefill.patterns.vertical_slash import heldout_window_ends

SELECT_METHODS = ("sort", "search")
BUILDERS = {"convert_diagonals": False, "convert_head_runs": True}
RECALL_SPLITS = (2048, 4096, 8192)


def variant_times(pattern, q: torch.Tensor, k: torch.Tensor, kw: dict,
                  timed_ms: Callable[[Callable[[], object]], float]) -> tuple[dict[str, float], dict[str, str]]:
    """``({op: ms}, {op: note})`` for ``select_sort``, ``select_search``, ``convert_diagonals``,
    ``convert_head_runs``, ``convert_head_ranges``, ``attend_block_ranges``, ``attend_head_ranges``,
    ``estimate_routed`` and ``heldout_split_N`` on this layer (``kw``: scale, softcap, kv_head_index); notes say whether the
    variant's output equals the shipped one."""
    scores, forced, masses, caps = pattern.selection_inputs(q, k, **kw)
    # What select_line_kinds hands the kernel.
    scores, forced = scores.float().clamp_min(0.0), forced.expand_as(scores)
    times, notes, picked = {}, {}, {}
    for method in SELECT_METHODS:
        run = lambda method=method: select_line_kinds_triton(scores, forced, masses, caps,  # noqa: E731
                                                             KEEP_ALL_MASS, method=method)
        picked[method] = run()
        times[f"select_{method}"] = timed_ms(run)
    (count_sort, index_sort), (count_search, index_search) = picked["sort"], picked["search"]
    differ = count_sort != count_search
    slots = (torch.arange(index_sort.shape[-1], device=index_sort.device) < count_sort[..., None])[~differ]
    lists_equal = bool(torch.equal(index_sort[~differ][slots], index_search[~differ][slots]))
    notes["select_search"] = (f"rows with another count {int(differ.sum())} of {differ.numel()} (largest "
                              f"difference {int((count_sort - count_search).abs().max())}); lists equal "
                              f"where counts agree: {lists_equal}")
    lines = pattern.estimate_lines(q, k, **kw)
    built = {}
    for op, head_runs in BUILDERS.items():
        build = lambda head_runs=head_runs: build_vertical_slash_index_triton(  # noqa: E731
            lines.vertical_index, lines.vertical_count, lines.slash_offset, lines.slash_count,
            q_len=lines.q_len, k_len=lines.k_len, block_size_q=lines.block_size_q, slashes_sorted=True,
            max_range_keys=pattern.range_piece_keys(q), head_runs=head_runs)
        built[op] = build()
        times[op] = timed_ms(build)
    notes["convert_head_runs"] = f"same index as convert_diagonals: {same_index(*built.values())}"
    # Per-head ranges (stop 40): the conversion without per-block range lists, and the attention reading
    # them (v = k: the same shape and work; timing only), beside the shipped per-block layout.
    cut = pattern.range_piece_keys(q)
    head_ranges = lambda: build_vertical_slash_index_triton(  # noqa: E731
        lines.vertical_index, lines.vertical_count, lines.slash_offset, lines.slash_count, q_len=lines.q_len,
        k_len=lines.k_len, block_size_q=lines.block_size_q, slashes_sorted=True, max_range_keys=cut,
        ranges_per_head=True)
    built["convert_head_ranges"] = head_ranges()
    times["convert_head_ranges"] = timed_ms(head_ranges)
    shipped, per_head = built["convert_head_runs"], built["convert_head_ranges"]
    same_pairs = bool(torch.equal(shipped.block_pairs, per_head.block_pairs))
    notes["convert_head_ranges"] = (f"same pair counts per block: {same_pairs}; same lists: "
                                    f"{same_index(shipped, per_head.with_block_ranges()) if cut is None else 'pieces differ where clipped'}")
    out = torch.empty_like(q)
    for op, index in (("attend_block_ranges", shipped), ("attend_head_ranges", per_head)):
        times[op] = timed_ms(lambda index=index: vertical_slash_attention_triton(
            q, k, k, index, scale=kw["scale"], window=None, softcap=kw["softcap"],
            kv_head_index=kw["kv_head_index"], out=out))
    reference_out = vertical_slash_attention_triton(q, k, k, shipped, scale=kw["scale"], window=None,
                                                    softcap=kw["softcap"], kv_head_index=kw["kv_head_index"],
                                                    out=torch.empty_like(q))
    difference = (out.float() - reference_out.float()).abs().max()
    notes["attend_head_ranges"] = f"largest difference from attend_block_ranges: {float(difference):.2e}"
    dense_pairs = dense_break_even(pattern.name, q.shape[-1]) * causal_pairs_total(q.shape[2], k.shape[2])
    _, known_dense = pattern.routed_estimate(q, k, dense_pairs, from_lines=True, **kw)
    times["estimate_routed"] = timed_ms(lambda: pattern.routed_estimate(q, k, dense_pairs, from_lines=True, **kw))
    notes["estimate_routed"] = f"heads routed dense from their lines: {int(known_dense.sum())} of {known_dense.numel()}"
    index = built["convert_diagonals"]
    cfg = pattern.config
    ends = heldout_window_ends(q.shape[2], cfg.last_queries, cfg.query_windows)
    blocks = torch.tensor(sorted({(end - 1) // index.block_size_q for end in ends}))
    if blocks.numel():
        recalls = {}
        for split in RECALL_SPLITS:
            check = lambda split=split: block_recall_triton(q, k, index, blocks, split_keys=split, **kw)  # noqa: E731
            recalls[split] = check()
            times[f"heldout_split_{split}"] = timed_ms(check)
        for split, recall in recalls.items():
            difference = (recall - recalls[RECALL_SPLITS[-1]]).abs().max()
            notes[f"heldout_split_{split}"] = f"{blocks.numel()} blocks; largest recall difference {float(difference):.2e}"
    return times, notes


__all__ = ["variant_times"]
