"""Test-session setup.

Without a GPU, Triton kernels can only run in Triton's interpreter, which must be switched on before
triton is first imported; on the GPU machine the compiled kernels run instead.

``SPARSEPREFILL_GPU_PROCESSES=N`` (set by the sharded GPU runners) caps each test process at its share
of the GPU's memory: PyTorch's caching allocator frees its own cached blocks before it fails an
allocation, but never another process's, so twelve fuzz processes that each kept several GB cached
made small allocations of their neighbours fail with CUDA out-of-memory errors (stop 26)."""

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
elif os.environ.get("SPARSEPREFILL_GPU_PROCESSES"):
    _processes = int(os.environ["SPARSEPREFILL_GPU_PROCESSES"])
    if _processes < 1:
        raise ValueError(f"SPARSEPREFILL_GPU_PROCESSES must be >= 1, got {_processes}")
    # 10% stays free for the CUDA contexts and Triton's loaded modules, which the cap does not count.
    torch.cuda.set_per_process_memory_fraction(0.9 / _processes)
