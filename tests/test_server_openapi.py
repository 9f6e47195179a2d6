"""Real responses of every endpoint, streamed events included, validate against the app's own OpenAPI document:
the pydantic response models are the one definition of the wire format."""

from __future__ import annotations

import json

import pytest
from fastapi.testclient import TestClient
from jsonschema import Draft202012Validator

from miras_serve.server.api import ServerSettings, ServerState, build_app
from miras_serve.server.async_engine import AsyncEngine
from miras_serve.server.engine import EngineConfig, LLMEngine
from miras_serve.server.loader import load_model
from miras_serve.server.structured import available as structured_available

SAMPLE = {"max_tokens": 5, "temperature": 0, "seed": 1}


@pytest.fixture(scope="module")
def client(tiny_checkpoint):
    model, tokenizer = load_model(tiny_checkpoint)
    engine = LLMEngine(model, tokenizer, EngineConfig(max_num_seqs=4, max_num_batched_tokens=64), "tiny")
    with TestClient(build_app(ServerState(AsyncEngine(engine), ServerSettings("tiny", str(tiny_checkpoint))))) as c:
        yield c


def documented(client: TestClient, method: str, path: str, status: int, media: str) -> Draft202012Validator:
    """The schema the OpenAPI document gives for this route's ``status`` response of type ``media``."""
    doc = client.app.openapi()
    schema = doc["paths"][path][method.lower()]["responses"][str(status)]["content"][media]["schema"]
    return Draft202012Validator({**schema, "components": doc["components"]})


def check(client: TestClient, method: str, path: str, route: str | None = None, status: int = 200, **kw) -> dict:
    response = client.request(method, path, **kw)
    assert response.status_code == status, response.text
    body = response.json()
    documented(client, method, route or path, status, "application/json").validate(body)
    return body


def check_stream(client: TestClient, path: str, body: dict) -> list[dict]:
    validator = documented(client, "POST", path, 200, "text/event-stream")
    events = []
    with client.stream("POST", path, json={**body, "stream": True}) as response:
        assert response.status_code == 200
        for line in response.iter_lines():
            if line.startswith("data: ") and line != "data: [DONE]":
                events.append(json.loads(line.removeprefix("data: ")))
                validator.validate(events[-1])
    assert events
    return events


def test_plain_endpoints(client):
    check(client, "GET", "/health")
    check(client, "GET", "/version")
    assert check(client, "GET", "/v1/models")["data"][0]["id"] == "tiny"
    tokens = check(client, "POST", "/tokenize", json={"prompt": "Shall I", "return_token_strs": True})["tokens"]
    check(client, "POST", "/detokenize", json={"tokens": tokens})
    check(client, "POST", "/v1/completions", status=404, json={"prompt": "x", "model": "nope"})
    check(client, "POST", "/v1/completions", status=400, json={"prompt": "x", "temperature": -1})


def test_completions(client):
    body = check(client, "POST", "/v1/completions",
                 json={"prompt": ["Shall I", "compare thee"], "n": 2, "logprobs": 2, "echo": True,
                       "return_surprise": True, **SAMPLE})
    assert len(body["choices"]) == 4 and body["usage"]["prompt_tokens_details"] is not None
    assert "surprise" in body["choices"][0] and body["choices"][0]["logprobs"]["tokens"]
    events = check_stream(client, "/v1/completions",
                          {"prompt": "Shall I", "logprobs": 1, "return_surprise": True, **SAMPLE,
                           "stream_options": {"include_usage": True, "continuous_usage_stats": True}})
    assert events[-1]["choices"] == [] and events[-1]["usage"]["completion_tokens"] == 5
    assert events[0]["choices"][0]["surprise"]["prompt"]


def test_chat_completions(client):
    messages = [{"role": "user", "content": "Shall I compare thee"}]
    body = check(client, "POST", "/v1/chat/completions",
                 json={"messages": messages, "logprobs": True, "top_logprobs": 2, "return_surprise": True, **SAMPLE})
    assert body["choices"][0]["message"]["role"] == "assistant" and body["choices"][0]["logprobs"]["content"]
    events = check_stream(client, "/v1/chat/completions",
                          {"messages": messages, "n": 2, "logprobs": True, **SAMPLE,
                           "stream_options": {"include_usage": True}})
    assert events[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    finished = [c for e in events for c in e["choices"] if c["finish_reason"]]
    assert len(finished) == 2 and all("stop_reason" in c for c in finished)
    if structured_available():
        tool = {"type": "function", "function": {"name": "add", "parameters": {
            "type": "object", "properties": {"a": {"type": "integer"}}, "required": ["a"]}}}
        called = {"messages": messages, "tools": [tool], "tool_choice": "required", **SAMPLE, "max_tokens": 40}
        check(client, "POST", "/v1/chat/completions", json=called)
        check_stream(client, "/v1/chat/completions", called)


def test_responses(client):
    created = check(client, "POST", "/v1/responses", json={"input": "Shall I compare thee", "max_output_tokens": 4})
    assert created["status"] in ("completed", "incomplete")
    route = "/v1/responses/{response_id}"
    assert check(client, "GET", f"/v1/responses/{created['id']}", route) == created
    events = check_stream(client, "/v1/responses", {"input": "to a summer's day", "max_output_tokens": 4,
                                                   "previous_response_id": created["id"]})
    assert [e["sequence_number"] for e in events] == list(range(len(events)))
    assert events[-1]["response"]["usage"]["input_tokens"] > created["usage"]["input_tokens"]
    assert check(client, "DELETE", f"/v1/responses/{created['id']}", route)["deleted"] is True
    check(client, "GET", f"/v1/responses/{created['id']}", route, status=404)


def test_the_documented_schemas_refuse_a_wrong_body(client):
    chunk = documented(client, "POST", "/v1/chat/completions", 200, "text/event-stream")
    good = {"id": "x", "object": "chat.completion.chunk", "created": 1, "model": "tiny",
            "choices": [{"index": 0, "delta": {"content": "a"}, "logprobs": None, "finish_reason": None}]}
    chunk.validate(good)
    for bad in ({**good, "choices": [{"index": 0}]}, {**good, "object": "chat.completion"}):
        assert not chunk.is_valid(bad)
