"""Saved states below the in-process cache (the disk tier), conversations continued by reference in the
engine, and the store of responses: exact results, bounds, rejection of bad entries, persistence."""

from __future__ import annotations

import time
from array import array
from pathlib import Path

import pytest
import torch
from conftest import small_model

from miras_serve import models
from miras_serve.server import EngineConfig, LLMEngine, SamplingParams
from miras_serve.server.request import StateContext
from miras_serve.server.response_store import ResponseStore, Segment, StoredResponse
from miras_serve.server.state_cache import StateCache, chain_key, prefix_key
from miras_serve.server.state_tiers import CachedState, DiskStateTier, decode_state, encode_state, model_identity


def filled(model: models.MirasLM, value: float) -> models.ModelState:
    state = model.init_state(1)
    for t in state.tensors():
        t.fill_(value)
    return state


def disk_tier(root: Path, model: models.MirasLM, capacity: int = 1 << 30, ttl: float = 0.0,
              rejects: list | None = None) -> DiskStateTier:
    return DiskStateTier(root, model_identity(model), model.init_state(1), capacity, ttl,
                         on_reject=(rejects.append if rejects is not None else None))


def test_states_round_trip_through_bytes_for_every_layout():
    for preset in ("moneta", "yaad-h", "memora", "linear"):
        model = small_model(preset)
        with torch.no_grad():
            _, state = model(torch.tensor([[5, 6, 7, 8, 9, 10]]))
        entry = CachedState(6, state, torch.arange(4.0))
        back, logits = decode_state(encode_state(entry), model.init_state(1), torch.device("cpu"))
        for a, b in zip(state.tensors(), back.tensors(), strict=True):
            assert torch.equal(a, b)
        assert torch.equal(logits, torch.arange(4.0))
        with pytest.raises(ValueError, match="layout"):  # another model's layout is refused
            decode_state(encode_state(entry), small_model("linear" if preset != "linear" else "moneta").init_state(1),
                         torch.device("cpu"))


def test_model_identity_covers_weights_and_config():
    a, b = small_model("moneta", seed=0), small_model("moneta", seed=0)
    assert model_identity(a) == model_identity(b)
    assert model_identity(a) != model_identity(small_model("moneta", seed=1))  # other weights
    assert model_identity(a) != model_identity(small_model("moneta", seed=0, chunk_size=8))  # other chunk size


def test_disk_tier_writes_asynchronously_and_survives_a_restart(tmp_path):
    model = small_model("moneta")
    tier = disk_tier(tmp_path, model)
    key = prefix_key([1, 2, 3], "")
    tier.insert(key, CachedState(3, filled(model, 2.0), torch.ones(5)))
    assert tier.lookup(key).state.pos.item() == 2  # served from the pending write meanwhile
    tier.flush()
    again = disk_tier(tmp_path, model)  # a new process: the index comes back from the files
    assert again.index(key) == (3, True, True) and again.lengths() == {3: 1}
    entry = again.lookup(key)
    assert entry.tier == "disk" and entry.state.pos.item() == 2 and torch.equal(entry.logits, torch.ones(5))
    again.flush()  # (a hit renews the file's time)
    mtime = again._path(key).stat().st_mtime_ns
    again.insert(key, CachedState(3, filled(model, 2.0)))  # the same state again: not written twice
    again.flush()
    assert again._path(key).stat().st_mtime_ns == mtime and again.lookup(key).logits is not None
    again.delete(key)
    again.flush()
    assert disk_tier(tmp_path, model).index(key) is None and not list(tmp_path.rglob("*.state"))


def test_corrupt_and_foreign_entries_are_rejected_never_used(tmp_path):
    model, rejects = small_model("moneta"), []
    tier = disk_tier(tmp_path, model, rejects=rejects)
    good, bad = prefix_key([1], ""), prefix_key([2], "")
    tier.insert(good, CachedState(1, filled(model, 1.0)))
    tier.insert(bad, CachedState(1, filled(model, 1.0)))
    tier.flush()
    path = tier._path(bad)
    data = bytearray(path.read_bytes())
    data[-3] ^= 0xFF  # one flipped bit in the payload
    path.write_bytes(bytes(data))
    assert tier.lookup(bad) is None and rejects == ["corrupt"]
    tier.flush()
    assert not path.exists() and tier.index(bad) is None and tier.lookup(good) is not None
    # a file of another model copied under this model's directory is dropped when the index is built
    other = small_model("moneta", seed=5)
    foreign = disk_tier(tmp_path, other)
    foreign.insert(good, CachedState(1, filled(other, 9.0)))
    foreign.flush()
    stray = tier._path(bad)
    stray.write_bytes(foreign._path(good).read_bytes())
    assert disk_tier(tmp_path, model).index(bad) is None and not stray.exists()


