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


def _compile_check(*args: str) -> list[list[str]]:
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    result = subprocess.run([sys.executable, "-m", "benchmarks.compile_check", *args],
                            cwd=Path(__file__).resolve().parent.parent, env=env, capture_output=True, text=True,
                            timeout=900)
    assert result.returncode == 0, result.stdout + result.stderr
    return [line.split() for line in result.stdout.splitlines()[1:]]


def test_compiles_for_sm90_within_the_register_file():
    """Moneta on both state layouts, Memora (its lag-token boundary map in the slab prefill's softmax phase and
    in the factored fold) factored; the slab-parallel prefill's phases without spills."""
    lines = (_compile_check("--presets", "moneta", "--layouts", "running")
             + _compile_check("--presets", "moneta", "--layouts", "factored", "--modes", "decode")
             + _compile_check("--presets", "memora", "--layouts", "factored"))
    running = ["scan", "split-forward", "split-update", "split-output"]
    factored = ["factored-fused", "factored-forward", "factored-update", "factored-output"]
    slabs = ["slabs-forward", "slabs-grad", "slabs-update", "slabs-output"]
    assert [tuple(line[:4]) for line in lines] == [
        *[("moneta", "running", "prefill", k) for k in ["scan", "slabs-lag", *slabs]],
        *[("moneta", "running", "decode", k) for k in running],
        *[("moneta", "factored", "decode", k) for k in factored],
        *[("memora", "factored", "prefill", k) for k in ["scan", "slabs-fold", "slabs-lag", "slabs-softmax", *slabs]],
        *[("memora", "factored", "decode", k) for k in factored]]
    assert all(0 < int(line[4]) <= 255 for line in lines)
    spilling = [line for line in lines if line[3].startswith("slabs-") and (int(line[5]) or int(line[6]))]
    assert not spilling, f"the slab-parallel prefill spills registers: {spilling}"
