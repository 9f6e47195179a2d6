"""The Responses API with the official ``openai`` client against real ``miras-serve`` processes: a
conversation by reference equals chat completions resending the history, streaming events, store=false,
GET/DELETE, salts and tenants, and a restart that continues from disk (also past a corrupt file)."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import httpx
import openai
import pytest
from openai import OpenAI
from test_server_support import ServerProcess, metric_values

from miras_serve.server.api import ServerSettings, ServerState, build_app
from miras_serve.server.async_engine import AsyncEngine
from miras_serve.server.engine import EngineConfig, LLMEngine
from miras_serve.server.limits import TextLimits
from miras_serve.server.loader import load_model
from miras_serve.server.response_store import ResponseStore, StoredResponse
from miras_serve.server.serving_responses import OpenAIServingResponses
from miras_serve.server.tenancy import tenant_id

MODEL = "tiny"
GREEDY = dict(model=MODEL, temperature=0, max_output_tokens=6)


@pytest.fixture(scope="module")
def server(tiny_checkpoint, tmp_path_factory):
    proc = ServerProcess(tiny_checkpoint, "--served-model-name", MODEL, "--state-disk-dir",
                         str(tmp_path_factory.mktemp("states")))
    yield proc
    proc.stop()


@pytest.fixture(scope="module")
def client(server) -> OpenAI:
    return OpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0)


def converse(client: OpenAI, turns: list[str], previous: str | None = None, **kw) -> list:
    """One response per input, each continuing the one before."""
    responses = []
    for text in turns:
        response = client.responses.create(input=text, previous_response_id=previous, **GREEDY, **kw)
        responses.append(response)
        previous = response.id
    return responses


def chat_replies(client: OpenAI, messages: list[dict[str, str]], turns: list[str]) -> list:
    """The same conversation as chat completions, resending the whole history each turn."""
    completions = []
    for text in turns:
        messages.append({"role": "user", "content": text})
        completion = client.chat.completions.create(model=MODEL, messages=messages, temperature=0, max_tokens=6)
        messages.append({"role": "assistant", "content": completion.choices[0].message.content})
        completions.append(completion)
    return completions


TURNS = [f"Tell me about thing number {i}, if you will." for i in range(10)]


def test_a_conversation_by_reference_equals_chat_with_the_full_history(client):
    responses = converse(client, TURNS, instructions=None)
    system = client.responses.create(input=TURNS[0], instructions="Speak as a king.", **GREEDY)
    completions = chat_replies(client, [], TURNS)
    assert [r.output_text for r in responses] == [c.choices[0].message.content for c in completions]
    # usage counts the whole conversation as input; from the second turn on, most of it is restored
    assert [r.usage.input_tokens for r in responses] == [c.usage.prompt_tokens for c in completions]
    for before, response in zip(responses, responses[1:], strict=False):
        assert response.usage.input_tokens_details.cached_tokens == before.usage.input_tokens
        assert response.previous_response_id == before.id
    (with_system,) = chat_replies(client, [{"role": "system", "content": "Speak as a king."}], TURNS[:1])
    assert system.output_text == with_system.choices[0].message.content


def test_streaming_sends_the_response_events_in_order(client):
    first = client.responses.create(input="Once upon a time", **GREEDY)
    events = list(client.responses.create(input="and then?", previous_response_id=first.id, stream=True, **GREEDY))
    kinds = [e.type for e in events]
    deltas = kinds.count("response.output_text.delta")
    final = events[-1].response  # "incomplete": it ran out of max_output_tokens; "completed": it ended
    assert kinds == ["response.created", "response.in_progress", "response.output_item.added",
                     "response.content_part.added", *["response.output_text.delta"] * deltas,
                     "response.output_text.done", "response.content_part.done", "response.output_item.done",
                     f"response.{final.status}"]
    assert [e.sequence_number for e in events] == list(range(len(events)))
    text = "".join(e.delta for e in events if e.type == "response.output_text.delta")
    assert events[-4].text == text == final.output_text and 0 < final.usage.output_tokens <= 6
    assert client.responses.retrieve(final.id).output_text == text  # stored, like a non-streamed one
    (same,) = converse(client, ["and then?"], previous=first.id)
    assert same.output_text == text


def test_store_false_is_not_kept_and_get_delete_work(client):
    unstored = client.responses.create(input="Hello", store=False, **GREEDY)
    with pytest.raises(openai.NotFoundError):
        client.responses.retrieve(unstored.id)
    with pytest.raises(openai.NotFoundError, match="not found"):
        client.responses.create(input="more", previous_response_id=unstored.id, **GREEDY)
    kept = client.responses.create(input="Hello", metadata={"topic": "greeting"}, **GREEDY)
    got = client.responses.retrieve(kept.id)
    assert got.output_text == unstored.output_text == kept.output_text and got.metadata == {"topic": "greeting"}
    client.responses.delete(kept.id)
    with pytest.raises(openai.NotFoundError):
        client.responses.retrieve(kept.id)
    with pytest.raises(openai.NotFoundError):
        client.responses.delete(kept.id)


@pytest.mark.parametrize(("kwargs", "param"), [
    (dict(tools=[{"type": "function", "name": "f", "parameters": {}}]), "tools"),
    (dict(reasoning={"effort": "low"}), "reasoning"),
    (dict(input=[{"type": "function_call_output", "call_id": "c", "output": "x"}]), "input[0].type"),
    (dict(input=[{"role": "user", "content": [{"type": "input_image", "image_url": "http://x"}]}]),
     "input[0].content[0].type"),
    (dict(input=[{"role": "tool", "content": "x"}]), "input[0].role"),
    (dict(max_output_tokens=0), "max_output_tokens"),
    (dict(temperature=3), "temperature"),
    (dict(text={"format": {"type": "json_object"}}), "text.format"),
    (dict(truncation="auto"), "truncation"),
])
def test_fields_not_implemented_are_a_400_naming_them(client, kwargs, param):
    with pytest.raises(openai.BadRequestError) as error:
        client.responses.create(**{"input": "x", **GREEDY, **kwargs})
    assert error.value.body["param"] == param


def test_fields_that_ask_for_what_the_server_does_are_accepted(client):
    plain = client.responses.create(input="x", **GREEDY)
    same = client.responses.create(input="x", text={"format": {"type": "text"}}, truncation="disabled", tools=[],
                                   tool_choice="none", **GREEDY)
    assert same.output_text == plain.output_text


def test_salts_never_share_a_state(client, server):
    prompt = "A prompt that two salts both send."
    first = client.responses.create(input=prompt, **GREEDY, extra_body={"cache_salt": "a"})
    other = client.responses.create(input=prompt, **GREEDY, extra_body={"cache_salt": "b"})
    again = client.responses.create(input=prompt, **GREEDY, extra_body={"cache_salt": "a"})
    assert first.usage.input_tokens_details.cached_tokens == other.usage.input_tokens_details.cached_tokens == 0
    assert again.usage.input_tokens_details.cached_tokens == again.usage.input_tokens  # same salt: restored
    with pytest.raises(openai.BadRequestError) as error:  # a conversation keeps its salt
        client.responses.create(input="more", previous_response_id=first.id, **GREEDY, extra_body={"cache_salt": "b"})
    assert error.value.body["param"] == "cache_salt"


def test_a_restarted_server_continues_stored_conversations_from_disk(tiny_checkpoint, tmp_path):
    """Three turns, a restart (SIGTERM), the fourth turn from the disk tier; another restart with every
    saved state corrupted: the fifth turn recomputes them, and all equal chat with the full history."""
    args = ("--served-model-name", MODEL, "--state-disk-dir", str(tmp_path))

    def serve() -> tuple[ServerProcess, OpenAI]:
        proc = ServerProcess(tiny_checkpoint, *args)
        return proc, OpenAI(base_url=f"{proc.url}/v1", api_key="unused", max_retries=0)

    proc, client = serve()
    try:
        responses = converse(client, TURNS[:3])
    finally:
        proc.stop()
    proc, client = serve()
    try:
        assert client.responses.retrieve(responses[0].id).output_text == responses[0].output_text
        responses += converse(client, TURNS[3:4], previous=responses[-1].id)
        values = metric_values(proc.url)
        assert values[("miras:state_tier_hits_total", (("model_name", MODEL), ("tier", "disk")))] == 1
    finally:
        proc.stop()
    for path in Path(tmp_path).rglob("*.state"):
        data = bytearray(path.read_bytes())
        data[-1] ^= 0xFF
        path.write_bytes(bytes(data))
    proc, client = serve()
    try:
        responses += converse(client, TURNS[4:5], previous=responses[-1].id)
        values = metric_values(proc.url)
        assert values[("miras:state_tier_rejected_total", (("model_name", MODEL), ("reason", "corrupt")))] >= 1
        assert values[("miras:state_tier_hits_total", (("model_name", MODEL), ("tier", "disk")))] == 0
        completions = chat_replies(client, [], TURNS[:5])
    finally:
        proc.stop()
    assert [r.output_text for r in responses] == [c.choices[0].message.content for c in completions]
    assert responses[-1].usage.input_tokens_details.cached_tokens < responses[-2].usage.input_tokens


def test_another_tenant_sees_no_response(tiny_checkpoint):
    """GET, DELETE and previous_response_id all go through the tenant of the request (its API key), and so
    do saved states; DELETE drops the response's saved states too."""
    model, tokenizer = load_model(tiny_checkpoint)
    engine = LLMEngine(model, tokenizer, EngineConfig(max_num_seqs=2, max_num_batched_tokens=64), MODEL)
    state = ServerState(AsyncEngine(engine), ServerSettings(MODEL, str(tiny_checkpoint), ["key-a", "key-b"]))
    mine, other = {"Authorization": "Bearer key-a"}, {"Authorization": "Bearer key-b"}

    async def scenario() -> None:
        transport = httpx.ASGITransport(app=build_app(state))
        async with httpx.AsyncClient(transport=transport, base_url="http://app") as http:
            body = {"input": "hi", "max_output_tokens": 2, "temperature": 0}
            made = (await http.post("/v1/responses", json=body, headers=mine)).json()
            assert (await http.get(f"/v1/responses/{made['id']}", headers=other)).status_code == 404
            assert (await http.delete(f"/v1/responses/{made['id']}", headers=other)).status_code == 404
            follow = await http.post("/v1/responses", json={**body, "previous_response_id": made["id"]}, headers=other)
            assert follow.status_code == 404 and follow.json()["error"]["param"] == "previous_response_id"
            assert (await http.get(f"/v1/responses/{made['id']}", headers=mine)).status_code == 200
            # the same input from another tenant restores nothing of the first one's; from the same, all of it
            same = (await http.post("/v1/responses", json=body, headers=other)).json()
            again = (await http.post("/v1/responses", json=body, headers=mine)).json()
            assert same["usage"]["input_tokens_details"]["cached_tokens"] == 0
            assert again["usage"]["input_tokens_details"]["cached_tokens"] == again["usage"]["input_tokens"]
            # deleting a response also deletes its saved states (on the engine thread)
            stored = state.responses.store.get(tenant_id("key-a"), made["id"])
            assert stored.prompt_key in engine.state_cache.entries
            assert (await http.delete(f"/v1/responses/{made['id']}", headers=mine)).status_code == 200
            for _ in range(100):
                if stored.prompt_key not in engine.state_cache.entries:
                    break
                await asyncio.sleep(0.05)
            assert stored.prompt_key not in engine.state_cache.entries
            assert stored.finish_key not in engine.state_cache.entries

    state.engine.start()
    try:
        asyncio.run(scenario())
    finally:
        state.engine.stop()


