"""return_surprise end to end: the engine carries each consumed token's surprise (prompt and generated, per
Miras layer) from the pass it makes anyway, equal to the model's own parallel pass over the same tokens, in
chunked prefills, batched decodes (graph or eager) and n > 1; the API returns it only when asked, streams it a
step behind the tokens, refuses a non-boolean, and samples it into the miras:token_surprise histogram."""

from __future__ import annotations

import asyncio
import json

import httpx
import pytest
import torch
from conftest import small_model

from miras_serve.models.backend import forced_backend
from miras_serve.server.api import ServerSettings, ServerState, build_app
from miras_serve.server.async_engine import AsyncEngine
from miras_serve.server.engine import EngineConfig, LLMEngine
from miras_serve.server.loader import load_model
from miras_serve.server.sampling_params import SamplingParams

TOL = 1e-5


def parallel_surprise(model, token_ids: list[int]) -> torch.Tensor:
    """The reference: one parallel pass of the model over the tokens, surprise [T, Miras layers]."""
    ids = torch.tensor([token_ids])
    out = torch.full((1, len(token_ids), len(model.miras_layers)), float("nan"))
    with torch.inference_mode():
        model(ids, surprise=out)
    return out[0]


def run(engine: LLMEngine, requests: dict[str, tuple[list[int], SamplingParams]]) -> dict:
    for request_id, (ids, params) in requests.items():
        engine.add_request(request_id, ids, params)
    finals = {}
    while engine.has_unfinished():
        for out in engine.step():
            if out.request_id in finals:
                finals[out.request_id].merge(out)
            else:
                finals[out.request_id] = out
    return finals


@pytest.mark.parametrize("graphs", [False, True])
def test_engine_surprise_equals_the_parallel_pass(tokenizer, graphs):
    model = small_model("yaad-h", seed=2, n_layers=3)  # Miras layers 0 and 2, attention 1
    assert model.miras_layers == [0, 2]
    # a prompt longer than a step's token budget: prefilled in several chunks, across memory chunks
    config = EngineConfig(max_num_seqs=6, max_num_batched_tokens=16, cuda_graphs=graphs, state_cache_bytes=1 << 20)
    engine = LLMEngine(model, tokenizer, config)
    gen = torch.Generator().manual_seed(1)
    prompts = [torch.randint(3, 300, (n,), generator=gen).tolist() for n in (23, 9, 9)]
    asked = SamplingParams(temperature=0.8, seed=4, max_tokens=7, ignore_eos=True, n=2, return_surprise=True)
    plain = SamplingParams(temperature=0.0, max_tokens=5, ignore_eos=True)
    with forced_backend("torch"):
        finals = run(engine, {"a": (prompts[0], asked), "b": (prompts[1], plain),
                              "c": (prompts[2], SamplingParams(temperature=0.0, max_tokens=6, return_surprise=True,
                                                               ignore_eos=True))})
        # asking again for a cached prompt still prefills it: every prompt token has its surprise
        again = run(engine, {"c2": (prompts[2], SamplingParams(max_tokens=1, return_surprise=True))})["c2"]
    for name, prompt in (("a", prompts[0]), ("c", prompts[2])):
        final = finals[name]
        assert len(final.prompt_surprise) == len(prompt)
        for out in final.outputs:
            assert len(out.surprise) == len(out.token_ids) and out.surprise[-1] is None
            ref = parallel_surprise(model, prompt + out.token_ids[:-1])
            got = torch.tensor(final.prompt_surprise + out.surprise[:-1])
            assert got.shape == ref.shape and ((got - ref).norm() / ref.norm()).item() < TOL
    assert finals["b"].prompt_surprise is None and all(o.surprise is None for o in finals["b"].outputs)
    assert torch.allclose(torch.tensor(again.prompt_surprise), torch.tensor(finals["c"].prompt_surprise), atol=1e-6)
    samples = [s for s in engine.metrics.registry.collect() if s.name == "miras:token_surprise"][0].samples
    counts = {s.labels["layer"]: s.value for s in samples if s.name.endswith("_count")}
    assert set(counts) == {"0", "2"} and counts["0"] > 0  # sampled: one position in 16


def test_abort_and_max_tokens_0_close_the_rows(tokenizer):
    engine = LLMEngine(small_model("moneta", seed=1), tokenizer, EngineConfig(max_num_seqs=2))
    with forced_backend("torch"):
        final = run(engine, {"z": ([5, 6, 7], SamplingParams(max_tokens=0, return_surprise=True))})["z"]
        assert len(final.prompt_surprise) == 3 and final.outputs[0].surprise == []  # no generated token
        engine.add_request("x", [5, 6, 7], SamplingParams(max_tokens=50, return_surprise=True, ignore_eos=True))
        outs = [o for _ in range(3) for o in engine.step()]
        aborted = engine.abort_request("x")
    got = [row for o in [*outs, aborted] for out in o.outputs for row in out.surprise or []]
    tokens = [t for o in [*outs, aborted] for out in o.outputs for t in out.token_ids]
    assert len(got) == len(tokens) and got[-1] is None and None not in got[:-1]


