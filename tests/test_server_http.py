"""The OpenAI-compatible HTTP API against one real uvicorn server on loopback (shared by this module)."""

from __future__ import annotations

import asyncio
import json
import time

import httpx
import openai
import pytest
from test_server_support import ServerProcess, metric, metric_values

KEY = "test-key"
AUTH = {"Authorization": f"Bearer {KEY}"}
MODEL = "tiny"
ORIGIN = "http://app.example"


@pytest.fixture(scope="module")
def server(tiny_checkpoint):
    proc = ServerProcess(tiny_checkpoint, "--served-model-name", MODEL, "--api-key", KEY, "--allowed-origins", ORIGIN,
                         "--max-num-seqs", "40", "--max-num-batched-tokens", "512", "--max-prompt-tokens", "4000")
    yield proc
    proc.stop()


@pytest.fixture(scope="module")
def url(server) -> str:
    return server.url


@pytest.fixture(scope="module")
def client(url) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{url}/v1", api_key=KEY, max_retries=0, timeout=60)


def post(url: str, path: str, body: dict, timeout: float = 60) -> httpx.Response:
    return httpx.post(f"{url}{path}", json=body, headers=AUTH, timeout=timeout)


def sse_events(raw: bytes) -> list[str]:
    assert raw.endswith(b"data: [DONE]\n\n")
    events = raw.split(b"\n\n")
    assert events[-1] == b""
    assert all(e.startswith(b"data: ") and b"\n" not in e for e in events[:-1])
    return [e[len(b"data: "):].decode() for e in events[:-1]]


def greedy(**kw) -> dict:
    return {"model": MODEL, "temperature": 0, "ignore_eos": True, **kw}


def test_openai_client_sync_completion_and_chat(client):
    done = client.completions.create(prompt="Shall I compare thee", max_tokens=8, extra_body={"ignore_eos": True},
                                     temperature=0, model=MODEL)
    assert done.object == "text_completion" and done.model == MODEL and done.id.startswith("cmpl-")
    assert done.usage.completion_tokens == 8 and done.choices[0].finish_reason == "length"
    streamed = client.completions.create(prompt="Shall I compare thee", max_tokens=8, temperature=0, model=MODEL,
                                         extra_body={"ignore_eos": True}, stream=True)
    assert "".join(c.choices[0].text for c in streamed) == done.choices[0].text
    messages = [{"role": "user", "content": "Thou art more lovely"}]
    chat = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=6, temperature=0,
                                          extra_body={"ignore_eos": True})
    assert chat.object == "chat.completion" and chat.choices[0].message.role == "assistant"
    assert chat.usage.completion_tokens == 6
    chunks = list(client.chat.completions.create(model=MODEL, messages=messages, max_tokens=6, temperature=0,
                                                 extra_body={"ignore_eos": True}, stream=True))
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == chat.choices[0].message.content
    assert chunks[-1].choices[0].finish_reason == "length"
    assert client.models.list().data[0].id == MODEL


def test_openai_client_async_with_usage_chunk(url):
    async def run() -> None:
        client = openai.AsyncOpenAI(base_url=f"{url}/v1", api_key=KEY, max_retries=0, timeout=60)
        async with client:
            stream = await client.chat.completions.create(
                model=MODEL, messages=[{"role": "user", "content": "hi"}], max_tokens=5, temperature=0, stream=True,
                stream_options={"include_usage": True}, extra_body={"ignore_eos": True})
            chunks = [c async for c in stream]
            assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 5
            assert all(c.usage is None for c in chunks[:-1])
            results = await asyncio.gather(*[client.completions.create(
                model=MODEL, prompt=f"From fairest {i}", max_tokens=4, temperature=0, extra_body={"ignore_eos": True})
                for i in range(4)])
            assert all(r.usage.completion_tokens == 4 for r in results)
            streamed = await client.completions.create(model=MODEL, prompt="From fairest 0", max_tokens=4,
                                                       temperature=0, stream=True, extra_body={"ignore_eos": True})
            assert "".join([c.choices[0].text async for c in streamed]) == results[0].choices[0].text

    asyncio.run(run())


