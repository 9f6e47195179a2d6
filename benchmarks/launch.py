"""``miras-serve`` for a benchmark: the command line, on a loopback port, run by loadtest/process.py."""

from __future__ import annotations

import os
import sys
import tempfile
from pathlib import Path

from miras_serve.loadtest.process import ServerProcess, free_port


def miras_serve(model: str, *flags: str, port: int | None = None, threads: int | None = 1, log: Path | None = None,
                timeout: float = 300.0) -> ServerProcess:
    """``python -m server.cli --model model *flags`` with ``threads`` torch threads (None: torch's default), ready
    on return; ``url`` is where it listens. It runs outside the checkout, so it imports the server as installed."""
    port = port or free_port()
    command = [sys.executable, "-m", "miras_serve.server.cli", "--model", model, "--host", "127.0.0.1",
               "--port", str(port), "--log-level", "warning", *flags]
    env = {**os.environ, **({"OMP_NUM_THREADS": str(threads)} if threads else {})}
    return ServerProcess(command, url=f"http://127.0.0.1:{port}", env=env, cwd=tempfile.gettempdir(), log=log,
                         timeout=timeout)
