"""Limits that act before work is done, against a real uvicorn server: huge bodies are refused before
they are sent, long texts are tokenized off the event loop, slow clients are cut off, and the server
keeps answering everyone else meanwhile. Tests assert on behaviour; the times are printed, never asserted
(python -m benchmarks.limits measures them: docs/benchmarks/limits-cpu.md)."""

from __future__ import annotations

import socket
import threading
import time

import httpx
import pytest
from test_server_support import ServerProcess

from benchmarks.limits import LONG_TEXT, HealthPoller, error_of, read_all, slow_headers, upload
from miras_serve.server.cli import parse_args
from miras_serve.server.limits import default_max_prompt_chars, default_max_request_bytes

MAX_BODY = 4_000_000
READ_TIMEOUT = 1.5


@pytest.fixture(scope="module")
def server(tiny_checkpoint):
    proc = ServerProcess(tiny_checkpoint, "--max-prompt-tokens", "1000000", "--max-request-bytes", str(MAX_BODY),
                         "--request-read-timeout", str(READ_TIMEOUT))
    yield proc
    proc.stop()


@pytest.mark.parametrize("chunked", [False, True], ids=["content-length", "chunked"])
def test_a_50_mb_prompt_is_refused_before_it_is_sent(server, chunked):
    total = 50 << 20
    with HealthPoller(server.url) as health:
        response, sent, elapsed = upload(server.port, "/v1/completions", total, chunked)
        answers_before = health.answers
    status, error = error_of(response)
    assert status == 413 and "--max-request-bytes" in error["message"] and error["type"] == "invalid_request_error"
    assert sent < total / 4  # refused long before the body was sent, so never read into memory
    assert health.answers >= answers_before >= 1 and not health.failures
    print(f"\n50 MB {'chunked' if chunked else 'content-length'}: 413 after {elapsed * 1e3:.1f} ms and "
          f"{sent / 2**20:.1f} MB sent; /health slowest {health.slowest * 1e3:.1f} ms over {health.answers} answers")


def test_a_long_text_is_tokenized_off_the_event_loop(server):
    with HealthPoller(server.url) as health:
        start = time.perf_counter()
        done = threading.Event()
        answers = []

        def during() -> None:  # /health answers that came while the tokenizer was busy
            while not done.is_set():
                answers.append(health.answers)
                time.sleep(0.01)

        watcher = threading.Thread(target=during, daemon=True)
        watcher.start()
        response = httpx.post(f"{server.url}/tokenize", json={"prompt": LONG_TEXT}, timeout=120)
        done.set()
        watcher.join()
        elapsed = time.perf_counter() - start
    assert response.status_code == 200 and response.json()["count"] > 100_000
    assert answers[-1] - answers[0] >= 3  # /health kept answering while the text was tokenized
    print(f"\n3.6 MB /tokenize: {elapsed:.2f} s; /health slowest {health.slowest * 1e3:.1f} ms over "
          f"{answers[-1] - answers[0]} answers during it")


@pytest.fixture(scope="module")
def small_server(tiny_checkpoint):
    """Small limits: 1,000 characters a prompt, 8 connections."""
    proc = ServerProcess(tiny_checkpoint, "--max-prompt-chars", "1000", "--limit-concurrency", "8")
    yield proc
    proc.stop()


def test_texts_past_the_character_limit_are_refused_before_tokenizing(small_server):
    server = small_server
    for path, body, param in [
        ("/v1/completions", {"prompt": "a" * 1001}, "prompt"),
        ("/v1/completions", {"prompt": ["a", "b" * 1001]}, "prompt"),
        ("/v1/chat/completions", {"messages": [{"role": "user", "content": "a" * 600}] * 2}, "messages"),
        ("/tokenize", {"prompt": "a" * 1001}, "prompt"),
    ]:
        response = httpx.post(f"{server.url}{path}", json=body, timeout=30)
        assert response.status_code == 400, (path, response.text)
        error = response.json()["error"]
        assert error["param"] == param and "--max-prompt-chars" in error["message"]
    ok = httpx.post(f"{server.url}/tokenize", json={"prompt": "a" * 1000}, timeout=30)
    assert ok.status_code == 200
    detok = httpx.post(f"{server.url}/detokenize", json={"tokens": [5] * 1_000_001}, timeout=60)
    assert detok.status_code == 400 and "--max-prompt-tokens" in detok.json()["error"]["message"]