def test_sse_framing_byte_for_byte(url):
    body = greedy(prompt="beauty's rose", max_tokens=4, stream=True, stream_options={"include_usage": True})
    with httpx.stream("POST", f"{url}/v1/completions", json=body, headers={**AUTH, "X-Request-Id": "abc-123"},
                      timeout=60) as response:
        assert response.status_code == 200
        assert response.headers["content-type"] == "text/event-stream; charset=utf-8"
        assert response.headers["x-request-id"] == "abc-123"
        raw = response.read()
    events = sse_events(raw)
    assert events[-1] == "[DONE]"
    chunks = [json.loads(e) for e in events[:-1]]
    assert {c["id"] for c in chunks} == {chunks[0]["id"]} and all(c["object"] == "text_completion" for c in chunks)
    assert chunks[-1]["choices"] == [] and chunks[-1]["usage"]["completion_tokens"] == 4
    assert chunks[-2]["choices"][0]["finish_reason"] == "length"
    assert all(c["choices"][0]["finish_reason"] is None for c in chunks[:-2])
    assert raw.startswith(b'data: {"id":"cmpl-')


def test_stream_usage_and_logprobs_per_chunk(url):
    body = greedy(prompt="beauty's rose", max_tokens=5, stream=True, logprobs=2,
                  stream_options={"include_usage": True, "continuous_usage_stats": True})
    chunks = [json.loads(e) for e in sse_events(post(url, "/v1/completions", body).content)[:-1]]
    assert [c["usage"]["completion_tokens"] for c in chunks] == [1, 2, 3, 4, 5, 5]
    logprobs = [c["choices"][0]["logprobs"] for c in chunks[:-1]]
    assert all(len(lp["tokens"]) == 1 and len(lp["top_logprobs"][0]) <= 2 for lp in logprobs)
    offsets = [lp["text_offset"][0] for lp in logprobs]
    assert offsets == sorted(offsets) and offsets[0] == 0
    chat = greedy(messages=[{"role": "user", "content": "hi"}], max_tokens=3, stream=True, n=2)
    chunks = [json.loads(e) for e in sse_events(post(url, "/v1/chat/completions", chat).content)[:-1]]
    assert [c["choices"][0]["delta"] for c in chunks[:2]] == [{"role": "assistant", "content": ""}] * 2
    assert sorted(c["choices"][0]["index"] for c in chunks if c["choices"][0]["finish_reason"]) == [0, 1]


def test_batch_stream_finishes_every_choice(url):
    body = greedy(prompt=["a", "b"], n=2, max_tokens=3, stream=True)
    raw = httpx.post(f"{url}/v1/completions", json=body, headers=AUTH, timeout=60).content
    chunks = [json.loads(e) for e in sse_events(raw)[:-1]]
    assert all("error" not in c for c in chunks)
    finished = sorted(c["choices"][0]["index"] for c in chunks if c["choices"][0]["finish_reason"])
    assert finished == [0, 1, 2, 3]


def test_32_concurrent_streams_equal_solo_results(url):
    prompts = [f"Shall I compare thee to a summer's day {i} " * (1 + i % 5) for i in range(32)]
    solo = [post(url, "/v1/completions", greedy(prompt=p, max_tokens=12)).json()["choices"][0]["text"]
            for p in prompts]

    async def stream(client: httpx.AsyncClient, prompt: str) -> str:
        text, finish = "", None
        async with client.stream("POST", "/v1/completions", json=greedy(prompt=prompt, max_tokens=12, stream=True),
                                 headers=AUTH) as response:
            assert response.status_code == 200
            async for line in response.aiter_lines():
                if line.startswith("data: {"):
                    choice = json.loads(line[6:])["choices"][0]
                    text, finish = text + choice["text"], choice["finish_reason"] or finish
        assert finish == "length"
        return text

    async def run() -> list[str]:
        limits = httpx.Limits(max_connections=64)
        async with httpx.AsyncClient(base_url=url, timeout=120, limits=limits) as client:
            return await asyncio.gather(*[stream(client, p) for p in prompts])

    assert asyncio.run(run()) == solo


