"""The load generator's SSE parsing and error accounting, against a small fake OpenAI server on loopback.

The fake misbehaves on purpose (429s, cut streams, error events, garbage, stalls); every request must end in
exactly one counted outcome. The real server is exercised in test_loadtest_server.py.
"""

from __future__ import annotations

import asyncio
import json
import threading
import time
from collections import Counter

import httpx
import pytest
import uvicorn
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, PlainTextResponse, Response, StreamingResponse

from miras_serve.loadtest.cli import run_cli
from miras_serve.loadtest.client import ApiConfig, check_tokens, send_request
from miras_serve.loadtest.process import free_port
from miras_serve.loadtest.runner import Load, run_load
from miras_serve.loadtest.workload import LengthDist, RequestSpec, WordTokenizer, Workload, synthetic_corpus

ROTATION = ("ok", "429", "ok", "cut", "error-event", "503-text", "ok")


def sse(event) -> str:
    return f"data: {event if isinstance(event, str) else json.dumps(event)}\n\n"


class FakeOpenAI:
    """Behaviour per request: the prompt's first word, or ROTATION in turn when it names no behaviour."""

    def __init__(self):
        self.app = FastAPI()
        self.tally: Counter = Counter()
        self.bodies: list[dict] = []
        self.success = self.generation_tokens = self.prompt_tokens = self.rejected = 0
        self.metric_bias = 0  # > 0 makes /metrics overstate the generated tokens of each request
        self.turn = 0
        self.app.post("/v1/completions")(self.completions)
        self.app.post("/v1/chat/completions")(self.completions)
        self.app.get("/v1/models")(lambda: {"object": "list", "data": [{"id": "fake-model", "object": "model"}]})
        self.app.get("/health")(lambda: {"status": "ok"})
        self.app.get("/version")(lambda: {"version": "fake-1"})
        self.app.get("/metrics")(self.metrics)

    def metrics(self) -> PlainTextResponse:
        generated = self.generation_tokens + self.metric_bias * self.success
        lines = [f'miras:request_success_total{{model_name="fake",finished_reason="length"}} {self.success}',
                 f'miras:generation_tokens_total{{model_name="fake"}} {generated}',
                 f'miras:prompt_tokens_total{{model_name="fake"}} {self.prompt_tokens}',
                 f'miras:request_rejected_total{{model_name="fake",reason="queue_full"}} {self.rejected}',
                 'miras:num_requests_running{model_name="fake"} 0',
                 'miras:num_requests_waiting{model_name="fake"} 0']
        return PlainTextResponse("\n".join(lines) + "\n")

    async def completions(self, request: Request) -> Response:
        body = await request.json()
        self.bodies.append(body)
        chat = "messages" in body
        prompt = body["messages"][-1]["content"] if chat else body["prompt"]
        behaviour = prompt.split()[0]
        if behaviour not in ("ok", "no-usage", "429", "503-text", "400", "cut", "error-event", "no-done",
                             "garbage", "html", "stall"):
            behaviour = ROTATION[self.turn % len(ROTATION)]
            self.turn += 1
        self.tally[behaviour] += 1
        if behaviour == "429":
            self.rejected += 1
            return JSONResponse({"error": {"message": "queue full", "type": "RateLimitError", "code": 429}}, 429)
        if behaviour == "503-text":
            return PlainTextResponse("upstream unavailable", 503)
        if behaviour == "400":
            return JSONResponse({"error": {"message": "bad max_tokens", "param": "max_tokens"}}, 400)
        if behaviour == "html":
            return PlainTextResponse("<html>hi</html>")
        tokens = body["max_tokens"]
        prompt_tokens = len(prompt.split())

        def chunk(text: str, finish: str | None = None) -> dict:
            choice = {"index": 0, "delta": {"content": text}} if chat else {"index": 0, "text": text}
            return {"object": "chunk", "choices": [{**choice, "finish_reason": finish}]}

        async def stream():
            if behaviour == "stall":
                await asyncio.sleep(5)
            yield ": ping\n\n"
            if chat:
                yield sse({"choices": [{"index": 0, "delta": {"role": "assistant"}, "finish_reason": None}]})
            for i in range(tokens):
                yield sse(chunk(f" t{i}", "length" if i == tokens - 1 else None))
                if behaviour == "cut":
                    raise RuntimeError("connection dropped mid-stream")
                if behaviour == "garbage":
                    yield "data: {not json\n\n"
                yield sse(chunk(""))  # an empty delta (held-back bytes) is no token
                await asyncio.sleep(0.001)
            if behaviour == "error-event":
                yield sse({"error": {"message": "engine failed", "code": 500}})
            elif behaviour == "ok":
                self.success += 1
                self.generation_tokens += tokens
                self.prompt_tokens += prompt_tokens
            if behaviour != "no-usage":
                yield sse({"choices": [], "usage": {"prompt_tokens": prompt_tokens, "completion_tokens": tokens,
                                                    "total_tokens": prompt_tokens + tokens}})
            if behaviour != "no-done":
                yield sse("[DONE]")

        return StreamingResponse(stream(), media_type="text/event-stream")


