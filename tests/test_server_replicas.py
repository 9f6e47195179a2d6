"""Replicas sharing a Redis store (server/state_tier_redis.py, server/response_store_redis.py): states and
stored responses saved by one are restored by another with the same results; corrupt or foreign entries
are rejected and recomputed; bounds and expiry; a store that is down costs recomputation, never a request.
Each test module starts its own ``redis-server`` on a free loopback port (``make test`` installs it)."""

from __future__ import annotations

import logging
import time
from array import array

import httpx
import pytest
import torch
from conftest import small_model
from openai import OpenAI
from test_server_support import ServerProcess, metric, metric_values

from deploy.local.redis_process import RedisProcess
from miras_serve.loadtest.process import free_port
from miras_serve.server import EngineConfig, LLMEngine, SamplingParams
from miras_serve.server.loader import load_model
from miras_serve.server.response_store import ResponseStore, Segment, StoredResponse
from miras_serve.server.response_store_redis import RedisResponses
from miras_serve.server.state_cache import prefix_key
from miras_serve.server.state_tier_redis import RedisStateTier, redis_client
from miras_serve.server.state_tiers import CachedState, model_identity, pack_entry

MODEL = "tiny"


@pytest.fixture(scope="module")
def redis_url():
    server = RedisProcess()
    yield server.url
    server.stop()


@pytest.fixture
def fresh(redis_url):
    """An empty store for each test."""
    redis_client(redis_url).flushall()
    return redis_url


TIERS: list[RedisStateTier] = []


@pytest.fixture(autouse=True)
def close_tiers():
    """Stop the index refreshers of the tiers a test made (before its Redis goes away)."""
    yield
    while TIERS:
        TIERS.pop()._stop.set()


def tier(url: str, model, capacity: int = 1 << 30, ttl: float = 0.0, rejects: list | None = None,
         retry: float = 5.0) -> RedisStateTier:
    made = RedisStateTier(redis_client(url), model_identity(model), model.init_state(1), capacity, ttl,
                          on_reject=rejects.append if rejects is not None else None, retry_seconds=retry)
    TIERS.append(made)
    return made


def filled(model, value: float):
    state = model.init_state(1)
    for t in state.tensors():
        t.fill_(value)
    return state


def test_a_state_saved_by_one_replica_is_found_by_another(fresh):
    model = small_model("yaad-h")
    a, b = tier(fresh, model), tier(fresh, model)
    key = prefix_key([1, 2, 3], "tenant-a")
    a.insert(key, CachedState(3, filled(model, 2.0), torch.ones(5)))
    assert a.lookup(key).state.pos.item() == 2  # served from the pending write meanwhile
    a.flush()
    assert b.index(key) is None  # until b's mirror of the index is refreshed (every second in the background)
    b.refresh()
    assert b.index(key) == (3, True, True) and b.lengths() == {3: 1} and b.nbytes > 0
    entry = b.lookup(key)
    assert entry.tier == "redis" and torch.equal(entry.logits, torch.ones(5))
    for x, y in zip(entry.state.tensors(), filled(model, 2.0).tensors(), strict=True):
        assert torch.equal(x, y)
    assert b.lookup(prefix_key([1, 2, 3], "tenant-b")) is None  # another namespace: another key
    b.delete(key)
    b.flush()
    a.refresh()
    assert a.index(key) is None and a.lookup(key) is None and a.nbytes == 0


def test_corrupt_and_foreign_entries_are_rejected(fresh):
    model, rejects = small_model("moneta"), []
    t = tier(fresh, model, rejects=rejects)
    good, bad, foreign = (prefix_key([i], "") for i in (1, 2, 3))
    for key in (good, bad):
        t.insert(key, CachedState(1, filled(model, 1.0)))
    t.flush()
    data = bytearray(t.redis.get(t._key("state", bad)))
    data[-1] ^= 0xFF
    t.redis.set(t._key("state", bad), bytes(data))
    other = small_model("moneta", seed=1)  # same layout, other weights: another identity
    t.redis.set(t._key("state", foreign), pack_entry(model_identity(other), foreign,
                                                     CachedState(1, filled(other, 1.0))))
    assert t.lookup(bad) is None and t.lookup(foreign) is None and rejects == ["corrupt", "corrupt"]
    t.flush()
    assert not t.redis.exists(t._key("state", bad)) and not t.redis.exists(t._key("state", foreign))
    assert t.lookup(good) is not None


