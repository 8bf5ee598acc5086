"""The Triton PEER kernels: tests/peer_triton_cases.py, run in Triton's CPU interpreter in a subprocess.

The interpreter has to be switched on (TRITON_INTERPRET=1) before triton is first imported,
so the cases run in a fresh process of their own: the variable and the interpreted kernels
never reach this session's other tests (a GPU test here still gets compiled kernels).
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("triton", reason="Triton is not installed (it has no CPU wheels for macOS or Windows)")

CASES = Path(__file__).with_name("peer_triton_cases.py")


def test_kernels_match_float64_in_the_interpreter():
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", str(CASES)]
    run = subprocess.run(cmd, check=False, cwd=CASES.parents[1], env=env, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stdout[-6000:] + run.stderr[-2000:]
    assert " passed" in run.stdout and "skipped" not in run.stdout, run.stdout[-2000:]


def test_compiled_kernels_only_on_cuda():
    """Imported without the interpreter, the kernels are for CUDA tensors only."""
    from peerlab.model import peer_triton

    if peer_triton.INTERPRETED:
        pytest.skip("TRITON_INTERPRET=1 is set for the whole session")
    assert peer_triton.triton_available("cuda") and not peer_triton.triton_available("cpu")
