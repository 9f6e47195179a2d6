"""Cache isolation through the HTTP layer (the app in process): each API key is a tenant, cache_salt splits
a tenant further, and a state is only ever restored for a request of the same tenant and salt."""

from __future__ import annotations

import asyncio

import httpx
import pytest

from miras_serve.server.api import ServerSettings, ServerState, build_app
from miras_serve.server.async_engine import AsyncEngine
from miras_serve.server.engine import EngineConfig, LLMEngine
from miras_serve.server.loader import load_model
from miras_serve.server.tenancy import cache_namespace, tenant_id

PROMPT = "Shall I compare thee to a summer's day? Thou art more lovely and more temperate."


def make_state(checkpoint, **settings) -> ServerState:
    model, tokenizer = load_model(checkpoint)
    engine = LLMEngine(model, tokenizer, EngineConfig(max_num_seqs=4, max_num_batched_tokens=256), "tiny")
    return ServerState(AsyncEngine(engine), ServerSettings("tiny", str(checkpoint), **settings))


def restored_tokens(state: ServerState, requests: list[tuple[str | None, dict]]) -> list[float]:
    """Send each (API key, extra body fields) completion in turn; the prompt tokens each one restored
    from the state cache."""
    app = build_app(state)
    registry = state.engine.engine.metrics.registry

    def hits() -> float:
        return registry.get_sample_value("miras:prefix_cache_hits_total", {"model_name": "tiny"}) or 0.0

    async def run() -> list[float]:
        out = []
        async with app.router.lifespan_context(app), httpx.AsyncClient(
                transport=httpx.ASGITransport(app=app), base_url="http://app", timeout=60) as client:
            for key, extra in requests:
                before = hits()
                headers = {"Authorization": f"Bearer {key}"} if key else {}
                response = await client.post("/v1/completions", headers=headers, json={
                    "prompt": PROMPT, "max_tokens": 1, "temperature": 0, **extra})
                assert response.status_code == 200, response.text
                out.append(hits() - before)
        return out

    return asyncio.run(run())


def test_keys_and_salts_never_share_cached_states(tiny_checkpoint):
    state = make_state(tiny_checkpoint, api_keys=["alpha", "beta"])
    salt = {"cache_salt": "s1"}
    restored = restored_tokens(state, [
        ("alpha", {}), ("alpha", {}),  # the same tenant restores its own prompt
        ("beta", {}),  # another tenant does not, though the prompt is cached
        ("alpha", salt), ("alpha", salt),  # a salt is a namespace of its own; the same salt shares it
        ("alpha", {"cache_salt": "s2"}),  # another salt does not
        ("beta", salt),  # nor the same salt under another key
        ("beta", {}),  # beta's own unsalted entry from before
    ])
    hit = restored[1]
    assert hit > 0
    assert restored == [0, hit, 0, 0, hit, 0, 0, hit]


def test_shared_scope_and_no_keys(tiny_checkpoint):
    shared = make_state(tiny_checkpoint, api_keys=["alpha", "beta"], state_cache_scope="shared")
    restored = restored_tokens(shared, [("alpha", {}), ("beta", {}), ("beta", {"cache_salt": "x"})])
    assert restored[0] == 0 and restored[1] > 0 and restored[2] == 0  # across keys, still split by salt
    open_server = make_state(tiny_checkpoint)
    restored = restored_tokens(open_server, [(None, {}), (None, {}), (None, {"cache_salt": "x"})])
    assert restored[0] == 0 and restored[1] > 0 and restored[2] == 0


def test_namespaces_are_unambiguous_and_hide_the_key():
    tenant = tenant_id("sk-secret-key")
    assert len(tenant) == 16 and "secret" not in tenant and tenant == tenant_id("sk-secret-key")
    assert tenant != tenant_id("sk-secret-kez")
    names = [cache_namespace(t, s) for t in ("", tenant, tenant_id("other")) for s in (None, "a", "a/b", "/")]
    assert len(set(names)) == len(names)
    assert cache_namespace("", None) == ""  # no tenant, no salt: the engine's default namespace


@pytest.mark.parametrize("require", [False, True])
def test_metrics_can_require_the_key(tiny_checkpoint, require):
    state = make_state(tiny_checkpoint, api_keys=["alpha"], metrics_require_key=require)
    app = build_app(state)

    async def run() -> tuple[int, int, int]:
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://app") as client:
            anonymous = await client.get("/metrics")
            keyed = await client.get("/metrics", headers={"Authorization": "Bearer alpha"})
            health = await client.get("/health")  # open either way (503 here: the engine is not started)
            return anonymous.status_code, keyed.status_code, health.status_code

    anonymous, keyed, health = asyncio.run(run())
    assert (anonymous, keyed) == ((401, 200) if require else (200, 200))
    assert health == 503


def test_shared_cache_scope_keeps_stored_responses_per_key(tiny_checkpoint):
    """--state-cache-scope shared shares cached states across keys, never what a key stored by name: another
    key's stored response is a 404, for GET and for previous_response_id."""
    state = make_state(tiny_checkpoint, api_keys=["alpha", "beta"], state_cache_scope="shared")
    app = build_app(state)
    alpha, beta = ({"Authorization": f"Bearer {key}"} for key in ("alpha", "beta"))

    async def run() -> None:
        async with app.router.lifespan_context(app), httpx.AsyncClient(
                transport=httpx.ASGITransport(app=app), base_url="http://app", timeout=60) as client:
            body = {"input": PROMPT, "max_output_tokens": 2, "temperature": 0}
            made = (await client.post("/v1/responses", headers=alpha, json=body)).json()
            assert (await client.get(f"/v1/responses/{made['id']}", headers=alpha)).status_code == 200
            assert (await client.get(f"/v1/responses/{made['id']}", headers=beta)).status_code == 404
            follow = await client.post("/v1/responses", headers=beta, json={**body, "previous_response_id": made["id"]})
            assert follow.status_code == 404
            again = (await client.post("/v1/responses", headers=beta, json=body)).json()  # states are shared
            assert again["usage"]["input_tokens_details"]["cached_tokens"] == again["usage"]["input_tokens"]

    asyncio.run(run())
