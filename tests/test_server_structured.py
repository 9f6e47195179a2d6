"""Structured outputs and tool calls: the sampler's grammar-mask stage, and the API with the official openai client
on the shipped moneta-tiny (json_schema for random schemas, guided choice / regex / grammar, tool calls, 400s)."""

from __future__ import annotations

import asyncio
import json
import random
import re
from pathlib import Path

import httpx
import jsonschema
import numpy as np
import openai
import pytest
import torch
from test_server_support import ServerProcess

from miras_serve import models
from miras_serve.server.engine import EngineConfig, LLMEngine
from miras_serve.server.errors import APIError
from miras_serve.server.protocol import ChatCompletionRequest
from miras_serve.server.sampler import Sampler
from miras_serve.server.sampling_params import GuidedDecoding, ParamError, SamplingParams
from miras_serve.server.tool_calls import parse_tool_calls, tool_mode

MODEL_DIR = Path(models.__file__).parent / "pretrained" / "moneta-tiny"
MODEL = "moneta-tiny"


# ---- the sampler's mask stage -------------------------------------------------------------------------------

class FixedMatcher:
    """Allows the same few tokens at every step (a stand-in for a grammar)."""

    def __init__(self, allowed: list[int]):
        self.allowed = allowed

    def fill_bitmask(self, bitmask: np.ndarray, row: int) -> None:
        bitmask[row] = 0
        for t in self.allowed:
            bitmask[row, t // 32] |= np.int32(np.uint32(1 << (t % 32)).view(np.int32))


@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_masked_rows_sample_only_allowed_tokens_and_leave_other_rows_alone(temperature):
    vocab, slots = 100, [0, 1, 2, 3]
    allowed = {1: [5, 31, 32, 63, 99], 3: [0, 64]}  # word edges and the sign bit of an int32 word
    logits = torch.randn(4, vocab, generator=torch.Generator().manual_seed(0)) * 3

    def run(constrained: bool) -> list[list[int]]:
        sampler = Sampler(4, vocab, 2, torch.device("cpu"), torch.Generator().manual_seed(0))
        for slot in slots:
            matcher = FixedMatcher(allowed[slot]) if constrained and slot in allowed else None
            sampler.add(slot, SamplingParams(temperature=temperature, seed=slot), 0, [1], matcher)
        return [sampler.sample(logits, slots)[0] for _ in range(20)]

    masked, plain = run(True), run(False)
    for step_tokens, plain_tokens in zip(masked, plain, strict=True):
        for b, slot in enumerate(slots):
            if slot in allowed:
                assert step_tokens[b] in allowed[slot]
            else:  # an unconstrained row's draw does not depend on its neighbours' masks
                assert step_tokens[b] == plain_tokens[b]
    if temperature:
        assert len({t[1] for t in masked}) > 1  # a constrained row still samples among what is allowed


def test_without_the_grammar_package_a_constrained_request_is_a_400_naming_its_field(tokenizer):
    from conftest import small_model

    engine = LLMEngine(small_model("linear"), tokenizer, EngineConfig(max_num_seqs=2, state_cache_bytes=0))
    engine.validate([1, 5], SamplingParams(guided=GuidedDecoding("regex", "[ab]+", "guided_regex")))
    engine.grammars = None  # as when llguidance is not installed
    with pytest.raises(ParamError, match="llguidance") as err:
        engine.validate([1, 5], SamplingParams(guided=GuidedDecoding("regex", "[ab]+", "guided_regex")))
    assert err.value.param == "guided_regex"
    engine.validate([1, 5], SamplingParams())  # unconstrained requests are served as before


# ---- tool modes (no server) ---------------------------------------------------------------------------------

WEATHER = {"type": "function", "function": {"name": "get_weather", "parameters": {
    "type": "object", "properties": {"city": {"type": "string", "maxLength": 12},
                                     "unit": {"enum": ["c", "f"]}},
    "required": ["city", "unit"], "additionalProperties": False}}}
ADD = {"type": "function", "function": {"name": "add", "parameters": {
    "type": "object", "properties": {"a": {"type": "integer", "minimum": 0, "maximum": 99},
                                     "b": {"type": "integer", "minimum": 0, "maximum": 99}},
    "required": ["a", "b"], "additionalProperties": False}}}


def chat_request(**kw) -> ChatCompletionRequest:
    return ChatCompletionRequest(messages=[{"role": "user", "content": "hi"}], **kw)


def test_auto_tool_choice_needs_the_flag():
    for kw in ({"tools": [WEATHER]}, {"tools": [WEATHER], "tool_choice": "auto"}):
        with pytest.raises(APIError, match="--enable-auto-tool-choice") as err:
            tool_mode(chat_request(**kw), None)
        assert err.value.param == "tool_choice"
    assert tool_mode(chat_request(tools=[WEATHER]), "miras_json").choice == "auto"
    assert tool_mode(chat_request(tools=[WEATHER], tool_choice="none"), None) is None


def test_tool_choice_errors_name_the_field():
    with pytest.raises(APIError, match="not in tools"):
        tool_mode(chat_request(tools=[WEATHER], tool_choice={"type": "function", "function": {"name": "x"}}), None)
    with pytest.raises(APIError, match="needs tools"):
        tool_mode(chat_request(tool_choice="required"), None)


def test_miras_json_parser():
    mode = tool_mode(chat_request(tools=[WEATHER, ADD]), "miras_json")
    calls = parse_tool_calls('[{"name":"add","arguments":{"a":1,"b":2}}]', mode)
    parsed = [(c.function.name, json.loads(c.function.arguments)) for c in calls]
    assert parsed == [("add", {"a": 1, "b": 2})]
    for text in ("hello", '[{"name":"nope","arguments":{}}]', "[]", '{"name":"add","arguments":{}}', '[{"name":"add"'):
        assert parse_tool_calls(text, mode) is None


# ---- the API, with the official client ----------------------------------------------------------------------

@pytest.fixture(scope="module")
def server():
    proc = ServerProcess(MODEL_DIR, "--served-model-name", MODEL, "--max-num-seqs", "48", "--state-cache-gb", "0",
                         "--enable-auto-tool-choice", "--tool-call-parser", "miras_json")
    yield proc
    proc.stop()


@pytest.fixture(scope="module")
def client(server) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{server.url}/v1", api_key="none", max_retries=0, timeout=120)


@pytest.fixture(scope="module")
def aclient(server) -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(base_url=f"{server.url}/v1", api_key="none", max_retries=0, timeout=120)


def random_schema(rng: random.Random, depth: int = 0) -> dict:
    kind = rng.choice(["object", "array", "enum", "integer", "number", "string", "boolean"] if depth < 2
                      else ["enum", "integer", "number", "string", "boolean"])
    if depth == 0:
        kind = "object"
    if kind == "object":
        props = {f"k{i}_{rng.choice('abcxyz')}": random_schema(rng, depth + 1) for i in range(rng.randint(1, 3))}
        return {"type": "object", "properties": props, "required": list(props), "additionalProperties": False}
    if kind == "array":
        low = rng.randint(0, 2)
        return {"type": "array", "items": random_schema(rng, depth + 1), "minItems": low, "maxItems": low + 2}
    if kind == "enum":
        return {"enum": rng.sample(["red", "green", "blue", 7, None, "x y"], rng.randint(1, 4))}
    if kind == "integer":
        low = rng.randint(-50, 50)
        return {"type": "integer", "minimum": low, "maximum": low + rng.randint(0, 100)}
    if kind == "number":
        return {"type": "number", "minimum": -1.5, "maximum": rng.choice([2.0, 10.25, 1000.0])}
    if kind == "string":
        return {"type": "string", "minLength": 1, "maxLength": rng.randint(1, 10)}
    return {"type": "boolean"}


SCHEMAS = [random_schema(random.Random(seed)) for seed in range(20)]


def json_schema_format(schema: dict) -> dict:
    return {"type": "json_schema", "json_schema": {"name": "out", "schema": schema, "strict": True}}


def stream_texts(stream) -> dict[int, tuple[str, str | None]]:
    """A stream's choices: index -> (text, finish_reason)."""
    texts: dict[int, tuple[str, str | None]] = {}
    for chunk in stream:
        for choice in chunk.choices:
            text, finish = texts.get(choice.index, ("", None))
            texts[choice.index] = (text + (choice.delta.content or ""), choice.finish_reason or finish)
    return texts


@pytest.mark.parametrize("index", range(len(SCHEMAS)))
def test_json_schema_outputs_validate(client, index):
    schema, stream = SCHEMAS[index], index % 2 == 1
    kw = dict(model=MODEL, messages=[{"role": "user", "content": "Give me JSON."}], temperature=1.0, seed=index,
              max_tokens=400, n=2, response_format=json_schema_format(schema))
    if stream:
        outputs = list(stream_texts(client.chat.completions.create(stream=True, **kw)).values())
    else:
        outputs = [(c.message.content, c.finish_reason) for c in client.chat.completions.create(**kw).choices]
    assert len(outputs) == 2
    for text, finish in outputs:
        if finish == "stop":
            jsonschema.validate(json.loads(text), schema)
        else:  # cut by max_tokens (the tiny model can write a number's digits forever): a valid start of one
            assert finish == "length" and json_object_so_far(text), (finish, text)


def json_object_so_far(text: str) -> bool:
    """A JSON object, or the start of one that a few closing characters complete (the tiny model writes
    Shakespeare into its first string and runs out of tokens before closing it)."""
    for end in ("", '":0}', '"}', "}", "0}", '"]}', "]}"):
        try:
            return isinstance(json.loads(text + end), dict)
        except ValueError:
            continue
    return False


def assert_guided_json(text: str, finish_reason: str, schema: dict) -> None:
    """A finished constrained output is a document of the schema; one cut by max_tokens is the start of one
    (the constraint holds every token; when the document closes is up to the model: a tiny model can write
    a number's digits until it runs out of tokens)."""
    if finish_reason == "length":
        assert json_object_so_far(text), text
    else:
        jsonschema.validate(json.loads(text), schema)


@pytest.mark.parametrize("stream", [False, True])
def test_completions_json_object_and_guided_json(client, stream):
    schema = SCHEMAS[3]
    for extra in ({"response_format": {"type": "json_object"}}, {"guided_json": schema}, {}):
        kw = dict(model=MODEL, prompt="ROMEO.\n", max_tokens=120, temperature=0.7, seed=1, extra_body=extra)
        if stream:
            chunks = [c.choices[0] for c in client.completions.create(stream=True, **kw) if c.choices]
            text, finish_reason = "".join(c.text for c in chunks), chunks[-1].finish_reason
        else:
            choice = client.completions.create(**kw).choices[0]
            text, finish_reason = choice.text, choice.finish_reason
        if "guided_json" in extra:
            assert_guided_json(text, finish_reason, schema)
        else:  # unconstrained, the same request writes prose
            assert json_object_so_far(text) == ("response_format" in extra), text


def test_guided_choice_regex_and_grammar(client):
    choices = ["yes", "no", "maybe so"]
    out = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "Well?"}], n=4, seed=3,
                                         max_tokens=20, extra_body={"guided_choice": choices})
    assert all(c.message.content in choices for c in out.choices)
    pattern = r"[A-Z][a-z]{2,6}-[0-9]{3}"
    out = client.completions.create(model=MODEL, prompt="Code:", max_tokens=20, n=3, seed=4,
                                    extra_body={"guided_regex": pattern})
    assert all(re.fullmatch(pattern, c.text) for c in out.choices)
    lark = 'start: "(" num ("+" num)* ")"\nnum: /[1-9][0-9]?/'
    out = client.completions.create(model=MODEL, prompt="Sum:", max_tokens=40, seed=5,
                                    extra_body={"guided_grammar": lark})
    assert re.fullmatch(r"\([1-9][0-9]?(\+[1-9][0-9]?)*\)", out.choices[0].text)


