"""How the limits behave against a real server: how fast a 50 MB body is refused and how slow /health gets
meanwhile, the same while a 3.6 MB text is tokenized off the event loop, and when a client sending its
headers a byte at a time is cut off. The raw-socket clients here are also what tests/test_server_limits.py
drives.

    python -m benchmarks.limits [--model moneta-tiny]

Writes limits-cpu.md into ``--out`` (default docs/benchmarks/).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import socket
import threading
import time

import httpx

from benchmarks import report
from deploy.local.launch import miras_serve

LONG_TEXT = "Shall I compare thee to a summer's day? " * 90_000  # 3.6 MB


class HealthPoller:
    """Polls /health from a thread while something else is in flight: how many answers, and the slowest."""

    def __init__(self, url: str):
        self.url, self.answers, self.slowest, self.stop = url, 0, 0.0, threading.Event()
        self.failures: list[int] = []
        self.thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        with httpx.Client(timeout=30) as client:
            while not self.stop.is_set():
                start = time.perf_counter()
                status = client.get(f"{self.url}/health").status_code
                if status != 200:
                    self.failures.append(status)
                self.slowest = max(self.slowest, time.perf_counter() - start)
                self.answers += 1
                time.sleep(0.005)

    def __enter__(self) -> HealthPoller:
        self.thread.start()
        while not self.answers:  # polling before the work starts
            time.sleep(0.001)
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop.set()
        self.thread.join(30)


def upload(port: int, path: str, total: int, chunked: bool) -> tuple[bytes, int, float]:
    """POST a ``total``-byte JSON text prompt over a raw socket, reading while sending: the response, the
    bytes sent before it arrived, and the seconds it took."""
    sock = socket.create_connection(("127.0.0.1", port))
    head = f"POST {path} HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n".encode()
    head += b"Transfer-Encoding: chunked\r\n\r\n" if chunked else f"Content-Length: {total}\r\n\r\n".encode()
    sock.sendall(head)
    sock.setblocking(False)
    piece, sent, pending, response, start = b'{"prompt": "' + b"a" * 65536, 0, b"", b"", time.perf_counter()
    while sent < total and not response:
        with contextlib.suppress(BlockingIOError):
            response = sock.recv(65536)
        if not pending:  # the next chunk (whole frames only: a chunked body must stay well-formed)
            pending = b"%x\r\n%s\r\n" % (len(piece), piece) if chunked else piece[: total - sent]
        try:
            n = sock.send(pending)
            sent, pending = sent + n, pending[n:]
        except BlockingIOError:
            time.sleep(0.001)
        except (BrokenPipeError, ConnectionResetError):
            break
    elapsed = time.perf_counter() - start
    sock.setblocking(True)
    sock.settimeout(10)
    response += read_all(sock)
    sock.close()
    return response, sent, elapsed


def read_all(sock: socket.socket) -> bytes:
    out = b""
    with contextlib.suppress(ConnectionResetError, TimeoutError):
        while chunk := sock.recv(65536):
            out += chunk
    return out


def error_of(response: bytes) -> tuple[int, dict]:
    """Status and OpenAI error object of a raw HTTP/1.1 error response."""
    head, _, body = response.partition(b"\r\n\r\n")
    status = int(head.split(b" ")[1])
    if b"transfer-encoding: chunked" in head.lower():
        size, _, rest = body.partition(b"\r\n")
        body = rest[: int(size, 16)]
    return status, json.loads(body)["error"]


def slow_headers(port: int, interval: float, during=None) -> tuple[bytes, int, float, list]:
    """Send request headers a byte every ``interval`` s until the server answers or closes: the answer, the
    bytes sent, the seconds it took, and what ``during()`` returned each 10 bytes (requests meanwhile)."""
    line = b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nX-Padding: " + b"a" * 4000
    sock = socket.create_connection(("127.0.0.1", port))
    sock.settimeout(interval)
    start, sent, answer, meanwhile = time.perf_counter(), 0, b"", []
    try:
        while sent < len(line):
            try:
                sock.send(line[sent: sent + 1])
                sent += 1
            except (BrokenPipeError, ConnectionResetError):
                break
            with contextlib.suppress(TimeoutError):
                answer = sock.recv(65536)
                break  # the server answered, or closed the connection
            if during is not None and sent % 10 == 0:
                meanwhile.append(during())
        elapsed = time.perf_counter() - start
        sock.settimeout(10)
        answer += read_all(sock)
    finally:
        sock.close()
    return answer, sent, elapsed, meanwhile


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="moneta-tiny")
    p.add_argument("--port", type=int, default=None, help="the server's port (default: a free one)")
    p.add_argument("--read-timeout", type=float, default=2.0)
    report.add_out_argument(p)
    args = p.parse_args(argv)
    server = miras_serve(args.model, "--max-num-seqs", "8", "--request-read-timeout", str(args.read_timeout),
                         port=args.port)
    url, port = server.url, int(server.url.rsplit(":", 1)[1])
    rows = []
    try:
        for chunked in (False, True):
            with HealthPoller(url) as health:
                response, sent, elapsed = upload(port, "/v1/completions", 50 << 20, chunked)
            status, _ = error_of(response)
            rows.append((f"50 MB prompt, {'chunked' if chunked else 'Content-Length'}", f"{status} after "
                         f"{elapsed * 1e3:.1f} ms, {sent / 2**20:.1f} MB sent", health))
        with HealthPoller(url) as health:
            start = time.perf_counter()
            count = httpx.post(f"{url}/tokenize", json={"prompt": LONG_TEXT}, timeout=300).json()["count"]
            rows.append(("3.6 MB text to /tokenize (accepted)", f"200 after {time.perf_counter() - start:.2f} s, "
                         f"{count:,} tokens", health))
        with HealthPoller(url) as health:
            answer, sent, elapsed, _ = slow_headers(port, 0.05)
            status = error_of(answer)[0] if answer else "closed"
            rows.append((f"headers at 20 bytes/s (--request-read-timeout {args.read_timeout:g})",
                         f"{status} after {elapsed:.2f} s, {sent} bytes sent", health))
    finally:
        server.stop(60)
    for what, result, health in rows:
        print(f"{what}: {result}; /health slowest {health.slowest * 1e3:.1f} ms of {health.answers}")
    write_report(args, argv, rows)


def write_report(args: argparse.Namespace, argv: list[str] | None, rows: list) -> None:
    lines = [
        *report.header(
            "Limits against a real server: refusals before work, /health meanwhile (CPU)", __spec__.name, argv,
            f"`miras-serve --model {args.model} --request-read-timeout {args.read_timeout:g}` (other flags default: "
            "body limit 17.05 MB, 16 bytes per token of `--max-prompt-tokens 1000000` + 1 MiB), raw-socket clients "
            "on loopback that read while they send; `/health` polled from another connection every 5 ms throughout"),
        "| request | answer | /health answers during it | slowest /health |",
        "|---|---|---|---|",
    ]
    for what, result, health in rows:
        failed = f" ({len(health.failures)} not 200)" if health.failures else ""
        lines.append(f"| {what} | {result} | {health.answers}{failed} | {health.slowest * 1e3:.1f} ms |")
    lines += ["", "Before the limits (issue 18) the 50 MB prompt was tokenized in the request handler: nothing, "
              "`/health` included, was answered for 51 s. The tokenizer now runs on a worker thread and releases "
              "the GIL; what remains of the slowest `/health` in the /tokenize row is building the list of a "
              "million ids and its JSON on the event loop."]
    report.write(args.out, "limits-cpu.md", lines)


if __name__ == "__main__":
    main()