def test_slow_headers_are_cut_off_while_others_are_served(server):
    """A client sending its headers a byte at a time (slowloris) is disconnected after
    --request-read-timeout, with a 408; a connection that sends nothing is closed; others are served."""
    idle = socket.create_connection(("127.0.0.1", server.port))
    try:
        answer, sent, elapsed, served = slow_headers(server.port, 0.05, lambda: httpx.post(
            f"{server.url}/v1/completions", json={"prompt": "Shall I", "max_tokens": 2}, timeout=30).status_code)
        idle.settimeout(10)
        assert read_all(idle) == b""  # closed without a word: nothing of a request had come
    finally:
        idle.close()
    assert sent < 4000  # it would have taken over 200 s to send them all
    status, error = error_of(answer)
    assert status == 408 and "--request-read-timeout" in error["message"]
    assert served and set(served) == {200}
    print(f"\nslow headers: cut off after {elapsed:.2f} s and {sent} bytes; {len(served)} requests served meanwhile")


def test_a_slow_body_gets_408(server):
    sock = socket.create_connection(("127.0.0.1", server.port))
    body = b'{"prompt": "Shall I compare thee", "max_tokens": 2}' + b" " * 200
    sock.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                 b"Content-Length: %d\r\n\r\n" % len(body))
    sock.settimeout(0.05)
    sent, response = 0, b""
    try:
        while sent < len(body):  # 250 x 0.05 s = 12.5 s if never cut off
            sock.send(body[sent: sent + 1])
            sent += 1
            try:
                response = sock.recv(65536)
                break
            except TimeoutError:
                pass
        sock.settimeout(10)
        response += read_all(sock)
    finally:
        sock.close()
    assert sent < len(body)
    status, error = error_of(response)
    assert status == 408 and "--request-read-timeout" in error["message"]


def test_connections_beyond_the_limit_get_503(small_server):
    server = small_server
    socks = [socket.create_connection(("127.0.0.1", server.port)) for _ in range(8)]
    try:
        statuses = []
        deadline = time.monotonic() + 20
        while 503 not in statuses and time.monotonic() < deadline:  # until the server has accepted them all
            statuses.append(httpx.get(f"{server.url}/health", timeout=10).status_code)
        assert statuses[-1] == 503
        for sock in socks[:4]:
            sock.close()
        deadline = time.monotonic() + 20
        while httpx.get(f"{server.url}/health", timeout=10).status_code != 200:  # room again
            assert time.monotonic() < deadline
            time.sleep(0.05)
    finally:
        for sock in socks:
            sock.close()


def test_default_limits_follow_max_prompt_tokens(tokenizer):
    assert default_max_request_bytes(4000) >= 4000 * len(b"4095, ")  # a prompt of token ids always fits
    longest = max(len(tokenizer.token_bytes(i)) for i in range(tokenizer.vocab_size))
    assert default_max_prompt_chars(tokenizer, 4000) == 4000 * longest
    # no text longer than that can be within 4000 tokens: each token covers at most `longest` characters
    text = "Shall I compare thee to a summer's day? " * 2000
    assert len(tokenizer.encode(text)) >= len(text) / longest


def test_cli_flags(tmp_path, monkeypatch):
    monkeypatch.delenv("MIRAS_API_KEY", raising=False)
    keys = tmp_path / "keys"
    keys.write_text("# tenants\nalpha\n\n  beta  \nalpha\n")
    args = parse_args(["--api-key", "gamma", "--api-key-file", str(keys), "--metrics-require-key"])
    assert args.api_keys == ["gamma", "alpha", "beta"] and args.metrics_require_key
    monkeypatch.setenv("MIRAS_API_KEY", "delta")
    assert parse_args([]).api_keys == ["delta"]
    assert parse_args([]).state_cache_scope == "api-key"
    monkeypatch.delenv("MIRAS_API_KEY")
    for bad in (["--metrics-require-key"], ["--max-request-bytes", "0"], ["--request-read-timeout", "0"],
                ["--api-key-file", str(tmp_path / "missing")], ["--state-cache-scope", "everyone"]):
        with pytest.raises(SystemExit):
            parse_args(bad)