def test_the_store_is_bounded_and_expires(fresh):
    model = small_model("moneta")
    size = len(pack_entry("x" * 32, bytes(16), CachedState(1, filled(model, 1.0))))
    t = tier(fresh, model, capacity=int(size * 2.5))
    keys = [prefix_key([i], "") for i in range(4)]
    for key in keys:
        t.insert(key, CachedState(1, filled(model, 1.0)))
        t.flush()
        time.sleep(0.01)
    t.refresh()
    assert [t.index(k) is not None for k in keys] == [False, False, True, True]  # least recently used went
    assert t.nbytes <= size * 2.5
    short = tier(fresh, small_model("linear"), ttl=0.3)
    key = prefix_key([9], "")
    short.insert(key, CachedState(1, filled(small_model("linear"), 1.0)))
    short.flush()
    time.sleep(0.5)
    assert short.lookup(key) is None  # expired in Redis
    assert short.index(key) is None


def test_a_store_that_is_down_is_skipped_with_a_warning(caplog):
    model = small_model("moneta")
    caplog.set_level(logging.WARNING, "miras.state_tiers")
    t = tier(f"redis://127.0.0.1:{free_port()}/0", model, retry=60)  # nothing listens there
    key = prefix_key([1], "")
    t.insert(key, CachedState(1, filled(model, 1.0)))
    t.flush()
    start = time.monotonic()
    assert t.lookup(key) is None or t.lookup(key).tier == "redis"
    assert t.lookup(prefix_key([2], "")) is None
    assert time.monotonic() - start < 5  # skipped, not waited on, while down
    assert sum("unreachable" in r.getMessage() for r in caplog.records) == 1  # one warning per outage


# ---- engines and servers ---------------------------------------------------------------------------------


def generate(engine: LLMEngine, request_id: str, prompt: list[int]) -> tuple[list[int], int]:
    engine.add_request(request_id, prompt, SamplingParams(temperature=0, max_tokens=5, ignore_eos=True))
    while engine.has_unfinished():
        for out in engine.step():
            if out.finished:
                final = out
    return final.outputs[0].token_ids, final.num_cached_tokens


def test_two_engines_continue_each_others_conversations(fresh, tiny_checkpoint):
    """A conversation whose turns alternate between two engines sharing the store gives the tokens of one
    engine without any cache, and each turn restores the previous one's state from the store."""
    model, tokenizer = load_model(tiny_checkpoint)
    config = EngineConfig(max_num_seqs=2, max_num_batched_tokens=64, state_cache_bytes=1 << 30, state_redis_url=fresh)
    replicas = [LLMEngine(model, tokenizer, config), LLMEngine(model, tokenizer, config)]
    alone = LLMEngine(model, tokenizer, EngineConfig(max_num_seqs=2, max_num_batched_tokens=64, state_cache_bytes=0))
    history: list[int] = []
    for turn in range(4):
        history += [5 + turn, 17, 23 + turn, 40, 41, 42, 43][: 3 + turn]  # crosses chunk boundaries (chunk 4)
        engine = replicas[turn % 2]
        engine.state_cache.tier.refresh()  # (done every second in the background)
        tokens, cached = generate(engine, f"t{turn}", history)
        engine.flush_saved_states()
        assert tokens == generate(alone, f"t{turn}", history)[0]
        if turn:
            assert cached > 0 and engine.metrics.state_tier_hits["redis"]._value.get() >= 1
        history += tokens
    # every state in the store corrupted: a third replica rejects them and recomputes, with the same tokens
    redis = redis_client(fresh)
    for name in redis.scan_iter("miras:*:state:*"):
        data = bytearray(redis.get(name))
        data[-1] ^= 0xFF
        redis.set(name, bytes(data))
    third = LLMEngine(model, tokenizer, config)
    history += [7, 8, 9]
    tokens, cached = generate(third, "t4", history)
    assert tokens == generate(alone, "t4", history)[0] and cached == 0
    assert third.metrics.state_tier_rejected["corrupt"]._value.get() >= 1
    for engine in (*replicas, third):
        engine.state_cache.tier.close()


