"""The memory soak script end to end, at a tiny budget (its real run is docs/benchmarks/memory-soak-cpu.md)."""

from __future__ import annotations

from benchmarks.memory_soak import main


def test_memory_soak_reports_rss_against_the_budget(tiny_checkpoint, tmp_path):
    main(["--model", str(tiny_checkpoint), "--budget-gb", "0.001", "--requests", "12", "--prompt-tokens", "16",
          "--warmup", "4", "--allocators", "glibc", "glibc-mmap-128k", "--out", str(tmp_path)])
    report = (tmp_path / "memory-soak-cpu.md").read_text()
    rows = [line for line in report.splitlines() if line.startswith("| glibc")]
    assert len(rows) == 2 and "over budget" in report
    assert all("MiB" in row and "x |" in row for row in rows)  # RSS, and CPU time relative to glibc