def wait_for_idle(url: str, timeout: float = 20.0) -> dict:
    deadline = time.monotonic() + timeout
    while True:
        values = metric_values(url)
        if metric(values, "miras:num_requests_running") == 0 and metric(values, "miras:state_slots_used") == 0:
            return values
        assert time.monotonic() < deadline, "requests still running"
        time.sleep(0.05)


def test_disconnect_mid_stream_frees_the_slot(url):
    before = wait_for_idle(url)
    body = greedy(prompt="never ending", max_tokens=200000, stream=True)
    with httpx.stream("POST", f"{url}/v1/completions", json=body, headers=AUTH, timeout=60) as response:
        lines = response.iter_lines()
        assert next(line for line in lines if line.startswith("data: {"))
        assert metric(metric_values(url), "miras:num_requests_running") == 1
    after = wait_for_idle(url)
    aborted = metric(after, "miras:request_success_total", finished_reason="abort")
    assert aborted == metric(before, "miras:request_success_total", finished_reason="abort") + 1


def test_non_streaming_disconnect_aborts(url):
    before = wait_for_idle(url)
    with pytest.raises(httpx.ReadTimeout):
        post(url, "/v1/completions", greedy(prompt="never ending", max_tokens=200000), timeout=1.0)
    after = wait_for_idle(url)
    aborted = metric(after, "miras:request_success_total", finished_reason="abort")
    assert aborted == metric(before, "miras:request_success_total", finished_reason="abort") + 1


def test_metrics_parse_and_counters_match_requests(url):
    before = wait_for_idle(url)
    usages = [post(url, "/v1/completions", greedy(prompt="x" * (3 + i), max_tokens=2 + i)).json()["usage"]
              for i in range(3)]
    chat = post(url, "/v1/chat/completions", greedy(messages=[{"role": "user", "content": "hi"}], max_tokens=3))
    usages.append(chat.json()["usage"])
    after = wait_for_idle(url)

    def delta(name: str, **labels: str) -> float:
        return metric(after, name, **labels) - metric(before, name, **labels)

    assert delta("miras:prompt_tokens_total") == sum(u["prompt_tokens"] for u in usages)
    assert delta("miras:generation_tokens_total") == sum(u["completion_tokens"] for u in usages)
    assert delta("miras:request_success_total", finished_reason="length") == 4
    assert delta("miras:e2e_request_latency_seconds_count") == 4
    assert delta("miras:time_to_first_token_seconds_count") == 4
    assert delta("miras:inter_token_latency_seconds_count") == sum(u["completion_tokens"] - 1 for u in usages)
    assert metric(after, "miras:state_slots_capacity", model_name=MODEL) == 40
    assert metric(after, "miras:state_bytes_per_sequence") > 0
    assert metric(after, "miras:num_requests_waiting") == 0


def nested(depth: int) -> list:
    """A list nested ``depth`` lists deep."""
    value: list = []
    for _ in range(depth):
        value = [value]
    return value


