"""Helpers for the HTTP tests: a real ``miras-serve`` process on a free loopback port (no tests here); the process
helper itself is loadtest/process.py."""

from __future__ import annotations

import os
from pathlib import Path

import httpx
from prometheus_client.parser import text_string_to_metric_families

from deploy.local.launch import serve_command
from miras_serve.loadtest import process
from miras_serve.loadtest.process import free_port

__all__ = ["ServerProcess", "free_port", "metric", "metric_values"]


class ServerProcess(process.ServerProcess):
    """``miras-serve --model model --enforce-eager *args`` (deploy/local/launch.py) on a free loopback port,
    ready on return; ``stop()`` sends SIGTERM (a drain) and waits."""

    def __init__(self, model: Path, *args: str):
        self.port = free_port()
        env = {**os.environ, "OMP_NUM_THREADS": "1"}  # 2 shared cores: spin-waiting threads only slow it down
        env.pop("MIRAS_API_KEY", None)
        # --enforce-eager: compiling the decode step takes minutes on a fresh 2-core machine (it has its own
        # tests, tests/test_server_compiled_steps.py)
        cmd = serve_command(model, self.port, "--enforce-eager", *args)
        # run outside the checkout so imports resolve like an installed package's
        super().__init__(cmd, url=f"http://127.0.0.1:{self.port}", env=env, cwd=Path(model).parent)


def metric_values(url: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """Samples of /metrics, parsed with prometheus_client's own parser: (name, sorted labels) -> value."""
    text = httpx.get(f"{url}/metrics", timeout=10).text
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


def metric(values: dict, name: str, **labels: str) -> float:
    return sum(v for (n, lab), v in values.items() if n == name and all(dict(lab).get(k) == x
                                                                         for k, x in labels.items()))
