"""A throwaway ``redis-server`` on a free loopback port (no persistence): for tests and the local
multi-replica setup. Debian's ``redis-server`` package provides the binary (``make test`` installs it)."""

from __future__ import annotations

import shutil
import socket

from miras_serve.loadtest.process import ServerProcess, free_port


def answers_ping(port: int) -> bool:
    """The Redis server on ``port`` answers PING."""
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.5) as s:
            s.sendall(b"PING\r\n")
            return s.recv(16).startswith(b"+PONG")
    except OSError:
        return False


class RedisProcess(ServerProcess):
    def __init__(self, port: int | None = None, maxmemory_mb: int = 0):
        binary = shutil.which("redis-server")
        if binary is None:
            raise RuntimeError("redis-server is not installed (apt-get install redis-server; make test does it)")
        self.port = port or free_port()
        cmd = [binary, "--port", str(self.port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
               "--protected-mode", "yes", "--loglevel", "warning"]
        if maxmemory_mb:
            cmd += ["--maxmemory", f"{maxmemory_mb}mb"]
        super().__init__(cmd, ready=lambda: answers_ping(self.port), timeout=10.0)
        self.url = f"redis://127.0.0.1:{self.port}/0"

    def stop(self, timeout: float = 0.0) -> None:
        """SIGKILL: nothing of a throwaway store is worth a shutdown."""
        self.kill()
