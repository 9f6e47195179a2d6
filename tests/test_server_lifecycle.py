"""Overload and shutdown against short-lived servers: 429 on a full queue, SIGTERM drain, CLI errors."""

from __future__ import annotations

import json
import subprocess
import sys
import threading
import time

import httpx
from test_server_support import ServerProcess, metric, metric_values


def stream_in_background(url: str, body: dict, results: list, started: threading.Event | None = None
                         ) -> threading.Thread:
    """Stream a completion in a thread; appends (status, [choices...], raw tail) to ``results``."""

    def run() -> None:
        choices, tail = [], b""
        with httpx.stream("POST", f"{url}/v1/completions", json={**body, "stream": True}, timeout=60) as response:
            for line in response.iter_lines():
                if started is not None:
                    started.set()
                if line.startswith("data: {"):
                    choices.extend(json.loads(line[6:])["choices"])
                tail = line.encode() or tail
            results.append((response.status_code, choices, tail))

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return thread


def test_full_queue_gets_429_then_sigterm_drains(tiny_checkpoint):
    server = ServerProcess(tiny_checkpoint, "--max-num-seqs", "1", "--max-num-batched-tokens", "64",
                           "--max-queued-requests", "1", "--shutdown-timeout", "1.5")
    try:
        url = server.url
        endless = {"prompt": "forever", "max_tokens": 1_000_000, "ignore_eos": True, "temperature": 0}
        results: list = []
        started = threading.Event()
        running = stream_in_background(url, endless, results, started)  # holds the only slot
        assert started.wait(30)
        waiting = stream_in_background(url, endless, results)  # fills the queue
        deadline = time.monotonic() + 30
        while metric(metric_values(url), "miras:num_requests_waiting") != 1:
            assert time.monotonic() < deadline
            time.sleep(0.05)
        rejected = httpx.post(f"{url}/v1/completions", json={"prompt": "x", "max_tokens": 2}, timeout=30)
        assert rejected.status_code == 429 and rejected.headers["retry-after"] == "1"
        assert rejected.json()["error"]["type"] == "rate_limit_error"

        server.terminate()
        deadline = time.monotonic() + 10
        while httpx.get(f"{url}/health", timeout=5).status_code == 200:  # readiness flips while draining
            assert time.monotonic() < deadline
            time.sleep(0.02)
        assert httpx.get(f"{url}/health", timeout=5).json()["error"]["code"] == "draining"
        refused = httpx.post(f"{url}/v1/completions", json={"prompt": "x", "max_tokens": 2}, timeout=5)
        assert refused.status_code == 503
        running.join(30)
        waiting.join(30)
        assert server.wait(30) == 0
    finally:
        server.kill()
    assert len(results) == 2
    for status, choices, tail in results:  # both cut at the deadline: finish_reason abort, then [DONE]
        assert status == 200 and tail == b"data: [DONE]"
        assert choices[-1]["finish_reason"] == "abort"


def test_sigterm_lets_short_requests_finish(tiny_checkpoint):
    server = ServerProcess(tiny_checkpoint, "--shutdown-timeout", "20")
    try:
        results: list = []
        started = threading.Event()
        body = {"prompt": "short", "max_tokens": 300, "ignore_eos": True, "temperature": 0}
        thread = stream_in_background(server.url, body, results, started)
        assert started.wait(30)
        server.terminate()
        thread.join(30)
        assert server.wait(30) == 0
    finally:
        server.kill()
    ((status, choices, tail),) = results
    assert status == 200 and tail == b"data: [DONE]" and choices[-1]["finish_reason"] == "length"


def test_cli_reports_a_missing_model_clearly(tmp_path):
    result = subprocess.run([sys.executable, "-m", "miras_serve.server.cli", "--model", str(tmp_path / "nope")],
                            capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert result.returncode != 0
    assert "cannot load model" in result.stderr and "nope" in result.stderr
