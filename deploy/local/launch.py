"""``miras-serve`` on this machine, for the tests, the benchmarks and the local replica stack: its command line
on a loopback port, stated once, and a benchmark's server run by loadtest/process.py."""

from __future__ import annotations

import atexit
import functools
import os
import shutil
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


@functools.cache
def empty_workdir() -> str:
    """A private, empty working directory for this process's servers (removed at exit): ``python -m`` puts the
    working directory first on the import path, and the shared temp dir holds whatever anyone left there (a
    stray ``nt.py`` in /tmp once broke inductor's vector-ISA probe in the server, and with it the compiled
    decode step)."""
    path = tempfile.mkdtemp(prefix="miras-serve-cwd-")
    atexit.register(shutil.rmtree, path, True)
    return path


def miras_serve(model: str, *flags: str, port: int | None = None, threads: int | None = 1, log: Path | None = None,
                timeout: float = STARTUP_TIMEOUT) -> ServerProcess:
    """:func:`serve_command` with ``threads`` torch threads (None: torch's default), ready on return; ``url`` is
    where it listens. It runs outside the checkout, so it imports the server as installed."""
    port = port or free_port()
    env = {**os.environ, **({"OMP_NUM_THREADS": str(threads)} if threads else {})}
    return ServerProcess(serve_command(model, port, *flags), url=f"http://127.0.0.1:{port}", env=env,
                         cwd=empty_workdir(), log=log, timeout=timeout)