@pytest.mark.parametrize(("template", "restores"), [("{role}: {content}\n", "prompt"),
                                                    ("{role}:{content}\n", "finish")])
def test_a_turn_is_the_whole_history_rendered_whichever_state_it_restores(tiny_checkpoint, template, restores):
    """The restored state's tokens and the prefilled ones make up the chat rendering of the whole history.
    A template that re-renders a reply with a space the generated tokens lack (the default) continues the
    state after the previous prompt; where the reply re-renders as generated (the shipped models'), the
    state after it."""
    model, tokenizer = load_model(tiny_checkpoint)
    tokenizer.chat_template = template
    engine = LLMEngine(model, tokenizer, EngineConfig(max_num_seqs=2, max_num_batched_tokens=64), MODEL)
    serving = OpenAIServingResponses(AsyncEngine(engine), MODEL, 30.0, TextLimits(tokenizer, 1 << 20),
                                     store=ResponseStore(10, 1 << 20, 0))
    hello = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hello there"}]
    first = asyncio.run(serving._turn(hello, None, "ns"))
    reply = " Shall I compare thee"
    generated = tokenizer.encode(reply) + [tokenizer.eos_token_id]
    previous = StoredResponse("r", "", "ns", {}, first.conversation, first.length, generated, reply,
                              first.key(first.prompt), first.key(first.prompt + generated[:-1]))
    more = [{"role": "user", "content": "And then?"}]
    turn = asyncio.run(serving._turn(more, previous, "ns"))
    whole = tokenizer.encode(tokenizer.apply_chat_template(
        [*hello, {"role": "assistant", "content": reply}, *more]), add_bos=True)
    assert turn.context.token_ids() + turn.prompt == whole == turn.conversation.token_ids()
    assert turn.context.key == (previous.prompt_key if restores == "prompt" else previous.finish_key)
    assert turn.context.length == len(turn.context.token_ids()) and turn.length == len(whole)


