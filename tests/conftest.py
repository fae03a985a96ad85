"""Test-session setup.

Without a GPU, Triton kernels can only run in Triton's interpreter, which must be switched on before
triton is first imported; on the GPU machine the compiled kernels run instead."""

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
