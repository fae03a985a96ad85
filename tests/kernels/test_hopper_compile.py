"""Every Triton kernel a patched model launches compiles for Hopper (sm_90), checked on the CPU
(``tests/hopper_compile.py``): the interpreter tests run kernels the GPU compiler may reject."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

triton = pytest.importorskip("triton", reason="Triton is not importable on this machine")

ROOT = Path(__file__).resolve().parents[2]


def _ptxas_available() -> bool:
    try:
        import triton.backends.nvidia as nvidia
    except ImportError:  # a Triton build without the NVIDIA backend: nothing to compile with
        return False
    return (Path(nvidia.__file__).parent / "bin" / "ptxas").exists()


@pytest.mark.skipif(not _ptxas_available(), reason="Triton's bundled ptxas is not available")
def test_every_launched_kernel_compiles_for_sm90(tmp_path):
    launches = tmp_path / "launches.json"
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_CACHE_DIR"] = str(tmp_path / "cache")
    env.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
    run = dict(cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    recorded = subprocess.run([sys.executable, "-m", "tests.hopper_compile", "record", str(launches)], **run)
    assert recorded.returncode == 0, recorded.stderr[-3000:]
    compiled = subprocess.run([sys.executable, "-m", "tests.hopper_compile", "compile", str(launches)], **run)
    assert compiled.returncode == 0, compiled.stdout[-3000:] + compiled.stderr[-3000:]
    assert "compiled" in compiled.stdout and "FAILED" not in compiled.stdout