BAD_INPUTS = [
    ("malformed JSON", dict(content=b'{"prompt": "x",'), 400, None),
    ("not an object", dict(content=b'[1, 2]'), 400, None),
    ("wrong type", dict(json={"prompt": "x", "max_tokens": "many"}), 400, "max_tokens"),
    ("wrong type nested", dict(json={"prompt": "x", "temperature": [1]}), 400, "temperature"),
    ("missing prompt", dict(json={"max_tokens": 3}), 400, "prompt"),
    ("empty prompt", dict(json={"prompt": ""}), 400, "prompt"),
    ("empty prompt list", dict(json={"prompt": []}), 400, "prompt"),
    ("negative max_tokens", dict(json={"prompt": "x", "max_tokens": -1}), 400, "max_tokens"),
    ("huge max_tokens", dict(json={"prompt": "x", "max_tokens": 10**12}), 400, "max_tokens"),
    ("negative temperature", dict(json={"prompt": "x", "temperature": -0.5}), 400, "temperature"),
    ("top_p above 1", dict(json={"prompt": "x", "top_p": 1.5}), 400, "top_p"),
    ("top_p zero", dict(json={"prompt": "x", "top_p": 0}), 400, "top_p"),
    ("n too large", dict(json={"prompt": "x", "n": 64}), 400, "n"),
    ("n absurd", dict(json={"prompt": "x", "n": 10**6}), 400, "n"),
    ("unknown model", dict(json={"prompt": "x", "model": "gpt-17"}), 404, "model"),
    ("token id out of vocabulary", dict(json={"prompt": [5, 10**9]}), 400, "prompt"),
    ("negative token id", dict(json={"prompt": [5, -3]}), 400, "prompt"),
    ("invalid UTF-8", dict(content=b'{"prompt": "\xff\xfe"}'), 400, None),
    ("wrong content type", dict(content=b'{"prompt": "x"}', headers={"Content-Type": "text/plain"}), 415, None),
    ("prompt over the guard", dict(json={"prompt": [5] * 4001}), 400, "prompt"),
    ("too many stop strings", dict(json={"prompt": "x", "stop": [str(i) for i in range(17)]}), 400, "stop"),
    ("empty stop string", dict(json={"prompt": "x", "stop": [""]}), 400, "stop"),
    ("logprobs too many", dict(json={"prompt": "x", "logprobs": 50}), 400, "logprobs"),
    ("stop token out of vocabulary", dict(json={"prompt": "x", "stop_token_ids": [10**6]}), 400, "stop_token_ids"),
    ("stream_options without stream", dict(json={"prompt": "x", "stream_options": {"include_usage": True}}), 400,
     "stream_options"),
    ("suffix", dict(json={"prompt": "x", "suffix": "y"}), 400, "suffix"),
    # issue 18: every one of these was a 500 or a misleading 400
    ("lone surrogate in prompt", dict(content=b'{"prompt": "\\ud800"}'), 400, "prompt"),
    ("lone surrogate in a prompt list", dict(content=b'{"prompt": ["a", "b\\udfff"]}'), 400, "prompt[1]"),
    ("lone surrogate in model", dict(content=b'{"prompt": "x", "model": "\\ud800"}'), 400, "model"),
    ("lone surrogate in stop", dict(content=b'{"prompt": "x", "stop": ["\\ud800"]}'), 400, "stop[0]"),
    ("lone surrogate in an unknown field", dict(content=b'{"prompt": "x", "user": "\\udc00"}'), 400, "user"),
    ("lone surrogate in a logit_bias key", dict(content=b'{"prompt": "x", "logit_bias": {"\\ud800": 1}}'), 400,
     "logit_bias"),
    ("superscript digit logit_bias key", dict(json={"prompt": "x", "logit_bias": {"\u00b2": 1}}), 400, "logit_bias"),
    ("5000-digit logit_bias key", dict(json={"prompt": "x", "logit_bias": {"9" * 5000: 1}}), 400, "logit_bias"),
    ("logit_bias key out of vocabulary", dict(json={"prompt": "x", "logit_bias": {"99999": 1}}), 400, "logit_bias"),
    ("5000-digit number", dict(content=b'{"prompt": "x", "seed": ' + b"7" * 5000 + b"}"), 400, None),
    ("infinite temperature", dict(content=b'{"prompt": "x", "temperature": 1e999}'), 400, "temperature"),
    ("NaN top_p", dict(content=b'{"prompt": "x", "top_p": NaN}'), 400, "top_p"),
    ("nesting past the limit", dict(json={"prompt": "x", "extra": nested(31)}), 400, "extra" + "[0]" * 31),
    ("nesting past the decoder", dict(content=b'{"prompt": "x", "extra": ' + b"[" * 100_000 + b"]" * 100_000 + b"}"),
     400, None),
    ("empty cache_salt", dict(json={"prompt": "x", "cache_salt": ""}), 400, "cache_salt"),
    ("body over --max-request-bytes", dict(json={"prompt": [5] * 600_000}), 413, None),
]


@pytest.mark.parametrize(("case", "kw", "status", "param"), BAD_INPUTS, ids=[b[0] for b in BAD_INPUTS])
def test_bad_completion_input_is_an_openai_error(url, case, kw, status, param):
    headers = {"Content-Type": "application/json", **AUTH, **kw.pop("headers", {})}
    response = httpx.post(f"{url}/v1/completions", headers=headers, timeout=30, **kw)
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["message"]
    assert error["param"] == param
    assert "UTF-8" not in error["message"] or case == "invalid UTF-8"  # each cause has its own message
    assert httpx.get(f"{url}/health", timeout=10).status_code == 200


