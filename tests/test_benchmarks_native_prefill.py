"""benchmarks/native_prefill.py: one short run writes its table, both variants timed and their logits equal."""

from __future__ import annotations

import re
import shutil

import pytest

from benchmarks import native_prefill

pytestmark = pytest.mark.skipif(shutil.which("c++") is None and shutil.which("g++") is None,
                                reason="no C++ compiler: the native kernels cannot be built")


def test_a_short_run_writes_both_variants_and_their_logits_agree(tmp_path):
    assert native_prefill.main(["--rounds", "1", "--cached", "70", "--turn", "9", "--prompt", "67",
                                "--out", str(tmp_path)]) == 0
    text = (tmp_path / "native-prefill-cpu.md").read_text()
    rows = [line for line in text.splitlines() if line.startswith("| chat turn") or line.startswith("| a 67")]
    assert len(rows) == 2, text
    for row in rows:
        reference_ms, native_ms, speed_up, diff = row.strip("|").split("|")[1:]
        assert float(reference_ms) > 0 and float(native_ms) > 0
        assert re.fullmatch(r"\d+\.\d\dx", speed_up.strip())
        assert float(diff) < 1e-4, f"the native segments' logits differ from the reference's: {row}"
