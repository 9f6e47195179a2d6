"""Several ``miras-serve`` replicas on one machine behind a router, sharing a Redis store: the local
counterpart of the Helm chart's router + replicas + Redis, used by benchmarks/replicas.py.

    python -m deploy.local.replicas --replicas 3 --port 8080          # make replicas
    curl localhost:8080/v1/responses -H 'x-session-id: conv-1' -H 'content-type: application/json' \\
        -d '{"input": "Hello", "max_output_tokens": 16}'

The router is nginx (Debian's nginx-light) with ``hash $http_x_session_id consistent``: every request
carrying the same ``x-session-id`` (a client's conversation id: the Responses API keeps the conversation in
the body's ``previous_response_id``, which nginx cannot hash, so clients send the header) goes to the same
replica, whose memory holds the conversation's state; a request without it goes to a random one. A replica
that refuses connections or answers 502/503 (down, draining) is skipped for the next (even for POSTs: the
request never reached it, or it was refused before any byte was sent back), and a conversation whose
replica is gone continues on another from the shared store. ``--policy round-robin`` routes without the
header; ``--router vllm-router`` runs vllm-router's consistent_hash policy on the same header instead
(installed separately: ``pip install vllm-router``), for comparison. Everything listens on loopback only.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import shutil
import signal
import sys
import tempfile
from pathlib import Path

from miras_serve.loadtest.process import ServerProcess, free_port

from .launch import STARTUP_TIMEOUT, serve_command
from .redis_process import RedisProcess

NGINX_CONF = """worker_processes 1;
daemon off;
pid {tmp}/nginx.pid;
error_log {tmp}/error.log warn;
events {{ worker_connections 4096; }}
http {{
    access_log off;
    client_body_temp_path {tmp}/body;
    proxy_temp_path {tmp}/proxy;
    fastcgi_temp_path {tmp}/fastcgi;
    uwsgi_temp_path {tmp}/uwsgi;
    scgi_temp_path {tmp}/scgi;
    # the conversation header, or (absent) the request's own random id: a random replica
    map $http_x_session_id $route_key {{
        "" $request_id;
        default $http_x_session_id;
    }}
    upstream miras {{
        {balance}
{servers}
        keepalive 64;
    }}
    server {{
        listen 127.0.0.1:{port};
        location / {{
            proxy_pass http://miras;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
            proxy_buffering off;
            proxy_request_buffering on;
            proxy_read_timeout 600s;
            proxy_next_upstream error timeout http_502 http_503 non_idempotent;
            proxy_next_upstream_tries 3;
        }}
    }}
}}
"""


def nginx_conf(port: int, replica_ports: list[int], policy: str, tmp: str) -> str:
    balance = "hash $route_key consistent;" if policy == "session" else "# round robin"
    servers = "\n".join(f"        server 127.0.0.1:{p} max_fails=1 fail_timeout=30s;" for p in replica_ports)
    return NGINX_CONF.format(tmp=tmp, port=port, balance=balance, servers=servers)


class Stack:
    """Redis, ``n`` replicas and a router, started in that order and stopped in reverse."""

    def __init__(self, model: str, n: int = 3, port: int | None = None, router: str = "nginx",
                 policy: str = "session", serve_args: tuple[str, ...] = (), log_dir: str | None = None):
        self.tmp = tempfile.mkdtemp(prefix="miras-replicas-")
        self.log_dir = Path(log_dir or self.tmp)
        self.redis = RedisProcess()
        self.replica_ports = [free_port() for _ in range(n)]
        self.replicas: list[ServerProcess] = []
        self.router: ServerProcess | None = None
        self.port = port or free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        try:
            for i, p in enumerate(self.replica_ports):  # all loading at once, then each waited for
                self.replicas.append(self._serve(model, i, p, serve_args))
            for replica in self.replicas:
                replica.wait_ready(STARTUP_TIMEOUT)
            self.router = self._route(router, policy)
        except BaseException:
            self.stop()
            raise

    def _serve(self, model: str, i: int, port: int, serve_args: tuple[str, ...]) -> ServerProcess:
        env = {**os.environ, "OMP_NUM_THREADS": "1"}
        cmd = serve_command(model, port, "--state-redis-url", self.redis.url, *serve_args)
        return ServerProcess(cmd, url=f"http://127.0.0.1:{port}", env=env, log=self.log_dir / f"replica-{i}.log",
                             wait=False)

    def _route(self, router: str, policy: str) -> ServerProcess:
        """The router, ready once a replica answers ``/health`` through it."""
        log = self.log_dir / "router.log"
        if router == "nginx":
            nginx = shutil.which("nginx") or "/usr/sbin/nginx"
            conf = Path(self.tmp) / "nginx.conf"
            conf.write_text(nginx_conf(self.port, self.replica_ports, policy, self.tmp))
            return ServerProcess([nginx, "-c", str(conf), "-e", str(Path(self.tmp) / "error.log")], url=self.url,
                                 log=log, timeout=60)
        if router == "vllm-router":
            binary = shutil.which("vllm-router")
            if binary is None:
                raise RuntimeError("vllm-router is not installed (pip install vllm-router)")
            return ServerProcess(
                [binary, "--host", "127.0.0.1", "--port", str(self.port), "--worker-urls",
                 *(f"http://127.0.0.1:{p}" for p in self.replica_ports),
                 "--policy", "consistent_hash" if policy == "session" else "round_robin",
                 "--prometheus-port", str(free_port()), "--prometheus-host", "127.0.0.1",
                 "--health-check-endpoint", "/health", "--log-level", "warning"], url=self.url, log=log, timeout=60)
        raise ValueError(f"unknown router {router!r}")

    def kill_replica(self, i: int) -> None:
        """A crash: SIGKILL, no drain."""
        self.replicas[i].kill()

    def stop(self) -> None:
        for proc in [self.router, *reversed(self.replicas)]:
            if proc is not None:
                proc.stop()
        self.redis.stop()

    def __enter__(self) -> Stack:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser("replicas", description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="moneta-tiny")
    p.add_argument("--replicas", type=int, default=3)
    p.add_argument("--port", type=int, default=8080)
    p.add_argument("--router", default="nginx", choices=["nginx", "vllm-router"])
    p.add_argument("--policy", default="session", choices=["session", "round-robin"])
    args = p.parse_args(argv)
    if not 1 <= args.replicas <= 16:
        p.error("--replicas must be between 1 and 16")
    with Stack(args.model, args.replicas, args.port, args.router, args.policy) as stack:
        print(f"router {stack.url} ({args.router}, {args.policy}) -> replicas "
              f"{', '.join(str(p) for p in stack.replica_ports)}; redis {stack.redis.url}; logs in {stack.log_dir}")
        signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
        with contextlib.suppress(KeyboardInterrupt):
            signal.pause()  # until Ctrl-C or SIGTERM


if __name__ == "__main__":
    main()