@pytest.mark.parametrize(("path", "body", "param"), [
    ("/v1/chat/completions", b'{"messages": [{"role": "user", "content": "\\ud800"}]}', "messages[0].content"),
    ("/v1/chat/completions", b'{"messages": [{"role": "user", "content": [{"type": "text", "text": "\\udbff"}]}]}',
     "messages[0].content[0].text"),
    ("/v1/chat/completions", b'{"messages": [{"role": "user", "content": "x"}], "cache_salt": "\\ud800"}',
     "cache_salt"),
    ("/tokenize", b'{"prompt": "\\ud800"}', "prompt"),
    ("/tokenize", b'{"messages": [{"role": "user", "content": "\\ud800"}]}', "messages[0].content"),
    ("/detokenize", b'{"tokens": [5], "model": "\\udc80"}', "model"),
])
def test_lone_surrogates_anywhere_are_a_400_naming_the_field(url, path, body, param):
    response = httpx.post(f"{url}{path}", content=body, headers={**AUTH, "Content-Type": "application/json"},
                          timeout=30)
    assert response.status_code == 400, response.text
    assert response.json()["error"]["param"] == param and "surrogate" in response.json()["error"]["message"]


@pytest.mark.parametrize(("body", "param"), [
    ({"messages": []}, "messages"),
    ({"messages": [{"role": "wizard", "content": "x"}]}, "messages[0].role"),
    ({"messages": [{"role": "user", "content": 5}]}, "messages[0].content"),
    ({"messages": [{"role": "user", "content": "x"}], "max_tokens": 0}, "max_tokens"),
    ({"messages": [{"role": "user", "content": "x"}], "top_logprobs": 3}, "top_logprobs"),
])
def test_bad_chat_input_names_the_field(url, body, param):
    response = post(url, "/v1/chat/completions", body)
    assert response.status_code == 400 and response.json()["error"]["param"] == param


def test_api_key_guards_the_api_but_not_health_or_metrics(url):
    for headers in ({}, {"Authorization": "Bearer wrong"}):
        response = httpx.post(f"{url}/v1/completions", json={"prompt": "x"}, headers=headers, timeout=10)
        assert response.status_code == 401
        assert response.json()["error"]["type"] == "authentication_error"
        assert response.headers["x-request-id"]
    assert httpx.get(f"{url}/health", timeout=10).status_code == 200
    assert httpx.get(f"{url}/metrics", timeout=10).status_code == 200
    assert httpx.get(f"{url}/version", timeout=10).json()["version"]
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=f"{url}/v1", api_key="nope", max_retries=0).models.list()


def test_cors_and_request_id(url):
    preflight = httpx.options(f"{url}/v1/completions", headers={
        "Origin": ORIGIN, "Access-Control-Request-Method": "POST",
        "Access-Control-Request-Headers": "authorization,content-type"}, timeout=10)
    assert preflight.status_code == 200 and preflight.headers["access-control-allow-origin"] == ORIGIN
    response = httpx.get(f"{url}/v1/models", headers={**AUTH, "Origin": ORIGIN}, timeout=10)
    assert response.headers["access-control-allow-origin"] == ORIGIN
    assert len(response.headers["x-request-id"]) == 32
    other = httpx.options(f"{url}/v1/completions", headers={"Origin": "http://evil.example",
                                                            "Access-Control-Request-Method": "POST"}, timeout=10)
    assert "access-control-allow-origin" not in other.headers


def test_tokenize_detokenize_models(url):
    tokens = post(url, "/tokenize", {"prompt": "Shall I compare thee", "return_token_strs": True}).json()
    assert tokens["count"] == len(tokens["tokens"]) == len(tokens["token_strs"]) and tokens["tokens"][0] == 1
    text = post(url, "/detokenize", {"tokens": tokens["tokens"]}).json()["prompt"]
    assert text == "Shall I compare thee"
    chat = post(url, "/tokenize", {"messages": [{"role": "user", "content": "hi"}]}).json()
    assert chat["count"] > 3
    assert post(url, "/detokenize", {"tokens": [10**7]}).json()["error"]["param"] == "tokens"
    assert post(url, "/tokenize", {"prompt": "x", "model": "other"}).status_code == 404
    models = httpx.get(f"{url}/v1/models", headers=AUTH, timeout=10).json()
    assert models["object"] == "list" and models["data"][0]["id"] == MODEL