def test_disk_tier_is_bounded_and_expires(tmp_path):
    model = small_model("moneta")
    size = CachedState(1, model.init_state(1)).nbytes
    tier = disk_tier(tmp_path, model, capacity=2 * size)
    keys = [prefix_key([i], "") for i in range(3)]
    for key in keys:
        tier.insert(key, CachedState(1, filled(model, 1.0)))
    assert tier.index(keys[0]) is None and tier.index(keys[2]) is not None and tier.nbytes == 2 * size
    behind = DiskStateTier(tmp_path / "slow", "id", model.init_state(1), 1 << 30, max_pending_bytes=size)
    behind.writer.submit(lambda: time.sleep(0.2))  # a slow disk: the first write waits
    behind.insert(keys[0], CachedState(1, filled(model, 1.0)))
    behind.insert(keys[1], CachedState(1, filled(model, 1.0)))  # over the backlog: kept in memory only
    assert behind.index(keys[0]) is not None and behind.index(keys[1]) is None
    short = disk_tier(tmp_path / "ttl", model, ttl=0.05)
    short.insert(keys[0], CachedState(1, filled(model, 1.0)))
    time.sleep(0.1)
    assert short.index(keys[0]) is None and short.lookup(keys[0]) is None


def test_state_cache_finds_prefixes_in_the_tier_below(tmp_path):
    """A restarted cache (empty memory) restores the longest cached prefix from disk; chained entries are
    found by their key only."""
    model = small_model("moneta")
    cache = StateCache(1 << 30, disk_tier(tmp_path, model))
    cache.insert([1, 2, 3], filled(model, 3.0), namespace="a")
    cache.put(chain_key(prefix_key([1, 2, 3], "a"), [4]), CachedState(4, filled(model, 4.0), prefix=False))
    cache.tier.flush()
    restarted = StateCache(1 << 30, disk_tier(tmp_path, model))
    found = restarted.lookup([1, 2, 3, 4, 5], "a")
    assert found.length == 3 and found.tier == "disk" and found.state.pos.item() == 3
    assert restarted.lookup([1, 2, 3, 4, 5], "b") is None  # another namespace
    assert restarted.lookup([1, 2, 3, 4, 5], "a").tier == "memory"  # kept in memory once loaded
    assert restarted.get(chain_key(prefix_key([1, 2, 3], "a"), [4])).state.pos.item() == 4
    assert restarted.lengths == {3: 1}


# ---- conversations continued by reference, in the engine -----------------------------------------------------


def run(engine: LLMEngine, request_id: str, prompt: list[int], params: SamplingParams, **kw) -> tuple[list[int], int]:
    engine.add_request(request_id, prompt, params, **kw)
    tokens, cached = [], 0
    while engine.has_unfinished():
        for out in engine.step():
            tokens += out.outputs[0].token_ids if out.outputs else []
            cached = max(cached, out.num_cached_tokens)
    return tokens, cached


@pytest.mark.parametrize("lose_state", [False, True])
def test_continuing_a_saved_state_equals_prefilling_the_whole_conversation(tiny_checkpoint, lose_state):
    """Turn 2 restores turn 1's saved state by key and prefills only its own tokens (or, when that state is
    gone, rebuilds it from the token ids): the tokens equal those of one request with everything."""
    model, tokenizer = models.load_pretrained(tiny_checkpoint)
    greedy = SamplingParams(temperature=0, max_tokens=7, ignore_eos=True)
    engine = LLMEngine(model, tokenizer, EngineConfig(max_num_seqs=2, max_num_batched_tokens=16))
    first = list(range(5, 16))  # crosses chunk boundaries (chunk_size 4)
    out1, _ = run(engine, "t1", first, greedy, cache_namespace="n")
    history = first + out1[:-1]
    key = prefix_key(history, "n")
    if lose_state:
        engine.state_cache.delete(key)
    second = [out1[-1], 40, 41, 42, 43, 44]
    context = StateContext(key, len(history), lambda: list(history))
    out2, cached = run(engine, "t2", second, greedy, cache_namespace="n", context=context)
    # a lost state is rebuilt: the whole conversation is the prompt, and turn 1's prompt is still cached
    assert cached == (len(first) if lose_state else len(history))
    reference = LLMEngine(model, tokenizer, EngineConfig(max_num_seqs=2, max_num_batched_tokens=16,
                                                         state_cache_bytes=0))
    assert out2 == run(reference, "full", history + second, greedy)[0]
    # the states of turn 2 are saved under keys chained from the context, not under prefix keys
    assert engine.state_cache.get(chain_key(key, second)) is not None
    assert engine.state_cache.lookup(history + second + [1], "n").length <= len(history)


