"""miras-loadtest against a real miras-serve (the tiny checkpoint) on a free loopback port.

Short runs in correctness mode: normal load, Poisson arrivals, the chat endpoint, and an overload that must
end in completions and clean 429s only, with the server's /metrics agreeing with the client.
"""

from __future__ import annotations

import json

import pytest
from test_server_support import ServerProcess

from miras_serve.loadtest.cli import run_cli

# Small on purpose: 4 state slots and 4 queue places, so 16 closed-loop clients overload it.
SERVER_FLAGS = ["--max-num-seqs", "4", "--max-queued-requests", "4", "--max-num-batched-tokens", "256"]


@pytest.fixture(scope="module")
def server(tiny_checkpoint):
    with ServerProcess(tiny_checkpoint, *SERVER_FLAGS) as process:
        yield process.url


def loadtest(server, tiny_checkpoint, tmp_path, *extra: str) -> tuple[int, dict]:
    status = run_cli(["--base-url", server, "--tokenizer", str(tiny_checkpoint), "--input-len", "uniform:4:40",
                      "--check", "--no-progress", "--result-dir", str(tmp_path), *extra])
    assert status != 2, "miras-loadtest could not run against the server (its error is on stderr)"
    return status, json.loads((tmp_path / "results.json").read_text())


def test_closed_loop_run_is_correct_and_measured(server, tiny_checkpoint, tmp_path):
    status, data = loadtest(server, tiny_checkpoint, tmp_path, "--concurrency", "3", "--num-requests", "9",
                            "--output-len", "fixed:8")
    (level,) = data["levels"]
    assert status == 0, level.get("check")
    assert level["check"]["passed"] and level["summary"]["completed"] == 9
    assert all(r["output_tokens"] == 8 and r["usage_reported"] and r["ttft"] is not None for r in level["results"])
    summary = level["summary"]
    assert summary["output_tokens"] == 72 and summary["ttft_ms"]["count"] == 9 and summary["tpot_ms"]["count"] == 9
    assert summary["request_throughput"] > 0 and summary["peak_concurrency"] <= 3
    assert (tmp_path / "latency_cdf.png").stat().st_size > 0


def test_poisson_arrivals_on_the_chat_endpoint(server, tiny_checkpoint, tmp_path):
    status, data = loadtest(server, tiny_checkpoint, tmp_path, "--endpoint", "chat", "--request-rate", "20",
                            "--num-requests", "6", "--output-len", "uniform:2:6", "--num-warmups", "0")
    (level,) = data["levels"]
    assert status == 0, level.get("check")
    assert level["summary"]["completed"] == 6
    assert [r["output_tokens"] for r in level["results"]] == [r["max_tokens"] for r in level["results"]]


def test_overload_loses_nothing(server, tiny_checkpoint, tmp_path):
    status, data = loadtest(server, tiny_checkpoint, tmp_path, "--concurrency", "16", "--num-requests", "32",
                            "--output-len", "fixed:16", "--num-warmups", "0")
    (level,) = data["levels"]
    assert status == 0, level.get("check")
    summary = level["summary"]
    # 16 clients against 4 slots + 4 queue places: the rest are refused, cleanly, and counted by both sides.
    assert set(summary["errors"]) <= {"http_429"} and summary["errors"].get("http_429", 0) > 0
    assert summary["completed"] + summary["errors"]["http_429"] == 32
    facts = level["check"]["facts"]
    assert facts["server_request_rejected_total_delta"] == summary["errors"]["http_429"]
    assert facts["server_request_success_total_delta"] == summary["completed"]
    assert facts["lost"] == 0 and facts["health"] == 200