def test_batch_prompts_n_echo_logprobs_and_stop(url):
    response = post(url, "/v1/completions", greedy(prompt=[[1, 50, 60], [1, 70, 80, 90]], n=2, max_tokens=3))
    choices = response.json()["choices"]
    assert [c["index"] for c in choices] == [0, 1, 2, 3]
    assert choices[0]["text"] == choices[1]["text"] and choices[2]["text"] == choices[3]["text"]
    assert response.json()["usage"]["completion_tokens"] == 12
    echo = post(url, "/v1/completions", greedy(prompt="From fairest", max_tokens=3, echo=True, logprobs=2)).json()
    choice = echo["choices"][0]
    assert choice["text"].startswith("From fairest")
    lp = choice["logprobs"]
    prompt_tokens = echo["usage"]["prompt_tokens"]
    assert len(lp["tokens"]) == prompt_tokens + 3 and lp["token_logprobs"][0] is None
    # the chosen token is always listed, besides the top 2
    assert all(2 <= len(t) <= 3 for t in lp["top_logprobs"][1:]) and lp["text_offset"] == sorted(lp["text_offset"])
    full = post(url, "/v1/completions", greedy(prompt="From fairest", max_tokens=10)).json()["choices"][0]["text"]
    stop = full[2:4]
    cut = post(url, "/v1/completions", greedy(prompt="From fairest", max_tokens=10, stop=stop)).json()["choices"][0]
    assert cut["text"] == full[: full.index(stop)] and cut["stop_reason"] == stop
    chat = post(url, "/v1/chat/completions", greedy(messages=[{"role": "user", "content": "x"}], max_tokens=2,
                                                   logprobs=True, top_logprobs=2)).json()
    content = chat["choices"][0]["logprobs"]["content"]
    assert len(content) == 2 and len(content[0]["top_logprobs"]) == 2 and content[0]["bytes"] is not None


def test_schemathesis_finds_no_server_errors(url):
    schemathesis = pytest.importorskip("schemathesis")
    from hypothesis import HealthCheck, given, settings
    from schemathesis import GenerationMode

    schema = schemathesis.openapi.from_url(f"{url}/openapi.json")
    failures = []
    operations = [result.ok() for result in schema.get_all_operations()]
    # negative cases (schema violations) need a body to violate: the POST operations
    cases = [(op, GenerationMode.POSITIVE) for op in operations] + [
        (op, GenerationMode.NEGATIVE) for op in operations if op.method.upper() == "POST"]
    for operation, mode in cases:

        @settings(max_examples=15, deadline=None, database=None, suppress_health_check=list(HealthCheck))
        @given(case=operation.as_strategy(generation_mode=mode))
        def check(case) -> None:
            if isinstance(case.body, dict):  # keep generations short: the point is input handling
                for field in ("max_tokens", "max_completion_tokens", "max_output_tokens"):
                    if isinstance(case.body.get(field), int):
                        case.body[field] = min(case.body[field], 4)
                if "messages" in case.body:
                    case.body.setdefault("max_tokens", 4)
                if "input" in case.body:
                    case.body.setdefault("max_output_tokens", 4)
            response = case.call(base_url=url, headers=AUTH, timeout=30)
            if response.status_code >= 500:
                failures.append((case.operation.label, case.body, response.status_code, response.text[:200]))

        check()
    assert not failures
    assert httpx.get(f"{url}/health", timeout=10).status_code == 200


class Raw(str):
    """JSON text inserted verbatim (numbers too long for Python's int-to-str limit, deep nesting)."""


