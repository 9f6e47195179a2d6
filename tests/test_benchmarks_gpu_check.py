"""The GPU check script runs end to end (--smoke: CPU, Triton interpreter, tiny shapes) and writes its
Markdown report with every section."""

from __future__ import annotations

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")  # must precede the first import of triton

import pytest

pytest.importorskip("triton")

from benchmarks import gpu_check  # noqa: E402

pytestmark = pytest.mark.filterwarnings("ignore::RuntimeWarning", "ignore::DeprecationWarning")


def test_smoke_run_writes_report(tmp_path):
    assert gpu_check.main(["--smoke", "--out", str(tmp_path)]) == 0
    (report,) = tmp_path.glob("gpu_check_smoke_*.md")
    text = report.read_text()
    for heading in ("## Correctness against the fp64 reference",
                    "## Dot rounding: the kernel's prefill against the reference's emulation",
                    "## Prefill of one Miras layer",
                    "## Decode: whole model", "## Decode kernels alone: running vs factored",
                    "## Serving over HTTP: miras-serve with the load generator",
                    "## Serving over HTTP: decode after a long vs a short prompt"):
        assert heading in text
    assert "**FAIL**" not in text and "| pass |" in text
    assert "failed" not in text.lower(), "a table row or section failed (its exception is in the report)"
    for layout in ("| running |", "| factored |"):  # the decode kernels of both state layouts ran
        assert layout in text
    assert "| eager (CPU) | 2 | 4 |" in text  # the serve section: every request of the last level completed
    assert "- commit: " in text and "- card: CPU" in text
    # achieved TFLOP/s from the prefill FLOP model (benchmarks.cost), in the layer table and the kernel-alone one
    layer_table = text.split("## Prefill of one Miras layer")[1].split("\n## ")[0]
    rows = [line.strip("|").split(" | ") for line in layer_table.splitlines() if line.startswith("| ")]
    column = rows[0].index("Triton TFLOP/s")
    assert len(rows) > 1 and all(float(row[column]) > 0 for row in rows[1:])  # the header, then the shapes
    kernel_alone = [line for line in text.splitlines() if "| prefill | " in line]
    assert kernel_alone and all(float(line.split(" Mtok/s, ")[1].split(" TFLOP/s")[0]) > 0 for line in kernel_alone)
