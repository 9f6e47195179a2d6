"""benchmarks/server_threads.py without servers: its settings' syntax and its table's ratios."""

from __future__ import annotations

import argparse

import pytest

from benchmarks.server_threads import C32, CHAT, DEFAULT_SETTINGS, ITL, parse_setting, report_lines


def test_settings_parse_into_environments():
    assert parse_setting("2 threads=OMP_NUM_THREADS=2,OMP_WAIT_POLICY=PASSIVE") == (
        "2 threads", {"OMP_NUM_THREADS": "2", "OMP_WAIT_POLICY": "PASSIVE"})
    assert [parse_setting(s)[1]["OMP_NUM_THREADS"] for s in DEFAULT_SETTINGS] == ["1", "2", "2"]
    for bad in ("no-environment", "=OMP_NUM_THREADS=1", "name="):
        with pytest.raises(argparse.ArgumentTypeError):
            parse_setting(bad)


def test_ratios_are_better_than_one_when_the_setting_is_better():
    settings = {"one": {"OMP_NUM_THREADS": "1"}, "two": {"OMP_NUM_THREADS": "2"}}
    results = {"one": {CHAT: [120.0, 130.0, 125.0], ITL: [4.0, 4.0, 4.0], C32: [500.0] * 3},
               "two": {CHAT: [100.0, 99.0, 101.0], ITL: [5.0, 5.0, 5.0], C32: [600.0] * 3}}
    rows = {(line.split(" | ")[0].strip("| "), line.split(" | ")[2]): line.split(" | ")[-1].strip(" |")
            for line in report_lines("m", results, settings, []) if line.startswith("| two")}
    assert rows[("two", CHAT)] == "1.25x"  # 125 ms -> 100 ms: faster first tokens
    assert rows[("two", ITL)] == "0.80x"  # 4 ms -> 5 ms: slower decode
    assert rows[("two", C32)] == "1.20x"  # more tokens/s
