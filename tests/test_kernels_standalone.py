"""kernels/ depends on nothing else in the project: its modules import from a copy of kernels/ alone, and load
no module of models/, server/ or loadtest/ (tests/test_layering.py reads the same rule from the import
statements; this runs them)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("triton")

KERNELS = Path(__file__).resolve().parent.parent / "kernels"
# Every module of kernels/: the runtime ones and the kernel-level test helpers.
MODULES = ["kernels", *sorted(f"kernels.{path.stem}" for path in KERNELS.glob("*.py") if path.stem != "__init__")]


def test_kernels_import_without_the_rest_of_the_project(tmp_path):
    shutil.copytree(KERNELS, tmp_path / "kernels", ignore=shutil.ignore_patterns("__pycache__"))
    script = ("import sys\n"
              f"import {', '.join(MODULES)}\n"
              "kernels.load_scan('cpu')\n"
              "project = sorted(m for m in sys.modules\n"
              "                 if m.split('.')[0] in ('miras_serve', 'models', 'server', 'loadtest'))\n"
              "assert not project, project\n")
    env = {**os.environ, "PYTHONPATH": str(tmp_path), "TRITON_INTERPRET": "1"}
    result = subprocess.run([sys.executable, "-c", script], cwd=tmp_path, env=env, capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 0, result.stderr
