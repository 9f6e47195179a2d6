"""loadtest/process.py, the one helper that starts a server process and waits for it, against a small HTTP
server in a subprocess."""

from __future__ import annotations

import sys
import time

import pytest

from miras_serve.loadtest.process import ServerProcess, free_port, healthy

# Answers every GET with 200 and logs the path; exits at once when started with "fail".
TINY_SERVER = """
import http.server, sys
if sys.argv[2] == "fail":
    print("refusing to start", flush=True)
    sys.exit(3)
class Handler(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        self.send_response(200)
        self.end_headers()
        self.wfile.write(b"ok")
        print("GET", self.path, flush=True)
    def log_message(self, *args):
        pass
http.server.HTTPServer(("127.0.0.1", int(sys.argv[1])), Handler).serve_forever()
"""


def tiny_server(mode: str = "serve", **kwargs) -> ServerProcess:
    port = free_port()
    return ServerProcess([sys.executable, "-c", TINY_SERVER, str(port), mode], url=f"http://127.0.0.1:{port}",
                         **kwargs)


def test_ready_on_return_logs_kept_and_stopped():
    with tiny_server() as server:
        assert server.alive() and healthy(server.url)
        assert "GET /health" in server.output()  # the readiness poll, in the log file
        assert server in ServerProcess.STARTED  # for the failing-test report of tests/conftest.py
    assert not server.alive() and server.ended_at is not None
    assert not healthy(server.url)


def test_a_process_that_exits_raises_with_its_output():
    with pytest.raises(RuntimeError, match="exited with 3(.|\n)*refusing to start"):
        tiny_server("fail")


def test_a_process_never_ready_is_killed_after_the_timeout():
    started = time.monotonic()
    with pytest.raises(RuntimeError, match="not ready after"):
        ServerProcess([sys.executable, "-c", "import time; time.sleep(60)"], ready=lambda: False, timeout=0.5)
    assert time.monotonic() - started < 30
    assert not ServerProcess.STARTED[-1].alive()


def test_restart_runs_the_same_command_again():
    server = tiny_server()
    try:
        server.kill()
        assert not server.alive()
        server.restart()
        assert server.alive() and healthy(server.url)
        assert server.output().count("GET /health") >= 2  # one log across both runs
    finally:
        server.stop()


def test_needs_a_url_or_a_ready_check():
    with pytest.raises(ValueError, match="url"):
        ServerProcess([sys.executable, "-c", "pass"])
