"""The state cache: prompts that repeat or extend earlier sequences restore a saved recurrent state instead
of prefilling, with exactly the results of a full prefill."""

from __future__ import annotations

import itertools

import pytest
import torch
from conftest import small_model

from miras_serve import models
from miras_serve.server import LLM, EngineConfig, LLMEngine, SamplingParams
from miras_serve.server.cli import parse_args
from miras_serve.server.state_cache import StateCache


def row_state(model: models.MirasLM, fill: float) -> models.ModelState:
    state = model.init_state(1)
    for t in state.tensors():
        t.fill_(fill)
    return state


def test_longest_prefix_wins_and_whole_prompts_need_logits():
    model = small_model("moneta")
    cache = StateCache(1 << 30)
    cache.insert([1, 2, 3], row_state(model, 1.0))
    cache.insert([1, 2, 3, 4, 5], row_state(model, 2.0), logits=torch.zeros(10))
    cache.insert([1, 2, 9], row_state(model, 3.0))
    assert cache.lookup([1, 2, 3, 4, 5, 6]).length == 5
    assert cache.lookup([1, 2, 3, 4, 5]).length == 5  # whole prompt: its logits are cached
    assert cache.lookup([1, 2, 3, 4]).length == 3
    assert cache.lookup([1, 2, 3]) is None  # whole prompt without logits: nothing to sample from
    assert cache.lookup([1, 2, 9, 9]).state.pos.item() == 3.0
    assert cache.lookup([7, 1, 2, 3, 4]) is None
    cache.insert([1, 2, 3, 4, 5], row_state(model, 4.0))  # a later entry for the same tokens keeps the logits
    assert cache.lookup([1, 2, 3, 4, 5]).state.pos.item() == 4.0


def test_least_recently_used_entries_go_first():
    model = small_model("moneta")
    size = model.init_state(1).nbytes()
    cache = StateCache(3 * size)
    for i in range(3):
        cache.insert([i, 0], row_state(model, i))
    assert cache.lookup([0, 0, 1]) is not None  # entry 0 is now the most recently used
    cache.insert([3, 0], row_state(model, 3))
    assert cache.lookup([1, 0, 1]) is None and cache.lookup([0, 0, 1]) is not None
    assert cache.nbytes == 3 * size and sum(cache.lengths.values()) == 3
    StateCache(size - 1).insert([1], row_state(model, 0))  # too big for the budget: not kept, no error


def test_namespaces_never_share_entries():
    """Equal token ids in two namespaces (tenants, salts) are two entries: a lookup never finds the other's."""
    model = small_model("moneta")
    cache = StateCache(1 << 30)
    cache.insert([1, 2, 3], row_state(model, 1.0), namespace="tenant-a")
    assert cache.lookup([1, 2, 3, 4], "tenant-b") is None and cache.lookup([1, 2, 3, 4]) is None
    assert cache.lookup([1, 2, 3, 4], "tenant-a").state.pos.item() == 1.0
    cache.insert([1, 2, 3], row_state(model, 2.0), namespace="tenant-b")
    assert cache.lookup([1, 2, 3, 4], "tenant-a").state.pos.item() == 1.0
    assert cache.lookup([1, 2, 3, 4], "tenant-b").state.pos.item() == 2.0
    assert len(cache.entries) == 2


def engine(checkpoint, cache: bool, **config) -> LLMEngine:
    model, tokenizer = models.load_pretrained(checkpoint)
    return LLMEngine(model, tokenizer, EngineConfig(max_num_seqs=4, max_num_batched_tokens=16,
                                                    state_cache_bytes=(1 << 30) if cache else 0, **config))


def run(engine: LLMEngine, prompt: list[int], params: SamplingParams, namespace: str = "") -> list[list[int]]:
    """One request to completion; its tokens, one list per sequence."""
    engine.add_request(f"r{next(REQUEST_IDS)}", prompt, params, cache_namespace=namespace)
    outputs: dict[int, list[int]] = {}
    while engine.has_unfinished():
        for out in engine.step():
            for c in out.outputs:
                outputs.setdefault(c.index, []).extend(c.token_ids)
    return [outputs[i] for i in sorted(outputs)]


def counter(engine: LLMEngine, name: str) -> float:
    return engine.metrics.registry.get_sample_value(f"miras:{name}_total", {"model_name": engine.model_name})


def prefilled(engine: LLMEngine) -> float:
    return counter(engine, "prefix_cache_queries") - counter(engine, "prefix_cache_hits")


GREEDY = SamplingParams(temperature=0.0, max_tokens=6, ignore_eos=True)
REQUEST_IDS = itertools.count()