def to_json(value) -> str:
    if isinstance(value, Raw):
        return str(value)
    if isinstance(value, dict):
        return "{" + ",".join(f"{json.dumps(k)}:{to_json(v)}" for k, v in value.items()) + "}"
    if isinstance(value, list):
        return "[" + ",".join(to_json(v) for v in value) + "]"
    return json.dumps(value)  # ensure_ascii: lone surrogates go out as \udXXX escapes; inf as Infinity


def test_adversarial_bodies_never_get_a_5xx(url):
    """Property: whatever a body holds (lone surrogates in any string or key, huge or non-finite numbers,
    deep nesting, bodies over the size limit), the answer is never a 5xx and the server stays healthy."""
    from hypothesis import HealthCheck, given, settings
    from hypothesis import strategies as st

    plain = st.text(st.characters(categories=["Cs", "Lu", "Ll", "Nd", "No", "Po", "Zs", "Cc"]), max_size=12)
    surrogate = st.characters(min_codepoint=0xD800, max_codepoint=0xDFFF)
    text = plain | st.tuples(plain, surrogate, plain).map("".join)  # half the strings hold a lone surrogate
    scalars = st.one_of(
        text, text, st.booleans(), st.none(), st.integers(-(2**70), 2**70), st.floats(allow_nan=True),
        st.from_regex(r"-?[1-9][0-9]{15,6000}", fullmatch=True).map(Raw),  # past int64 and past 4,300 digits
        st.integers(1, 3000).map(lambda d: Raw("[" * d + "]" * d)),  # past the depth limit and the decoder's
    )
    values = st.recursive(scalars, lambda inner: st.lists(inner, max_size=3) | st.dictionaries(text, inner, max_size=3),
                          max_leaves=6)
    messages = st.lists(st.fixed_dictionaries({"role": st.sampled_from(["user", "system", "assistant"]),
                                               "content": text | st.lists(st.fixed_dictionaries(
                                                   {"type": st.just("text"), "text": text}), max_size=2)}),
                        min_size=1, max_size=3)
    token_keys = st.from_regex(r"[0-9\u00b2\u0663]{1,12}", fullmatch=True) | text
    fields = {  # each field with values of the right shape and of any other, so validation is passed or probed
        "prompt": text | st.lists(text, min_size=1, max_size=3) | values, "messages": messages | values,
        "model": text | values, "stop": text | st.lists(text, max_size=3) | values,
        "logit_bias": st.dictionaries(token_keys, st.floats(allow_nan=True) | values, max_size=3),
        "cache_salt": text | values, "user": text | values, "tokens": st.lists(st.integers(-5, 2**64)) | values,
        **{name: values for name in ("temperature", "seed", "n", "max_tokens", "stream", "top_p", "extra")},
    }
    bases = {"/v1/completions": {"prompt": "x"}, "/v1/chat/completions": {"messages": [{"role": "user",
                                                                                          "content": "x"}]},
             "/tokenize": {"prompt": "x"}, "/detokenize": {"tokens": [5]}}
    large = st.integers(1_200_000, 2_000_000).map(lambda n: Raw(json.dumps("a" * n)))  # over --max-request-bytes
    failures = []

    @settings(max_examples=80, deadline=None, database=None, suppress_health_check=list(HealthCheck))
    @given(path=st.sampled_from(sorted(bases)), changes=st.fixed_dictionaries({}, optional=fields),
           big=st.integers(0, 9).flatmap(lambda i: large if i == 0 else st.none()))
    def check(path: str, changes: dict, big: Raw | None) -> None:
        body = {**bases[path], "max_tokens": 2, **changes, **({"extra": big} if big else {})}
        if type(body["max_tokens"]) is int and 4 < body["max_tokens"] < 2**20:
            body["max_tokens"] = 4  # keep generations short: the point is input handling
        response = httpx.post(f"{url}{path}", content=to_json(body).encode(), timeout=60,
                              headers={**AUTH, "Content-Type": "application/json"})
        if response.status_code >= 500:
            failures.append((path, to_json(body)[:300], response.status_code, response.text[:300]))
        elif response.status_code >= 400:
            assert set(response.json()["error"]) == {"message", "type", "param", "code"}

    check()
    assert not failures
    assert httpx.get(f"{url}/health", timeout=10).status_code == 200