def test_an_engine_failure_mid_stream_ends_with_error_and_response_failed(tiny_checkpoint):
    model, tokenizer = load_model(tiny_checkpoint)
    engine = LLMEngine(model, tokenizer, EngineConfig(max_num_seqs=2, max_num_batched_tokens=64), MODEL)
    state = ServerState(AsyncEngine(engine), ServerSettings(MODEL, str(tiny_checkpoint)))
    real_step, calls = engine.step, []

    def failing_step():
        calls.append(1)
        if len(calls) > 3:
            raise RuntimeError("device lost")
        return real_step()

    engine.step = failing_step

    async def scenario() -> str:
        transport = httpx.ASGITransport(app=build_app(state))
        async with httpx.AsyncClient(transport=transport, base_url="http://app") as http:
            body = {"input": "hi", "max_output_tokens": 50, "temperature": 0, "stream": True}
            return (await http.post("/v1/responses", json=body)).text

    state.engine.start()
    try:
        text = asyncio.run(scenario())
    finally:
        state.engine.stop()
    events = [json.loads(line[6:]) for line in text.splitlines() if line.startswith("data: ")]
    assert [e["type"] for e in events[-2:]] == ["error", "response.failed"]
    assert "device lost" in events[-2]["message"] and events[-1]["response"]["status"] == "failed"
    assert [e["sequence_number"] for e in events] == list(range(len(events)))
    assert not state.responses.store.count("")  # a failed response is not stored