@pytest.fixture
def state(tiny_checkpoint) -> ServerState:
    model, tokenizer = load_model(tiny_checkpoint)
    engine = LLMEngine(model, tokenizer, EngineConfig(max_num_seqs=4, max_num_batched_tokens=64), "tiny")
    return ServerState(AsyncEngine(engine), ServerSettings("tiny", str(tiny_checkpoint)))


def calls(state: ServerState, requests: list[tuple[str, str, dict]]) -> list[httpx.Response]:
    app = build_app(state)

    async def go() -> list[httpx.Response]:
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://app") as client:
            return [await client.request(method, path, json=body) for method, path, body in requests]

    state.engine.start()
    try:
        with forced_backend("torch"):
            return asyncio.run(go())
    finally:
        state.engine.stop()


def near(a: list, b: list) -> bool:
    """Rows of surprise equal within fp32 tolerance (batches of different sizes round differently)."""
    return len(a) == len(b) and all((x is None) == (y is None) and (x is None or torch.allclose(
        torch.tensor(x), torch.tensor(y), rtol=1e-5, atol=1e-6)) for x, y in zip(a, b, strict=True))


def events(response: httpx.Response) -> list[dict]:
    lines = [e.removeprefix("data: ") for e in response.text.split("\n\n") if e.startswith("data: {")]
    return [json.loads(line) for line in lines]


def test_api_surprise_fields_streamed_and_not(state):
    base = {"prompt": "Shall I compare thee", "max_tokens": 6, "temperature": 0, "ignore_eos": True}
    chat = {"messages": [{"role": "user", "content": "Shall I"}], "max_tokens": 5, "temperature": 0,
            "ignore_eos": True}
    plain, asked, streamed, chat_plain, chat_asked, chat_streamed, bad, bad_chat, metrics = calls(state, [
        ("POST", "/v1/completions", base),
        ("POST", "/v1/completions", {**base, "return_surprise": True, "n": 2}),
        ("POST", "/v1/completions", {**base, "return_surprise": True, "stream": True}),
        ("POST", "/v1/chat/completions", chat),
        ("POST", "/v1/chat/completions", {**chat, "return_surprise": True}),
        ("POST", "/v1/chat/completions", {**chat, "return_surprise": True, "stream": True}),
        ("POST", "/v1/completions", {**base, "return_surprise": "yes"}),
        ("POST", "/v1/chat/completions", {**chat, "return_surprise": 1}),
        ("GET", "/metrics", None),
    ])
    layers = list(state.engine.model_info.miras_layers)
    assert "surprise" not in json.dumps(plain.json()) and "surprise" not in json.dumps(chat_plain.json())
    prompt_tokens = asked.json()["usage"]["prompt_tokens"]
    for choice in asked.json()["choices"]:
        s = choice["surprise"]
        assert s["layers"] == layers and len(s["prompt"]) == prompt_tokens
        assert all(len(row) == len(layers) for row in s["prompt"] + s["completion"][:-1])
        assert len(s["completion"]) == 6 and s["completion"][-1] is None
    chunks = events(streamed)
    with_surprise = [c["choices"][0]["surprise"] for c in chunks if c["choices"]]
    assert "prompt" in with_surprise[0] and not any("prompt" in s for s in with_surprise[1:])
    assert with_surprise[0]["completion"] == []  # a token's surprise comes a step after it: when it is fed
    assert near([row for s in with_surprise for row in s["completion"]],
                asked.json()["choices"][0]["surprise"]["completion"])
    assert near(with_surprise[0]["prompt"], asked.json()["choices"][0]["surprise"]["prompt"])
    whole = chat_asked.json()["choices"][0]["surprise"]
    assert len(whole["prompt"]) == chat_asked.json()["usage"]["prompt_tokens"] and len(whole["completion"]) == 5
    parts = [c["choices"][0]["surprise"] for c in events(chat_streamed) if c["choices"] and
             "surprise" in c["choices"][0]]
    assert near([row for s in parts for row in s["completion"]], whole["completion"])
    assert near(parts[0]["prompt"], whole["prompt"])
    for response in (bad, bad_chat):
        assert response.status_code == 400 and response.json()["error"]["param"] == "return_surprise"
    assert 'miras:token_surprise_bucket{layer="0"' in metrics.text.replace('model_name="tiny",', "")
