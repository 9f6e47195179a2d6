"""Two source trees measured side by side: a baseline revision's files and this checkout, each run in worker
processes from an import root of its own, so each tree is measured by its own code (shared by the benchmarks
that compare against a revision: engine_host, server_overhead)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

from benchmarks import report

PACKAGES = ("models", "kernels", "server", "loadtest")  # pyproject's package-dir mapping under miras_serve


def export(rev: str, into: Path) -> Path:
    """The files of ``rev`` (``git archive``) under ``into``."""
    archive = subprocess.run(["git", "archive", rev], cwd=report.CHECKOUT, capture_output=True, check=True).stdout
    into.mkdir(parents=True)
    subprocess.run(["tar", "-x", "-C", str(into)], input=archive, check=True)
    return into


def import_root(tree: Path, into: Path) -> Path:
    """A folder holding ``miras_serve`` with ``tree``'s top-level packages linked in, and this checkout's
    benchmarks/ (the workers' code). On ``PYTHONPATH`` it comes before the editable install's finder, which
    would otherwise resolve ``miras_serve`` to this checkout whatever the tree."""
    init = tree / "miras_serve" / "__init__.py"
    if not init.exists():
        raise SystemExit(f"{tree} predates the miras_serve import root: it cannot be measured side by side")
    package = into / "miras_serve"
    package.mkdir(parents=True)
    shutil.copy(init, package / "__init__.py")
    for name in PACKAGES:
        (package / name).symlink_to(tree / name, target_is_directory=True)
    shutil.copytree(Path(__file__).resolve().parent, into / "benchmarks")
    return into


def run_worker(root: Path, module: str, *args: str) -> dict[str, float]:
    """``python -m module --worker *args`` from ``root`` on one torch thread; the JSON of its last line."""
    env = {**os.environ, "PYTHONPATH": str(root), "OMP_NUM_THREADS": "1"}
    out = subprocess.run([sys.executable, "-m", module, "--worker", *args], env=env, cwd=root,
                         capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])