@pytest.fixture
def replicas(fresh, tiny_checkpoint):
    procs = [ServerProcess(tiny_checkpoint, "--served-model-name", MODEL, "--state-redis-url", fresh)
             for _ in range(2)]
    yield procs
    for proc in procs:
        proc.stop()


def test_a_responses_conversation_moves_between_replicas(replicas, tiny_checkpoint):
    """previous_response_id made on one replica is continued on the other, from the shared state, with the
    same outputs as chat with the full history on one; DELETE on one is seen by the other."""
    clients = [OpenAI(base_url=f"{p.url}/v1", api_key="unused", max_retries=0) for p in replicas]
    turns = ["Hello there", "Tell me more", "And then?", "Goodbye"]
    previous, outputs = None, []
    for i, text in enumerate(turns):
        time.sleep(1.2)  # let the other replica's index mirror see the last state (refreshed every second)
        response = clients[i % 2].responses.create(model=MODEL, input=text, previous_response_id=previous,
                                                   temperature=0, max_output_tokens=6)
        outputs.append(response)
        previous = response.id
    messages, expected = [], []
    for text in turns:
        messages.append({"role": "user", "content": text})
        reply = clients[0].chat.completions.create(model=MODEL, messages=messages, temperature=0, max_tokens=6)
        expected.append(reply.choices[0].message.content)
        messages.append({"role": "assistant", "content": reply.choices[0].message.content})
    assert [r.output_text for r in outputs] == expected
    assert all(r.usage.input_tokens_details.cached_tokens > 0 for r in outputs[1:])
    for proc in replicas:
        assert metric(metric_values(proc.url), "miras:state_tier_hits_total", tier="redis") >= 1
    assert clients[1].responses.retrieve(outputs[0].id).output_text == outputs[0].output_text
    clients[0].responses.delete(outputs[1].id)
    gone = httpx.get(f"{replicas[1].url}/v1/responses/{outputs[1].id}")
    assert gone.status_code == 404


def test_a_replica_serves_when_the_store_goes_down(tiny_checkpoint):
    """Redis killed between two turns: the turn is served all the same, health stays up, a warning is logged."""
    redis = RedisProcess()
    proc = ServerProcess(tiny_checkpoint, "--served-model-name", MODEL, "--state-redis-url", redis.url)
    try:
        client = OpenAI(base_url=f"{proc.url}/v1", api_key="unused", max_retries=0)
        first = client.responses.create(model=MODEL, input="Hello", temperature=0, max_output_tokens=4)
        redis.stop()
        second = client.responses.create(model=MODEL, input="More", previous_response_id=first.id, temperature=0,
                                         max_output_tokens=4)
        messages = [{"role": "user", "content": "Hello"}, {"role": "assistant", "content": first.output_text},
                    {"role": "user", "content": "More"}]
        chat = client.chat.completions.create(model=MODEL, messages=messages, temperature=0, max_tokens=4)
        assert second.output_text == chat.choices[0].message.content  # served (from local state), same tokens
        assert httpx.get(f"{proc.url}/health").status_code == 200
    finally:
        proc.stop()
        redis.stop()
    assert "unreachable" in proc.output()


# ---- stored responses ------------------------------------------------------------------------------------


def stored(response_id: str, tokens: list[int], parent: StoredResponse | None = None, tenant: str = ""
           ) -> StoredResponse:
    segment = Segment(array("i", tokens), parent.segment if parent else None)
    length = (parent.length if parent else 0) + len(tokens)
    return StoredResponse(response_id, tenant, "ns", {"id": response_id}, segment, length, [7, 8], "hi",
                          bytes(16), bytes(16))


def shared_store(url: str, max_count: int = 100, forgotten: list | None = None) -> ResponseStore:
    return ResponseStore(max_count, 1 << 20, 0, shared=RedisResponses(redis_client(url), "m", max_count, 0),
                         on_forget=forgotten.append if forgotten is not None else None)


