"""``miras-serve`` on this machine, for the tests, the benchmarks and the local replica stack: its command line
on a loopback port, stated once, and a benchmark's server run by loadtest/process.py."""

from __future__ import annotations

import os
import sys
import tempfile
from pathlib import Path

from miras_serve.loadtest.process import ServerProcess, free_port

# Seconds a server may take to start: on a CPU it compiles its decode step's graphs first (server/decode_graphs.py),
# minutes with a cold compiler cache on 2 busy cores.
STARTUP_TIMEOUT = 1800.0


def serve_command(model: str | Path, port: int, *flags: str) -> list[str]:
    """``python -m miras_serve.server.cli --model model`` on 127.0.0.1:``port``, logging warnings and errors only,
    then ``flags``."""
    return [sys.executable, "-m", "miras_serve.server.cli", "--model", str(model), "--host", "127.0.0.1",
            "--port", str(port), "--log-level", "warning", *flags]


def miras_serve(model: str, *flags: str, port: int | None = None, threads: int | None = 1, log: Path | None = None,
                timeout: float = STARTUP_TIMEOUT) -> ServerProcess:
    """:func:`serve_command` with ``threads`` torch threads (None: torch's default), ready on return; ``url`` is
    where it listens. It runs outside the checkout, so it imports the server as installed."""
    port = port or free_port()
    env = {**os.environ, **({"OMP_NUM_THREADS": str(threads)} if threads else {})}
    return ServerProcess(serve_command(model, port, *flags), url=f"http://127.0.0.1:{port}", env=env,
                         cwd=tempfile.gettempdir(), log=log, timeout=timeout)
