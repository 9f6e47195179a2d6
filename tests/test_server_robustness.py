"""Regressions from review: SSE line breaks, bounded detokenizer memory, engine death and stop never hang."""

from __future__ import annotations

import asyncio
import json

import pytest

from miras_serve import models
from miras_serve.server import EngineConfig, LLMEngine, ParamError, SamplingParams
from miras_serve.server.async_engine import AsyncEngine, EngineUnavailableError, QueueFullError
from miras_serve.server.detokenizer import IncrementalDetokenizer
from miras_serve.server.protocol import CompletionChoice
from miras_serve.server.serving_base import sse


def test_sse_events_are_single_lines():
    event = sse(CompletionChoice(index=0, text="a\u2028b\u2029c\x85d\ne"))
    body = event.removeprefix("data: ").removesuffix("\n\n")
    assert event.endswith("\n\n") and len(body.splitlines()) == 1  # str.splitlines splits on all of them
    assert json.loads(body)["text"] == "a\u2028b\u2029c\x85d\ne"


@pytest.mark.parametrize("stop", [[], ["the end"]])
def test_detokenizer_keeps_bounded_text(tokenizer, stop):
    detok = IncrementalDetokenizer(tokenizer, stop)
    ids = tokenizer.encode("Shall I compare thee to a summer's day? " * 200)
    out = []
    for token in ids:
        assert detok.add(token) is None
        out.append(detok.take())
        assert len(detok.text) <= 2 * len("the end") + 64  # not the whole text so far
    detok.finish(matched_stop=False)
    out.append(detok.take())
    assert "".join(out) == tokenizer.decode(ids)


@pytest.fixture()
def engine(tiny_checkpoint) -> LLMEngine:
    model, tokenizer = models.load_pretrained(tiny_checkpoint)
    return LLMEngine(model, tokenizer, EngineConfig(max_num_seqs=4))


def test_batch_larger_than_the_queue_is_a_400_not_a_429(engine):
    async def run() -> None:
        async_engine = AsyncEngine(engine, max_queued_requests=2)
        async_engine.start()
        try:
            with pytest.raises(ParamError, match="--max-queued-requests"):
                async_engine.submit([([5, 6], None)] * 3, SamplingParams(max_tokens=2))
        finally:
            async_engine.stop()
    asyncio.run(run())


def test_engine_death_and_stop_end_every_stream(engine):
    async def run() -> None:
        async_engine = AsyncEngine(engine)
        engine.step = lambda: (_ for _ in ()).throw(RuntimeError("boom"))  # the next step dies
        async_engine.start()
        group = async_engine.submit([([5, 6, 7], None)], SamplingParams(max_tokens=4))
        with pytest.raises(EngineUnavailableError, match="boom"):
            await asyncio.wait_for(anext(aiter(group)), timeout=30)
        with pytest.raises(EngineUnavailableError):  # and nothing new is accepted
            async_engine.submit([([5], None)], SamplingParams(max_tokens=1))
    asyncio.run(run())


def test_stopping_the_engine_ends_open_streams(engine):
    async def run() -> None:
        async_engine = AsyncEngine(engine)
        async_engine.start()
        group = async_engine.submit([([5, 6, 7], None)], SamplingParams(max_tokens=10_000, ignore_eos=True))
        stream = aiter(group)
        await asyncio.wait_for(anext(stream), timeout=30)  # running
        await asyncio.to_thread(async_engine.stop)
        with pytest.raises(EngineUnavailableError, match="stopped"):
            while True:  # deltas already delivered, then the end: never a hang
                await asyncio.wait_for(anext(stream), timeout=30)
    asyncio.run(run())


def test_a_request_is_validated_once(engine, monkeypatch):
    """The HTTP path validates before queueing (to answer 400); the engine thread does not scan the
    prompt again. A direct engine.add_request still validates."""
    calls = []
    real_validate = engine.validate
    monkeypatch.setattr(engine, "validate", lambda *a: (calls.append(1), real_validate(*a))[1])

    async def run() -> None:
        async_engine = AsyncEngine(engine)
        async_engine.start()
        try:
            group = async_engine.submit([([5, 6, 7], None)], SamplingParams(max_tokens=2))
            outputs = [delta async for _, delta in group]
        finally:
            async_engine.stop()
        assert outputs[-1].finished
    asyncio.run(run())
    assert len(calls) == 1
    with pytest.raises(ParamError, match="out of vocabulary"):
        engine.add_request("direct", [10**9], SamplingParams(max_tokens=1))


def test_a_burst_into_free_slots_is_admitted_and_the_queue_bound_counts_waiting_requests(engine):
    """4 slots and a queue of 2: six requests submitted at once are accepted whether or not the engine thread
    has taken them yet (four get slots), the seventh waits beyond the queue's bound and gets QueueFullError."""
    async def run() -> None:
        async_engine = AsyncEngine(engine, max_queued_requests=2)
        async_engine.start()
        try:
            params = SamplingParams(max_tokens=64, ignore_eos=True)  # none finishes during the burst
            groups = [async_engine.submit([([5, 6, 7], None)], params) for _ in range(6)]
            with pytest.raises(QueueFullError, match="queue is full"):
                async_engine.submit([([5, 6, 7], None)], params)
            served = await asyncio.wait_for(asyncio.gather(*[_deltas(group) for group in groups]), timeout=120)
            assert all(deltas[-1].finished for deltas in served)  # each is served to its end
        finally:
            await asyncio.to_thread(async_engine.stop)
    asyncio.run(run())


async def _deltas(group) -> list:
    return [delta async for _, delta in group]
