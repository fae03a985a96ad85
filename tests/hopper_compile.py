"""Compile the package's Triton kernels for Hopper (sm_90) on a machine without a GPU.

Triton's CPU interpreter runs kernels the compiler would reject (a kernel that reads a module-level
int that is not ``tl.constexpr`` runs interpreted and fails to compile on the GPU), so the interpreter
tests alone cannot vouch that a kernel builds. Two processes:

``record OUT``: with the interpreter on, run every launcher once on small inputs (the launches a
patched model makes: estimate, selection, index, attention, recall, fused lines, block-sparse) and
write each launch's kernel, argument types and constexprs to ``OUT``;
``compile OUT``: with the interpreter off, compile each recorded launch ahead of time for sm_90 with
Triton's bundled ``ptxas``, as recorded (fp32, ``UPCAST``) and as on the GPU (bf16 q/k/v/out,
``UPCAST=False``). Exit status 1 if any fails.

    python -m tests.hopper_compile record /tmp/launches.json && python -m tests.hopper_compile compile /tmp/launches.json
"""

from __future__ import annotations

import importlib
import json
import os
import sys

HOPPER = ("cuda", 90, 32)  # GPUTarget(backend, compute capability, warp size)
# Shared memory one block may use on the H100 / H200 (227 KiB opt-in); a kernel over it compiles but
# fails at launch ("out of resource: shared memory"), which only launches with the GPU's own options show.
HOPPER_SHARED_BYTES = 232448
LAUNCH_OPTIONS = ("num_warps", "num_stages")
GPU_DTYPE_ARGS = ("Q", "K", "V", "Out", "KDesc", "VDesc")  # arguments that hold bf16 on the GPU


def _arg_type(value) -> str:
    import torch

    dtypes = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16", torch.int32: "i32",
              torch.int64: "i64", torch.int8: "i8", torch.bool: "i1"}
    if isinstance(value, torch.Tensor):
        return "*" + dtypes[value.dtype]
    if type(value).__name__ == "TensorDescriptor":  # a TMA descriptor: its element type and box
        return f"tensordesc<{dtypes[value.base.dtype]}{list(value.block_shape)}>"
    if isinstance(value, bool):
        return "i1"
    if isinstance(value, int):
        return "i64" if abs(value) >= 2**31 else "i32"
    if isinstance(value, float):
        return "fp32"
    raise TypeError(f"unexpected kernel argument of type {type(value).__name__}")


def _specialised_to_one(value) -> bool:
    """Triton compiles an integer argument equal to 1 as the constant 1 (unless the kernel lists it in
    ``do_not_specialize``): a kernel that calls a tensor method on it (``.to()``) compiles for other values
    and fails for this one, which the interpreter never shows."""
    return isinstance(value, int) and not isinstance(value, bool) and value == 1