def test_constrained_and_plain_rows_in_one_batch(aclient):
    """Plain requests give the same tokens alone and in a batch full of constrained rows."""
    plain = dict(model=MODEL, prompt="ROMEO.\n", max_tokens=24, temperature=0.9, seed=11)

    async def run() -> tuple[str, list[str]]:
        alone = (await aclient.completions.create(**plain)).choices[0].text
        mixed = await asyncio.gather(
            aclient.completions.create(**plain),
            *(aclient.completions.create(model=MODEL, prompt="x", max_tokens=200, seed=i, temperature=1.0,
                                         extra_body={"guided_json": SCHEMAS[i]}) for i in range(6)))
        return alone, [m.choices[0] for m in mixed]

    alone, mixed = asyncio.run(run())
    assert mixed[0].text == alone
    for i, choice in enumerate(mixed[1:]):
        assert_guided_json(choice.text, choice.finish_reason, SCHEMAS[i])
    assert any(choice.finish_reason == "stop" for choice in mixed[1:])  # some documents close within 200 tokens


@pytest.mark.parametrize("stream", [False, True])
def test_tool_choice_required_and_named_produce_parsing_calls(client, stream):
    params = {t["function"]["name"]: t["function"]["parameters"] for t in (WEATHER, ADD)}
    messages = [{"role": "user", "content": "Weather in Paris?"}]
    for choice in ("required", {"type": "function", "function": {"name": "add"}}):
        # one call each: the tiny model never ends an array of calls by itself
        kw = dict(model=MODEL, messages=messages, tools=[WEATHER, ADD], tool_choice=choice, max_tokens=200,
                  temperature=1.0, seed=7, n=2, parallel_tool_calls=False)
        if stream:
            calls: dict[tuple[int, int], dict] = {}
            reasons = {}
            for chunk in client.chat.completions.create(stream=True, **kw):
                for c in chunk.choices:
                    for call in c.delta.tool_calls or []:
                        calls[(c.index, call.index)] = {"name": call.function.name,
                                                        "arguments": call.function.arguments}
                    if c.finish_reason:
                        reasons[c.index] = c.finish_reason
            found = list(calls.values())
            assert sorted(reasons) == [0, 1]
        else:
            out = client.chat.completions.create(**kw)
            found = [{"name": t.function.name, "arguments": t.function.arguments}
                     for c in out.choices for t in c.message.tool_calls]
            reasons = {c.index: c.finish_reason for c in out.choices}
            assert all(c.message.content is None for c in out.choices)
        assert len(found) >= 2
        expected = "tool_calls" if choice == "required" else "stop"
        assert set(reasons.values()) == {expected}
        for call in found:
            if choice != "required":
                assert call["name"] == "add"
            jsonschema.validate(json.loads(call["arguments"]), params[call["name"]])