def test_stored_responses_are_shared_per_tenant_and_bounded(fresh):
    forgotten: list = []
    a, b = shared_store(fresh, max_count=3), shared_store(fresh, max_count=3, forgotten=forgotten)
    r1 = stored("r1", [1, 2])
    r2 = stored("r2", [3], r1)
    a.put(r1)
    a.put(r2)
    got = b.get("", "r2")
    assert got.segment.token_ids() == [1, 2, 3] and got.length == 3 and got.output_ids == [7, 8]
    assert b.get("other-tenant", "r2") is None
    b.put(stored("r3", [4], got))  # continued on b: its segments are b's, shared on
    assert a.get("", "r3").segment.token_ids() == [1, 2, 3, 4]
    assert a.get("", "r3").segment.parent is a.get("", "r2").segment  # a fetched only what it lacked
    assert b.delete("", "r2") and a.get("", "r2") is None and forgotten == [got]
    assert a.get("", "r3").segment.token_ids() == [1, 2, 3, 4]
    for i in range(4, 8):
        a.put(stored(f"r{i}", [i]))
    assert b.get("", "r1") is None and b.get("", "r7") is not None  # the shared store keeps 3 per tenant
    assert len(redis_client(fresh).keys("miras:m:resp:*")) == 3


# ---- the local multi-replica setup (deploy/local) --------------------------------------------------------


def test_the_router_keeps_conversations_on_one_replica_and_survives_a_crash(tiny_checkpoint):
    """nginx hashing x-session-id over two replicas: every follow-up turn restores its state from the
    memory of the replica that served the last one; the replica holding conversations is killed (SIGKILL);
    the next turn of each conversation is served by the other one, from the shared store."""
    import asyncio

    from benchmarks.replicas import tier_hits, turn
    from deploy.local.replicas import Stack

    def hits(stack: Stack, port: int) -> dict:
        values = metric_values(f"http://127.0.0.1:{port}")
        return {tier: metric(values, "miras:state_tier_hits_total", tier=tier) for tier in ("memory", "redis")}

    async def converse(stack: Stack, previous: dict[str, str | None], turns: int) -> None:
        async with httpx.AsyncClient(timeout=60) as http:
            for _ in range(turns):
                for name in previous:
                    text = f"Tell me more, {name}"  # distinct: no conversation restores another's first prompt
                    _, previous[name], _ = await turn(http, stack.url, name, text, previous[name], 3)

    # --enforce-eager: this is about routing; compiling the decode step at start-up has its own tests
    with Stack(str(tiny_checkpoint), 2, serve_args=("--served-model-name", MODEL, "--enforce-eager")) as stack:
        previous: dict[str, str | None] = {f"conversation-{i}": None for i in range(4)}
        asyncio.run(converse(stack, previous, 3))
        per_replica = [hits(stack, port) for port in stack.replica_ports]
        assert sum(h["memory"] for h in per_replica) == 4 * 2 and sum(h["redis"] for h in per_replica) == 0
        busiest = max(range(2), key=lambda i: per_replica[i]["memory"])
        time.sleep(1.2)  # the survivor's mirror of the store's index (refreshed every second)
        stack.kill_replica(busiest)
        asyncio.run(converse(stack, previous, 1))  # would raise if a turn failed
        survivor = stack.replica_ports[1 - busiest]
        moved = per_replica[busiest]["memory"] // 2
        assert hits(stack, survivor)["redis"] == moved and tier_hits(stack)["redis"] == moved


def test_shared_store_flags():
    from miras_serve.server.cli import parse_args

    config = EngineConfig.from_args(parse_args(["--state-redis-url", "redis://127.0.0.1:7000/1",
                                                "--state-redis-gb", "0.5", "--state-redis-ttl", "60"]))
    assert (config.state_redis_url, config.state_redis_bytes, config.state_redis_ttl) == \
        ("redis://127.0.0.1:7000/1", 1 << 29, 60.0)
    assert EngineConfig.from_args(parse_args([])).state_redis_url is None
    for bad in (["--state-redis-gb", "-1"], ["--state-redis-ttl", "nan"]):
        with pytest.raises(SystemExit):
            parse_args(bad)