def _run_launches() -> None:
    import torch

    from sparseprefill.kernels import select_blocks
    from sparseprefill.kernels.block_sparse.triton_antidiagonal import antidiagonal_block_mass_triton
    from sparseprefill.kernels.block_sparse.triton_attention import block_sparse_attention_triton
    from sparseprefill.kernels.block_sparse.triton_pooled import pooled_block_probs_triton
    from sparseprefill.kernels.block_sparse.triton_recall import block_sparse_recall_triton
    from sparseprefill.kernels.common import compact
    from sparseprefill.kernels.vertical_slash import vertical_slash_lines
    from sparseprefill.kernels.vertical_slash.triton_attention import vertical_slash_attention_triton
    from sparseprefill.kernels.vertical_slash.triton_estimate import vertical_slash_scores_triton
    from sparseprefill.kernels.vertical_slash.triton_index import build_vertical_slash_index_triton
    from sparseprefill.kernels.vertical_slash.triton_lines import vertical_slash_lines_attention_triton
    from sparseprefill.kernels.vertical_slash.triton_lines_bound import lines_pairs_lower_bound_triton
    from sparseprefill.kernels.vertical_slash.triton_recall import block_recall_triton
    from sparseprefill.kernels.vertical_slash.triton_select import select_line_kinds_triton
    from sparseprefill.kernels.block_sparse.triton_select import select_blocks_triton

    g = torch.Generator().manual_seed(0)
    hq, hkv, length = 4, 2, 200
    kvh = torch.arange(hq) // (hq // hkv)
    vc, vi = compact(torch.rand(1, hq, length, generator=g) < 0.1)
    sc, so = compact(torch.rand(1, hq, length, generator=g) < 0.1)
    index = build_vertical_slash_index_triton(vi, vc, so, sc, q_len=length, k_len=length, block_size_q=64)
    pieces = build_vertical_slash_index_triton(vi, vc, so, sc, q_len=length, k_len=length, block_size_q=64,
                                               max_range_keys=32)
    head_columns = build_vertical_slash_index_triton(vi, vc, so, sc, q_len=length, k_len=length, block_size_q=64,
                                                     column_layout="head")  # per-head ranges with them
    head_pieces = build_vertical_slash_index_triton(vi, vc, so, sc, q_len=length, k_len=length, block_size_q=64,
                                                    column_layout="head", max_range_keys=32)
    head_columns_only = build_vertical_slash_index_triton(vi, vc, so, sc, q_len=length, k_len=length,
                                                          block_size_q=64, column_layout="head", ranges_per_head=False)
    build_vertical_slash_index_triton(vi, vc, so, sc, q_len=length, k_len=length, block_size_q=64, head_runs=True)
    lines_pairs_lower_bound_triton(so, sc, vi, vc, q_len=length, k_len=length, block_size_q=64)
    lines = vertical_slash_lines(vi, vc, so, sc, q_len=length, k_len=length, block_size_q=64)
    n_blocks = -(-length // 64)
    blocks = select_blocks(torch.rand(1, hq, n_blocks, n_blocks, generator=g), q_len=length, k_len=length,
                           block_size_q=64, block_size_k=64, mass=0.5)
    for method in ("sort", "search"):
        select_line_kinds_triton(torch.rand(2, 1, hq, length, generator=g),
                                 torch.zeros(2, 1, 1, length, dtype=torch.bool), [0.9, 0.9], [None, 10], 1.0,
                                 method=method)
        # One line per row and one row per kind: arguments equal to 1, which Triton compiles as constants.
        select_line_kinds_triton(torch.rand(2, 1, 1, 1, generator=g), torch.zeros(2, 1, 1, 1, dtype=torch.bool),
                                 [0.9, 0.9], [None, 1], 1.0, method=method)
    lines_pairs_lower_bound_triton(*compact(torch.ones(1, 1, 1, dtype=torch.bool))[::-1],
                                   *compact(torch.ones(1, 1, 1, dtype=torch.bool))[::-1], q_len=1, k_len=1,
                                   block_size_q=64)
    # The per-head range tables of one line per kind: one run, one piece, one slot (all arguments 1).
    build_vertical_slash_index_triton(*compact(torch.ones(1, 1, 1, dtype=torch.bool))[::-1],
                                      *compact(torch.ones(1, 1, 1, dtype=torch.bool))[::-1], q_len=1, k_len=1,
                                      block_size_q=64, column_layout="head", max_range_keys=32)
    # The block selection on a short row (4 warps) and on a row past SMALL_ROW_BLOCKS (8 warps).
    select_blocks_triton(torch.rand(1, hq, n_blocks, n_blocks, generator=g), q_len=length, k_len=length,
                         block_size_q=64, block_size_k=64, mass=0.9, sink_blocks=1)
    select_blocks_triton(torch.rand(1, 1, 1, 2048, generator=g), q_len=16, k_len=2048 * 16, block_size_q=16,
                         block_size_k=16, mass=0.9, sink_blocks=1)
    # head_dim 64 with and without window and soft-cap; 128 (other tile sizes and stages) plain.
    for head_dim, window, softcap in ((64, None, None), (64, 50, 30.0), (128, None, None)):
        q, k, v = (torch.randn(1, h, length, head_dim, generator=g) for h in (hq, hkv, hkv))
        kw = dict(scale=head_dim**-0.5, softcap=softcap, kv_head_index=kvh)
        vertical_slash_attention_triton(q, k, v, index, window=window, out=torch.empty_like(q), **kw)
        vertical_slash_attention_triton(q, k, v, pieces, window=window, out=torch.empty_like(q), **kw)
        if window is not None:  # the other load path and the per-head columns, once (compiles are slow)
            for head_index in (head_columns, head_pieces, head_columns_only):
                vertical_slash_attention_triton(q, k, v, head_index, window=window, out=torch.empty_like(q), **kw)
            for tma in (False, True):  # both load paths, whatever the shipped default
                vertical_slash_attention_triton(q, k, v, index, window=window, out=torch.empty_like(q),
                                                range_tma=tma, **kw)
                block_sparse_attention_triton(q, k, v, blocks, window=window, out=torch.empty_like(q),
                                              block_tma=tma, **kw)
        block_sparse_attention_triton(q, k, v, blocks, window=window, out=torch.empty_like(q), **kw)
        vertical_slash_lines_attention_triton(q, k, v, lines, window=window, out=torch.empty_like(q),
                                              lines_sorted=True, **kw)
        block_recall_triton(q, k, index, torch.tensor([0, n_blocks - 1]), **kw)
        block_sparse_recall_triton(q, k, blocks, torch.tensor([0, n_blocks - 1]), **kw)
        vertical_slash_scores_triton(q, k, last_queries=32, query_windows=4, **kw)
        for sweeps in (1, 2):
            antidiagonal_block_mass_triton(q, k, stride=8, block_size=128, sweeps=sweeps, **kw)
        antidiagonal_block_mass_triton(q, k, stride=8, block_size=128, sampled=True, **kw)
        pooled_block_probs_triton(q, k, block_size=64, **kw)
    # head_dim 256 with one reshaped row per block (stride = block = 1): the widest operand tiles the
    # antidiagonal launcher picks (64 x 128 groups, the whole head per sampled step: the GPU fuzz's
    # shared-memory failure).
    q, k = (torch.randn(1, h, 64, 256, generator=g) for h in (hq, hkv))
    antidiagonal_block_mass_triton(q, k, stride=1, block_size=1, sampled=True, scale=0.0625, softcap=None,
                                   kv_head_index=kvh)


def record(path: str) -> None:
    os.environ["TRITON_INTERPRET"] = "1"
    import triton.runtime.interpreter as interpreter

    launches = []
    run = interpreter.GridExecutor.__call__

    def recording(self, *args, **kwargs):
        fn = getattr(self.fn, "fn", self.fn)
        names = list(self.arg_names)
        launches.append(dict(module=fn.__module__, name=fn.__name__,
                             signature={n: _arg_type(a) for n, a in zip(names, args)},
                             ones=[n for n, a in zip(names, args) if _specialised_to_one(a)],
                             constexprs={n: kwargs[n] for n in names if n in kwargs},
                             options={n: kwargs[n] for n in LAUNCH_OPTIONS if n in kwargs}))
        return run(self, *args, **kwargs)

    interpreter.GridExecutor.__call__ = recording
    _run_launches()
    with open(path, "w") as f:
        json.dump(launches, f)


def compile_all(path: str) -> int:
    if os.environ.get("TRITON_INTERPRET"):
        raise SystemExit("compile needs the interpreter off (unset TRITON_INTERPRET)")
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    with open(path) as f:
        launches = json.load(f)
    done, failed = set(), []
    for launch in launches:
        kernel = getattr(importlib.import_module(launch["module"]), launch["name"])
        unspecialised = {p.name for p in kernel.params if p.do_not_specialize}
        ones = {n: 1 for n in launch.get("ones", []) if n not in unspecialised}
        # Constexprs a launcher leaves at their defaults compile as those defaults, as on the GPU.
        defaults = {p.name: p.default for p in kernel.params
                    if p.is_constexpr and p.has_default and p.name not in launch["constexprs"]}
        launch["constexprs"] = dict(defaults, **launch["constexprs"])
        variants = [(launch["signature"], dict(launch["constexprs"], **ones))]
        if "UPCAST" in launch["constexprs"]:
            on_gpu = {n: t.replace("fp32", "bf16", 1) if n in GPU_DTYPE_ARGS and "fp32" in t else t
                      for n, t in launch["signature"].items()}
            variants.append((on_gpu, dict(launch["constexprs"], UPCAST=False, **ones)))
        for signature, constexprs in variants:
            key = json.dumps([launch["name"], signature, constexprs], sort_keys=True)
            if key in done:
                continue
            done.add(key)
            full = {n: "constexpr" if n in constexprs else signature[n] for n in kernel.arg_names}
            options = launch.get("options", {})
            try:
                compiled = triton.compile(ASTSource(fn=kernel, signature=full, constexprs=constexprs),
                                          target=GPUTarget(*HOPPER), options=options or None)
            except Exception as error:  # noqa: BLE001 - every failure is listed, then the run fails
                failed.append(f"{launch['name']} {constexprs}: {type(error).__name__}: {str(error).splitlines()[:4]}")
                continue
            # Only launches that pass their GPU options are checked: the others compile with Triton's
            # defaults here, not with what their launcher picks on the GPU.
            if options and compiled.metadata.shared > HOPPER_SHARED_BYTES:
                failed.append(f"{launch['name']} {constexprs} {options}: needs {compiled.metadata.shared} bytes of "
                              f"shared memory, Hopper allows {HOPPER_SHARED_BYTES}")
    print(f"compiled {len(done) - len(failed)} of {len(done)} kernel variants for sm_90")
    for line in failed:
        print("FAILED", line)
    return 1 if failed else 0


if __name__ == "__main__":
    command, out = sys.argv[1], sys.argv[2]
    if command == "record":
        record(out)
    elif command == "compile":
        sys.exit(compile_all(out))
    else:
        raise SystemExit(f"unknown command {command!r}: record or compile")