def test_tool_messages_render_and_auto_answers(client, server):
    messages = [{"role": "user", "content": "Add 2 and 3."},
                {"role": "assistant", "content": None, "tool_calls": [
                    {"id": "call_1", "type": "function", "function": {"name": "add", "arguments": '{"a":2,"b":3}'}}]},
                {"role": "tool", "tool_call_id": "call_1", "content": "5"}]
    rendered = httpx.post(f"{server.url}/tokenize", json={"messages": messages, "tools": [ADD]}).json()
    text = models.load_pretrained(MODEL_DIR)[1].decode(rendered["tokens"])
    assert text.startswith("tools:[{\"name\": \"add\"")
    assert 'assistant:[{"name": "add", "arguments": {"a": 2, "b": 3}}]\ntool:5\nassistant:' in text
    out = client.chat.completions.create(model=MODEL, messages=messages, tools=[ADD], max_tokens=30, seed=1)
    choice = out.choices[0]
    assert choice.finish_reason in ("stop", "length")  # the tiny model answers in prose: plain content
    assert choice.message.content and not choice.message.tool_calls


@pytest.mark.parametrize("body, param", [
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "nonsense"}}}},
     "response_format"),
    ({"guided_regex": "(unclosed"}, "guided_regex"),
    ({"guided_grammar": "start: undefined_rule"}, "guided_grammar"),
    ({"guided_json": "{not json"}, "guided_json"),
    ({"guided_regex": "a", "guided_choice": ["a"]}, "guided_choice"),
    ({"tools": [{"type": "function", "function": {"name": "f", "parameters": {"minProperties": "x"}}}],
      "tool_choice": "required"}, "tools"),
])
def test_invalid_constraints_are_400_naming_the_field(client, body, param):
    with pytest.raises(openai.BadRequestError) as err:
        client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "hi"}], max_tokens=5,
                                       extra_body=body)
    assert err.value.body["param"] == param, err.value.body
