"""Helpers for the HTTP tests: a real ``miras-serve`` process on a free loopback port (no tests here)."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
from prometheus_client.parser import text_string_to_metric_families


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ServerProcess:
    """``python -m server.cli`` in a subprocess; ``stop()`` sends SIGTERM (a drain) and waits."""

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
        self.proc = subprocess.Popen(cmd, env=env, cwd=Path(model).parent, stdout=subprocess.PIPE,
                                     stderr=subprocess.STDOUT, text=True)
        self.wait_ready()

    def wait_ready(self, timeout: float = 120.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited with {self.proc.returncode}: {self.proc.stdout.read()}")
            try:
                if httpx.get(f"{self.url}/health", timeout=1.0).status_code == 200:
                    return
            except httpx.TransportError:
                pass
            time.sleep(0.1)
        self.kill()
        raise RuntimeError("server did not become ready")

    def terminate(self) -> None:
        self.proc.send_signal(signal.SIGTERM)

    def wait(self, timeout: float = 60.0) -> int:
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.kill()
            raise

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.terminate()
            try:
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