def test_next_turn_and_regenerate_restore_exactly(tiny_checkpoint):
    """Turn 2 extends turn 1's prompt and reply: it restores the state after them (all but the last reply
    token) and prefills the rest; an identical prompt restores everything, logits included. Outputs equal
    an engine without the cache, for greedy and seeded sampling, n = 1 and n = 2."""
    cached, plain = engine(tiny_checkpoint, True), engine(tiny_checkpoint, False)
    prompt = [5 + i % 200 for i in range(37)]  # crosses chunk boundaries (chunk 4), ends mid-chunk
    (reply,) = run(cached, prompt, GREEDY)
    assert run(plain, prompt, GREEDY) == [reply]
    assert counter(cached, "prefix_cache_hits") == 0
    turn2 = prompt + reply + [7, 8, 9, 10, 11]
    assert run(cached, turn2, GREEDY) == run(plain, turn2, GREEDY)
    assert counter(cached, "prefix_cache_hits") == len(prompt) + len(reply) - 1
    assert prefilled(cached) == len(prompt) + 6  # then only the last reply token and the new five
    seeded = SamplingParams(temperature=1.0, max_tokens=5, seed=11, n=2, ignore_eos=True)
    first = run(cached, turn2, seeded)
    assert run(cached, turn2, seeded) == first == run(plain, turn2, seeded)  # regenerate: no prefill at all
    assert prefilled(cached) == len(prompt) + 6
    assert counter(cached, "prefix_cache_queries") == counter(cached, "prompt_tokens") == len(prompt) + 3 * len(turn2)


def test_engine_restores_only_within_a_namespace(tiny_checkpoint):
    cached = engine(tiny_checkpoint, True)
    prompt = [5 + i % 200 for i in range(21)]
    first = run(cached, prompt, GREEDY, "alice")
    assert run(cached, prompt, GREEDY, "bob") == first  # same tokens, computed again
    assert counter(cached, "prefix_cache_hits") == 0
    assert run(cached, prompt, GREEDY, "alice") == first
    assert counter(cached, "prefix_cache_hits") == len(prompt)


def test_prompt_logprobs_bypass_the_cache(tiny_checkpoint):
    cached = engine(tiny_checkpoint, True)
    prompt = list(range(10, 30))
    run(cached, prompt, GREEDY)
    params = SamplingParams(temperature=0.0, max_tokens=2, prompt_logprobs=1)
    cached.add_request("logprobs", prompt, params)
    final = None
    while cached.has_unfinished():
        for out in cached.step():
            final = out
    assert counter(cached, "prefix_cache_hits") == 0
    assert len(final.prompt_logprobs) == len(prompt)


def test_state_cache_flag():
    assert EngineConfig.from_args(parse_args([])).state_cache_bytes == 1 << 30
    assert EngineConfig.from_args(parse_args(["--state-cache-gb", "0.5"])).state_cache_bytes == 1 << 29
    assert EngineConfig.from_args(parse_args(["--state-cache-gb", "0"])).state_cache_bytes == 0
    with pytest.raises(SystemExit):
        parse_args(["--state-cache-gb", "-1"])


def test_chat_turns_restore_the_previous_turns_prompt(tiny_checkpoint):
    """Over the chat template each turn restores at least the state after the previous turn's whole
    prompt; only the reply as re-rendered by the template and the new message are prefilled."""
    llm = LLM(tiny_checkpoint, max_num_seqs=4, max_num_batched_tokens=64)
    params = SamplingParams(temperature=0.0, max_tokens=8)
    messages = [{"role": "user", "content": "Shall I compare thee"}]
    for question in ("to a summer's day?", "Thou art more lovely"):
        previous_prompt = len(llm.tokenizer.encode(llm.tokenizer.apply_chat_template(messages), add_bos=True))
        (reply,) = llm.chat(messages, params)
        messages += [{"role": "assistant", "content": reply.outputs[0].text}, {"role": "user", "content": question}]
        hits = counter(llm.engine, "prefix_cache_hits")
        llm.chat(messages, params)
        assert counter(llm.engine, "prefix_cache_hits") - hits >= previous_prompt


def test_shipped_chat_template_turns_prefill_only_the_new_message():
    """The shipped models' template renders a reply exactly after the generation prompt ("assistant:" +
    reply), so the next turn's prompt holds the generated tokens and restores the state after them: it
    prefills the reply's last token (sampled, never fed), the template's newline and the new message."""
    llm = LLM("moneta-tiny", max_num_seqs=2, max_num_batched_tokens=256)
    tok = llm.tokenizer
    params = SamplingParams(temperature=0.0, max_tokens=12)
    messages = [{"role": "user", "content": "Shall I compare thee to a summer's day?"}]
    for question in ("Thou art more lovely and more temperate.", "Rough winds do shake the darling buds."):
        (reply,) = llm.chat(messages, params)
        generated = reply.outputs[0].token_ids
        history = tok.encode(tok.apply_chat_template(messages), add_bos=True) + generated
        messages += [{"role": "assistant", "content": reply.outputs[0].text}, {"role": "user", "content": question}]
        whole = tok.encode(tok.apply_chat_template(messages), add_bos=True)
        assert whole[:len(history)] == history  # the rendered history reproduces the generated tokens
        (turn,) = llm.chat(messages, SamplingParams(temperature=0.0, max_tokens=1))
        new_message = tok.encode(tok.apply_chat_template(messages[-1:]))
        assert turn.num_cached_tokens == len(history) - 1
        assert len(whole) - turn.num_cached_tokens == 1 + len(tok.encode("\n")) + len(new_message)
