"""A server in a subprocess, started from a command line and waited for: the one helper that tests, benchmarks
and the local multi-replica setup use for miras-serve, llama-server, nginx and redis-server; plus ``free_port``.

Client side: it only runs a command and polls ``/health`` over HTTP (or a readiness check it is given)."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import ClassVar

import httpx


def free_port() -> int:
    """A TCP port nothing listens on right now, on the loopback interface."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def healthy(url: str) -> bool:
    """``GET {url}/health`` answers 200."""
    try:
        return httpx.get(f"{url}/health", timeout=2.0).status_code == 200
    except httpx.HTTPError:
        return False


class ServerProcess:
    """``command`` in a subprocess, ready on return: ``ready()`` is true (default: ``url``'s ``/health`` is 200).

    Its output goes to a log file (``log``, or a temporary one), never to an unread pipe: a server that fills a
    pipe's 64 KiB blocks on its next log line. ``STARTED`` lists every process started, so that a failing
    test's report can carry the logs of those alive, or stopped, during it (tests/conftest.py)."""

    STARTED: ClassVar[list[ServerProcess]] = []

    def __init__(self, command: Sequence[str], *, url: str | None = None, ready: Callable[[], bool] | None = None,
                 env: Mapping[str, str] | None = None, cwd: str | Path | None = None, log: Path | None = None,
                 timeout: float = 120.0, wait: bool = True):
        if ready is None and url is None:
            raise ValueError("a ServerProcess needs a url to poll or a ready() check")
        self.command = [str(part) for part in command]
        self.url = url
        self._ready = ready or (lambda: healthy(url))
        self._env, self._cwd, self._timeout = None if env is None else dict(env), cwd, timeout
        if log is None:
            handle, name = tempfile.mkstemp(prefix=f"{Path(self.command[0]).name}-", suffix=".log")
            os.close(handle)
            log = Path(name)
        self.log = Path(log)
        self.log.write_text("")
        ServerProcess.STARTED.append(self)
        self._start()
        if wait:
            self.wait_ready(timeout)

    def _start(self) -> None:
        with self.log.open("a") as sink:  # the child keeps its own copy of the descriptor
            self.proc = subprocess.Popen(self.command, env=self._env, cwd=self._cwd, stdout=sink,
                                         stderr=subprocess.STDOUT)
        self.ended_at: float | None = None  # time.time() of the stop, for a failing test's report

    @property
    def name(self) -> str:
        return f"{Path(self.command[0]).name} ({self.url or f'pid {self.proc.pid}'})"

    def output(self) -> str:
        """Everything the process has printed so far."""
        return self.log.read_text(errors="replace")

    def alive(self) -> bool:
        return self.proc.poll() is None

    def wait_ready(self, timeout: float = 120.0) -> None:
        """Until ready; a process that exits or is not ready within ``timeout`` seconds is killed and raises."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if not self.alive():
                self._ended()
                raise RuntimeError(f"{self.name} exited with {self.proc.returncode}:\n{self.output()[-4000:]}")
            if self._ready():
                return
            time.sleep(0.1)
        self.kill()
        raise RuntimeError(f"{self.name} not ready after {timeout:.0f} s:\n{self.output()[-4000:]}")

    def terminate(self) -> None:
        """SIGTERM (miras-serve drains on it); ``wait`` for the end."""
        if self.alive():
            self.proc.send_signal(signal.SIGTERM)

    def wait(self, timeout: float = 60.0) -> int:
        """The exit status; a process still running after ``timeout`` seconds is killed and raises."""
        try:
            code = self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.kill()
            raise
        self._ended()
        return code

    def kill(self) -> None:
        """SIGKILL: a crash, no drain."""
        if self.alive():
            self.proc.kill()
            self.proc.wait()
        self._ended()

    def stop(self, timeout: float = 30.0) -> None:
        """SIGTERM, then SIGKILL if it has not exited within ``timeout`` seconds."""
        try:
            self.terminate()
            self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            pass
        finally:
            self.kill()

    def restart(self, timeout: float = 30.0) -> None:
        """``stop(timeout)`` if running, then the same command again (its output appended to the same log),
        ready on return."""
        self.stop(timeout)
        self._start()
        self.wait_ready(self._timeout)

    def _ended(self) -> None:
        self.ended_at = self.ended_at or time.time()

    def __enter__(self) -> ServerProcess:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()
