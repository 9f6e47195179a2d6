"""Helpers for the HTTP tests: a real ``miras-serve`` process on a free loopback port (no tests here)."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
from prometheus_client.parser import text_string_to_metric_families


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ServerProcess:
    """``python -m server.cli`` in a subprocess; ``stop()`` sends SIGTERM (a drain) and waits.

    Its output goes to a log file, never to an unread pipe: a server that fills a pipe's 64 KiB blocks on
    its next log line (the engine thread included). ``RUNNING`` lists the live servers so that a failing
    test's report carries the logs of the servers alive, or stopped, during it (tests/conftest.py)."""

    STARTED: list[ServerProcess] = []

    def __init__(self, model: Path, *args: str):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        env = {**os.environ, "OMP_NUM_THREADS": "1"}  # 2 shared cores: spin-waiting threads only slow it down
        env.pop("MIRAS_API_KEY", None)
        # --enforce-eager: compiling the decode step takes minutes on a fresh 2-core machine (it has its own
        # tests, tests/test_server_compiled_steps.py)
        cmd = [sys.executable, "-m", "server.cli", "--model", str(model), "--host", "127.0.0.1",
               "--port", str(self.port), "--log-level", "warning", "--enforce-eager", *args]
        # run outside the checkout so imports resolve like an installed package's
        handle, name = tempfile.mkstemp(prefix="miras-serve-", suffix=".log")
        self.log = Path(name)
        with os.fdopen(handle, "w") as log:  # the child keeps its own copy of the descriptor
            self.proc = subprocess.Popen(cmd, env=env, cwd=Path(model).parent, stdout=log,
                                         stderr=subprocess.STDOUT, text=True)
        self.ended_at: float | None = None  # time.time() of the stop, for the failure report
        ServerProcess.STARTED.append(self)
        self.wait_ready()

    def output(self) -> str:
        """Everything the server has printed so far."""
        return self.log.read_text(errors="replace")

    def wait_ready(self, timeout: float = 120.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited with {self.proc.returncode}: {self.output()}")
            try:
                if httpx.get(f"{self.url}/health", timeout=1.0).status_code == 200:
                    return
            except httpx.TransportError:
                pass
            time.sleep(0.1)
        self.kill()
        raise RuntimeError(f"server did not become ready: {self.output()[-4000:]}")

    def terminate(self) -> None:
        self.proc.send_signal(signal.SIGTERM)

    def wait(self, timeout: float = 60.0) -> int:
        try:
            code = self.proc.wait(timeout)
            self.ended_at = self.ended_at or time.time()
            return code
        except subprocess.TimeoutExpired:
            self.kill()
            raise

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        self.ended_at = self.ended_at or time.time()

    def stop(self) -> None:
        try:
            if self.proc.poll() is None:
                self.terminate()
                self.proc.wait(30)
        finally:
            self.kill()


def metric_values(url: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """Samples of /metrics, parsed with prometheus_client's own parser: (name, sorted labels) -> value."""
    text = httpx.get(f"{url}/metrics", timeout=10).text
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


def metric(values: dict, name: str, **labels: str) -> float:
    return sum(v for (n, lab), v in values.items() if n == name and all(dict(lab).get(k) == x
                                                                         for k, x in labels.items()))
