"""The FastAPI app in process (no sockets): states that are hard to reach on a live server."""

from __future__ import annotations

import asyncio
import json
import time

import httpx
import pytest

from miras_serve.server.api import ServerSettings, ServerState, build_app
from miras_serve.server.async_engine import AsyncEngine
from miras_serve.server.engine import EngineConfig, LLMEngine
from miras_serve.server.loader import load_model
from miras_serve.server.serving_base import SSE_PING, with_pings


@pytest.fixture
def state(tiny_checkpoint) -> ServerState:
    model, tokenizer = load_model(tiny_checkpoint)
    engine = LLMEngine(model, tokenizer, EngineConfig(max_num_seqs=4, max_num_batched_tokens=64), "tiny")
    return ServerState(AsyncEngine(engine), ServerSettings("tiny", str(tiny_checkpoint)))


def request(app, method: str, path: str, **kw) -> httpx.Response:
    async def run() -> httpx.Response:
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://app") as client:
            return await client.request(method, path, **kw)

    return asyncio.run(run())


def test_health_is_503_until_the_engine_runs(state):
    app = build_app(state)  # lifespan not run: the engine thread has not started
    response = request(app, "GET", "/health")
    assert response.status_code == 503 and response.json()["error"]["code"] == "starting"
    refused = request(app, "POST", "/v1/completions", json={"prompt": "x"})
    assert refused.status_code == 503 and refused.headers["retry-after"] == "1"


def stream_with_step(state: ServerState, step, body: dict) -> tuple[list[str], object]:
    """Stream a completion through the in-process app, the engine's step replaced by ``step``; the SSE
    events (split on blank lines) and the app."""
    state.engine.engine.step = step
    app = build_app(state)
    state.engine.start()
    try:
        response = request(app, "POST", "/v1/completions", json={**body, "stream": True})
    finally:
        state.engine.stop()
    assert response.status_code == 200
    return response.text.split("\n\n"), app


def test_engine_failure_after_the_200_is_an_sse_error_event(state):
    real_step, calls = state.engine.engine.step, []

    def failing_step():
        calls.append(1)
        if len(calls) > 3:
            raise RuntimeError("device lost")
        return real_step()

    events, app = stream_with_step(state, failing_step, {"prompt": "Shall I", "max_tokens": 50, "ignore_eos": True})
    assert events[-2:] == ["data: [DONE]", ""]
    error = json.loads(events[-3].removeprefix("data: "))["error"]
    assert error["code"] == "unavailable" and "device lost" in error["message"]
    assert all(e.startswith("data: {\"id\"") for e in events[:-3])
    assert request(app, "GET", "/health").json()["error"]["code"] == "dead"


def test_silent_streams_get_sse_comment_pings(state):
    """A stream that waits (here: every engine step takes 0.2 s) gets ': ping' comments every
    --sse-ping-interval seconds; the data events around them are unchanged."""
    state.completions.sse_ping_interval = 0.05
    real_step = state.engine.engine.step

    def slow_step():
        time.sleep(0.2)
        return real_step()

    events, _ = stream_with_step(state, slow_step, {"prompt": "Shall I", "max_tokens": 3, "ignore_eos": True})
    assert events[-2:] == ["data: [DONE]", ""]
    pings = [e for e in events if e == ": ping"]
    data = [e for e in events[:-2] if e != ": ping"]
    assert len(pings) >= 3  # at least one per silent 0.2 s step
    assert len(data) == 3 and all(json.loads(e.removeprefix("data: "))["choices"] for e in data)


def test_pings_off_and_cancellation():
    async def source(log: list[str]):
        try:
            for i in range(3):
                await asyncio.sleep(0.03)
                yield f"data: {i}\n\n"
        finally:
            log.append("closed")

    async def run() -> None:
        log: list[str] = []
        assert [e async for e in with_pings(source(log), 0)] == [f"data: {i}\n\n" for i in range(3)]
        assert log == ["closed"]
        # A consumer that leaves while the ping wrapper waits for the next event cancels that wait
        # and closes the source (as Starlette does when the client disconnects).
        log.clear()
        stream = with_pings(source(log), 0.01)
        assert await anext(stream) == SSE_PING
        await stream.aclose()
        await asyncio.sleep(0.05)
        assert log == ["closed"]

    asyncio.run(run())
