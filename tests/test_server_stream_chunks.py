"""The streams' per-token fast paths equal the slow ones: TextChunks' events are byte for byte what the chunk
models give through ``sse``, and the ping wrapper passes events, ends and errors through unchanged."""

from __future__ import annotations

import asyncio
import random

import pytest

from miras_serve.server.protocol import (
    ChatCompletionChunk,
    ChatStreamChoice,
    CompletionChoice,
    CompletionResponse,
    DeltaMessage,
)
from miras_serve.server.serving_base import SSE_PING, TextChunks, sse, with_pings
from miras_serve.server.serving_chat import text_delta

# every ASCII control character, JSON's own escapes, SSE line breaks, multi-byte and astral characters
ALPHABET = [chr(c) for c in range(0x20)] + list(' "\\/aZ09{}[]:,\x7f\u0085\u00e9\u2028\u2029\u4e2d\ufffd\U0001f600')


def random_texts(count: int, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    return [""] + ["".join(rng.choices(ALPHABET, k=rng.randint(1, 12))) for _ in range(count)]


STOPS = [(None, None), ("length", None), ("stop", None), ("stop", 7), ("stop", "\n\n"), ("stop", 'a"\u2028b'),
         ("abort", None)]
METAS = [dict(id="cmpl-0123", object="text_completion", created=1764486000, model="moneta-tiny"),
         dict(id="cmpl-x", object="text_completion", created=0, model='odd "model"\u2028\u00e9/name')]


@pytest.mark.parametrize("meta", METAS)
def test_completion_events_equal_the_models(meta):
    chunks = TextChunks(CompletionResponse, meta)
    for i, text in enumerate(random_texts(300)):
        finish, stop = STOPS[i % len(STOPS)]
        choice = CompletionChoice(index=0, text=text, logprobs=None, finish_reason=finish, stop_reason=stop)
        choice.index = i % 5  # as the stream sets it
        assert chunks.completion(i % 5, text, finish, stop) == sse(CompletionResponse(**meta, choices=[choice]))


@pytest.mark.parametrize("meta", METAS)
def test_chat_events_equal_the_models(meta):
    meta = {**meta, "object": "chat.completion.chunk"}
    chunks = TextChunks(ChatCompletionChunk, meta)
    for i, text in enumerate(random_texts(300, seed=1)):
        finish, stop = STOPS[i % len(STOPS)]
        choice = ChatStreamChoice(index=i % 3, delta=text_delta(text), logprobs=None, finish_reason=finish)
        if finish:
            choice.stop_reason = stop
        assert chunks.chat(i % 3, text, finish, stop) == sse(ChatCompletionChunk(**meta, choices=[choice]))


def test_a_chunk_type_whose_choices_are_not_last_is_refused():
    with pytest.raises(ValueError, match="choices"):
        TextChunks(DeltaMessage, {"role": "assistant"})  # no choices at all: a template would be wrong


async def _source(events: list[str], error: Exception | None = None, pause: float = 0.0):
    for event in events:
        if pause:
            await asyncio.sleep(pause)
        yield event
    if error is not None:
        raise error


def test_pinged_stream_passes_events_and_errors_through():
    async def run() -> None:
        events = [f"data: {i}\n\n" for i in range(50)]
        assert [e async for e in with_pings(_source(events), 30.0)] == events
        received = []
        with pytest.raises(KeyError, match="lost"):
            async for event in with_pings(_source(events[:3], KeyError("lost")), 30.0):
                received.append(event)
        assert received == events[:3]
        # silent stretches get pings between the same events
        slow = [e async for e in with_pings(_source(events[:3], pause=0.12), 0.05)]
        assert [e for e in slow if e != SSE_PING] == events[:3] and slow.count(SSE_PING) >= 3

    asyncio.run(run())
