"""The scan kernel compiles for the H100/H200 (sm_90) without a GPU, with the shipped launch
configuration, prefill and decode. Runs Triton's real compiler and the ptxas shipped in the triton
wheel (the interpreter, which the other kernel tests use, never compiles anything)."""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest

# Only look for triton: importing it here, before the interpreter tests set TRITON_INTERPRET, would
# leave triton's own jitted builtins (tl.sum, ...) compiled-mode for the rest of the session.
pytestmark = pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="triton is not installed")


def test_compiles_for_sm90_within_the_register_file():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    result = subprocess.run([sys.executable, "-m", "kernels.compile_check", "--presets", "moneta", "memora"],
                            cwd=Path(__file__).resolve().parent.parent, env=env, capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 0, result.stdout + result.stderr
    lines = [line.split() for line in result.stdout.splitlines()[1:]]
    decode = ["scan", "split-forward", "split-update", "split-output"]
    assert [tuple(line[:3]) for line in lines] == [
        *[("moneta", "prefill", "scan")], *[("moneta", "decode", k) for k in decode],
        *[("memora", "prefill", "scan")], *[("memora", "decode", k) for k in decode]]
    assert all(0 < int(line[3]) <= 255 for line in lines)
