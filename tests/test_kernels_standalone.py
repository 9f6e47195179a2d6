"""kernels/ depends on nothing else in the project: its modules import from a copy of kernels/ alone, with
models/, server/ and loadtest/ out of reach."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("triton")

KERNELS = Path(__file__).resolve().parent.parent / "kernels"
# The runtime modules and the kernel-level test helpers (the checks and benchmarks that still sit in kernels/
# import the model and leave for benchmarks/, issue 15).
MODULES = ["kernels", "kernels.rule", "kernels.ops", "kernels.boundary", "kernels.segment", "kernels.decode",
           "kernels.factored", "kernels.prefill", "kernels.scan", "kernels.graphs", "kernels.testing"]


def test_kernels_import_without_the_rest_of_the_project(tmp_path):
    shutil.copytree(KERNELS, tmp_path / "kernels", ignore=shutil.ignore_patterns("__pycache__"))
    script = ("import sys\n"
              f"import {', '.join(MODULES)}\n"
              "kernels.load_scan('cpu')\n"
              "project = sorted(m for m in sys.modules if m.split('.')[0] in ('models', 'server', 'loadtest'))\n"
              "assert not project, project\n")
    env = {**os.environ, "PYTHONPATH": str(tmp_path), "TRITON_INTERPRET": "1"}
    result = subprocess.run([sys.executable, "-c", script], cwd=tmp_path, env=env, capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 0, result.stderr