# ---- the response store -------------------------------------------------------------------------------------


def stored(response_id: str, tokens: list[int], parent: StoredResponse | None = None, tenant: str = "",
           created: float | None = None) -> StoredResponse:
    segment = Segment(array("i", tokens), parent.segment if parent else None)
    length = (parent.length if parent else 0) + len(tokens)
    return StoredResponse(response_id, tenant, "ns", {"id": response_id}, segment, length, [7, 8], "hi",
                          bytes(16), bytes(16), created or time.time())


def test_response_store_is_per_tenant_and_bounded():
    store = ResponseStore(max_count=2, max_bytes=1 << 20, ttl_seconds=0)
    store.put(stored("a", [1], tenant="x"))
    assert store.get("y", "a") is None and store.get("x", "a") is not None  # another tenant: not found
    for name in "bcd":
        store.put(stored(name, [1], tenant="y"))
    assert store.count("y") == 2 and store.get("y", "b") is None and store.count("x") == 1  # per tenant
    small = ResponseStore(max_count=100, max_bytes=stored("a", [1] * 100).nbytes * 2, ttl_seconds=0)
    for name in "abc":
        small.put(stored(name, [1] * 100))
    assert small.count("") == 2 and small.get("", "a") is None
    old = ResponseStore(max_count=100, max_bytes=1 << 20, ttl_seconds=60)
    old.put(stored("a", [1], created=time.time() - 120))
    assert old.get("", "a") is None


def test_evicted_or_deleted_responses_leave_their_continuations_whole(tmp_path):
    """A turn's tokens are kept while a stored response's conversation runs through them (and only then),
    in memory and on disk, and nothing is copied when its own response goes."""
    store = ResponseStore(max_count=3, max_bytes=1 << 20, ttl_seconds=0, directory=tmp_path)
    a = stored("a", [1, 2])
    b = stored("b", [3], a)
    store.put(a)
    store.put(b)
    store.put(stored("c", [4], b))
    store.put(stored("d", [5], b))  # a branch; "a" (the oldest) is evicted
    assert store.get("", "a") is None
    assert store.get("", "c").segment.token_ids() == [1, 2, 3, 4]
    assert store.delete("", "b")
    assert store.get("", "c").segment.token_ids() == [1, 2, 3, 4]
    assert store.get("", "d").segment.token_ids() == [1, 2, 3, 5]
    assert store.get("", "c").segment.parent is b.segment  # shared, not copied
    store.flush()
    restarted = ResponseStore(max_count=3, max_bytes=1 << 20, ttl_seconds=0, directory=tmp_path)
    assert sorted(restarted.tenants[""]) == ["c", "d"]
    assert restarted.get("", "d").segment.token_ids() == [1, 2, 3, 5] and restarted.get("", "d").length == 4
    assert restarted.get("", "c").segment.parent is restarted.get("", "d").segment.parent
    assert len(list((tmp_path / "segments").iterdir())) == 4  # a, b, c, d: all still needed
    restarted.delete("", "c")
    restarted.delete("", "d")
    restarted.flush()
    assert not list((tmp_path / "segments").iterdir()) and restarted.refs == {}  # nothing needs them now


def test_a_long_conversation_loads_without_recursion(tmp_path):
    store = ResponseStore(max_count=5000, max_bytes=1 << 30, ttl_seconds=0, directory=tmp_path)
    parent = None
    for i in range(3000):
        parent = stored(f"r{i}", [i % 50], parent, created=1e9 + i)
        store.put(parent)
    store.flush()
    restarted = ResponseStore(max_count=5000, max_bytes=1 << 30, ttl_seconds=0, directory=tmp_path)
    assert restarted.get("", "r2999").segment.token_ids() == [i % 50 for i in range(3000)]


def test_disk_and_response_store_flags():
    from miras_serve.server.cli import parse_args

    config = EngineConfig.from_args(parse_args(["--state-disk-dir", "/tmp/x", "--state-disk-gb", "0.5",
                                                "--state-disk-ttl", "60"]))
    assert (config.state_disk_dir, config.state_disk_bytes, config.state_disk_ttl) == ("/tmp/x", 1 << 29, 60.0)
    assert EngineConfig.from_args(parse_args([])).state_disk_dir is None
    for bad in (["--state-disk-gb", "-1"], ["--responses-max-count", "0"], ["--responses-ttl", "nan"]):
        with pytest.raises(SystemExit):
            parse_args(bad)