@pytest.fixture(scope="module")
def fake():
    fake = FakeOpenAI()
    server = uvicorn.Server(uvicorn.Config(fake.app, host="127.0.0.1", port=free_port(), log_level="critical",
                                           lifespan="off"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 10
    while not server.started:
        assert time.monotonic() < deadline and thread.is_alive(), "fake server did not start"
        time.sleep(0.01)
    fake.url = f"http://127.0.0.1:{server.config.port}"
    yield fake
    server.should_exit = True
    thread.join(timeout=10)


@pytest.fixture
def reset(fake):
    fake.tally.clear()
    fake.bodies.clear()
    fake.success = fake.generation_tokens = fake.prompt_tokens = fake.rejected = fake.metric_bias = fake.turn = 0
    return fake


def send(fake, prompt: str, max_tokens: int = 4, endpoint: str = "completions", timeout: float = 10.0,
         ignore_eos: bool = False, url: str | None = None):
    api = ApiConfig(url or fake.url, "fake-model", endpoint, api_key="k", ignore_eos=ignore_eos)

    async def go():
        async with httpx.AsyncClient(timeout=timeout) as client:
            return await send_request(client, api, RequestSpec(0, prompt, len(prompt.split()), max_tokens), 0.0,
                                      time.perf_counter())

    return asyncio.run(go())


@pytest.mark.parametrize("endpoint", ["completions", "chat"])
def test_stream_is_timed_per_content_chunk(reset, endpoint):
    r = send(reset, "ok three words", max_tokens=5, endpoint=endpoint)
    assert r.ok and r.status == 200, r.error_detail
    assert r.ttft is not None and r.ttft >= 0 and len(r.itl) == 4 and all(g >= 0 for g in r.itl)
    assert (r.output_tokens, r.prompt_tokens, r.usage_reported, r.finish_reason) == (5, 3, True, "length")
    assert r.finished_at >= r.sent_at + r.ttft
    body = reset.bodies[-1]
    assert body["stream"] is True and body["stream_options"] == {"include_usage": True}
    assert body["max_tokens"] == 5 and body["model"] == "fake-model" and "ignore_eos" not in body
    assert ("messages" in body) == (endpoint == "chat")


def test_tokens_are_counted_from_chunks_without_usage(reset):
    r = send(reset, "no-usage please", max_tokens=3)
    assert r.ok and not r.usage_reported and r.output_tokens == 3 and r.prompt_tokens is None


def test_ignore_eos_is_sent_only_when_asked(reset):
    send(reset, "ok", ignore_eos=True)
    assert reset.bodies[-1]["ignore_eos"] is True


@pytest.mark.parametrize(("prompt", "error", "clean", "detail"), [
    ("429", "http_429", True, "queue full"),
    ("503-text", "http_503", False, "upstream unavailable"),
    ("400", "http_400", False, "bad max_tokens"),
    ("cut", "stream_cut", False, ""),
    ("error-event", "stream_error", False, "engine failed"),
    ("no-done", "no_done", False, ""),
    ("garbage", "bad_event", False, ""),
    ("html", "not_a_stream", False, "text/plain"),
])
def test_every_failure_has_a_kind(reset, prompt, error, clean, detail):
    r = send(reset, f"{prompt} x")
    assert (r.error, r.clean_rejection) == (error, clean), r.error_detail
    assert detail in r.error_detail
    assert r.finished_at >= r.sent_at


def test_stall_is_a_timeout(reset):
    assert send(reset, "stall", timeout=0.2).error == "timeout"


def test_refused_connection_is_counted():
    url = f"http://127.0.0.1:{free_port()}"  # a port nobody listens on
    assert send(None, "ok", url=url).error == "connect_error"


def test_check_tokens_flags_short_or_unverifiable_answers(reset):
    r = send(reset, "ok", max_tokens=4)
    r.max_tokens = 6  # the server stopped early
    check_tokens(r)
    assert r.error == "wrong_token_count" and "asked 6, got 4" in r.error_detail
    unverifiable = send(reset, "no-usage", max_tokens=4)
    check_tokens(unverifiable)
    assert unverifiable.error == "no_usage"
    rejected = send(reset, "429")
    check_tokens(rejected)
    assert rejected.error == "http_429"


def workload() -> Workload:
    return Workload(synthetic_corpus(5000), WordTokenizer(), LengthDist.parse("uniform:4:12"),
                    LengthDist.parse("uniform:1:4"))


@pytest.mark.parametrize("load", [Load(concurrency=5, num_requests=35), Load(rate=500.0, max_concurrency=8,
                                                                              num_requests=28)],
                         ids=["closed-loop", "poisson"])
def test_every_request_released_is_accounted_for(reset, load):
    api = ApiConfig(reset.url, "fake-model")
    results = asyncio.run(run_load(api, workload(), load, progress=False))
    assert [r.index for r in results] == list(range(load.num_requests))
    expected = Counter({"http_429": reset.tally["429"], "stream_cut": reset.tally["cut"],
                        "stream_error": reset.tally["error-event"], "http_503": reset.tally["503-text"]})
    assert Counter(r.error for r in results if not r.ok) == +expected
    assert sum(r.ok for r in results) == reset.tally["ok"] > 0
    assert all(r.sent_at >= r.scheduled_at for r in results)


def test_duration_bounds_a_closed_loop_run(reset):
    api = ApiConfig(reset.url, "fake-model")
    results = asyncio.run(run_load(api, workload(), Load(concurrency=2, duration=0.3), progress=False))
    assert results and all(r.scheduled_at < 0.3 for r in results)
    assert len(results) == sum(reset.tally.values())


def test_cli_writes_reports_for_a_sweep(reset, tmp_path):
    out = tmp_path / "run"
    status = run_cli(["--base-url", reset.url, "--sweep", "concurrency:1,3", "--num-requests", "14",
                      "--input-len", "fixed:6", "--output-len", "fixed:3", "--goodput", "ttft:5000",
                      "--result-dir", str(out), "--no-progress", "--num-warmups", "0", "--meta", "commit=abc"])
    assert status == 0
    data = json.loads((out / "results.json").read_text())
    assert data["meta"]["model"] == "fake-model" and data["meta"]["commit"] == "abc"
    assert data["meta"]["server version"] == "fake-1"
    assert [len(level["results"]) for level in data["levels"]] == [14, 14]
    for level in data["levels"]:
        errors = sum(level["summary"]["errors"].values())
        assert level["summary"]["completed"] + errors == 14
    summary = (out / "summary.md").read_text()
    assert "| concurrency 3 |" in summary and "p99" in summary and "goodput" in summary
    for png in ("latency_cdf.png", "sweep.png"):
        assert (out / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_cli_check_fails_when_the_server_loses_requests(reset, capsys):
    argv = ["--base-url", reset.url, "--concurrency", "2", "--num-requests", "7", "--output-len", "fixed:3",
            "--check", "--no-progress", "--num-warmups", "0"]
    assert run_cli(argv) == 1  # the rotation includes cut streams and error events
    assert "FAILED" in capsys.readouterr().out


def test_cli_check_passes_and_catches_lying_metrics(reset, tmp_path, capsys):
    # Prompts that name their outcome: completions and clean 429s only, which --check accepts.
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("\n\n".join(f"{('ok', '429')[i % 2]} a b c d e" for i in range(40)))
    argv = ["--base-url", reset.url, "--concurrency", "2", "--num-requests", "6", "--corpus", str(corpus),
            "--input-len", "corpus", "--output-len", "fixed:3", "--check", "--no-progress", "--num-warmups", "0"]
    assert run_cli(argv) == 0, capsys.readouterr().out
    assert "passed" in capsys.readouterr().out and reset.tally["ok"] and reset.tally["429"]
    assert all(body["ignore_eos"] is True for body in reset.bodies)
    reset.metric_bias = 5
    assert run_cli(argv) == 1
    assert "generation_tokens_total rose by" in capsys.readouterr().out


def test_cli_reports_an_unreachable_server(capsys):
    url = f"http://127.0.0.1:{free_port()}"  # a port nobody listens on
    assert run_cli(["--base-url", url, "--num-requests", "1", "--no-progress"]) == 2
    assert "cannot run against" in capsys.readouterr().err


def test_cli_rejects_bad_arguments(capsys):
    with pytest.raises(SystemExit) as exc:
        run_cli(["--input-len", "gauss:5"])
    assert exc.value.code == 2 and "length distribution" in capsys.readouterr().err
