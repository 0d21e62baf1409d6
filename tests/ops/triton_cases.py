"""Running a test file's Triton cases: on a GPU in the pytest process; on CPU in a fresh `pytest` process started with
TRITON_INTERPRET=1 (the interpreter is read when triton is first imported, and other imports, megatron.core among
them, import triton early), where the cases are skipped in the parent."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
RUNNABLE_HERE = DEVICE == "cuda" or os.environ.get("TRITON_INTERPRET") == "1"
needs_kernels = pytest.mark.skipif(not RUNNABLE_HERE, reason="runs in test_cases_under_interpreter's subprocess")
only_in_the_parent = pytest.mark.skipif(RUNNABLE_HERE, reason="the cases run in this process")
only_without_kernels = pytest.mark.skipif(RUNNABLE_HERE, reason="a machine without a GPU or the interpreter only")


def run_cases_under_interpreter(test_file: str, expected_summary: str) -> None:
    """pytest `test_file` with TRITON_INTERPRET=1; it must pass with `expected_summary` (e.g. "7 passed, 2 skipped")."""
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    result = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", test_file],
                            env=env, capture_output=True, text=True)
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-2000:]
    assert expected_summary in result.stdout, result.stdout[-2000:]
