"""What the completions and chat handlers share: model check, submission with HTTP errors, SSE framing,
logprob formatting and racing a non-streaming request against the client going away."""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any, TypeVar

from fastapi import Request
from fastapi.responses import StreamingResponse
from pydantic import BaseModel

from .detokenizer import token_text
from .engine_client import EngineClient, EngineUnavailableError, QueueFullError, RequestGroup
from .errors import APIError, error_body, wire_json
from .limits import TextLimits
from .outputs import CompletionOutput, RequestOutput, TokenLogprob
from .protocol import StreamOptions, Surprise, UsageInfo, usage_info
from .request import StateContext
from .sampling_params import SamplingParams
from .tenancy import request_namespace

T = TypeVar("T")
Chunk = TypeVar("Chunk", bound=BaseModel)
RETRY_AFTER_SECONDS = "1"
LOGPROB_FLOOR = -9999.0  # JSON has no -inf (vLLM clamps the same way)


# Legal raw in JSON and in SSE, but many clients' line splitters (httpx's aiter_lines among them) also break
# lines there: escape them so an event is always one line.
_LINE_BREAKS = str.maketrans({"\u2028": "\\u2028", "\u2029": "\\u2029", "\x85": "\\u0085"})


def sse(data: BaseModel | str) -> str:
    payload = data if isinstance(data, str) else wire_json(data)
    return f"data: {payload.translate(_LINE_BREAKS)}\n\n"


class TextChunks:
    """The SSE events of a stream's plain text deltas (no logprobs, surprise, tool calls or running usage: what
    most streamed tokens are), built from the stream's chunk head, serialised once, and each choice's few
    fields: byte for byte what ``sse`` gives for the chunk model (tests/test_server_stream_chunks.py holds
    them equal), at about a tenth of the cost of building and serialising the models per token."""

    def __init__(self, chunk_type: type[BaseModel], meta: dict[str, Any]):
        empty = wire_json(chunk_type(**meta, choices=[]))
        if not empty.endswith('"choices":[]}'):  # choices must be the last field set
            raise ValueError(f"{chunk_type.__name__} does not end with its choices: {empty}")
        self.head = f"data: {empty[:-2].translate(_LINE_BREAKS)}"

    def _event(self, choice: str) -> str:
        return f"{self.head}{choice}]}}\n\n"

    def completion(self, index: int, text: str, finish_reason: str | None, stop_reason: str | int | None) -> str:
        """A CompletionChoice's event (server/serving_completions.py)."""
        return self._event(f'{{"index":{index},"text":{_json(text)},"logprobs":null,'
                           f'"finish_reason":{_json(finish_reason)},"stop_reason":{_json(stop_reason)}}}')

    def chat(self, index: int, text: str, finish_reason: str | None, stop_reason: str | int | None) -> str:
        """A ChatStreamChoice's event (server/serving_chat.py): no content field without text, the stop reason
        only with the finish reason."""
        delta = f'{{"content":{_json(text)}}}' if text else "{}"
        stop = f',"stop_reason":{_json(stop_reason)}' if finish_reason else ""
        return self._event(f'{{"index":{index},"delta":{delta},"logprobs":null,'
                           f'"finish_reason":{_json(finish_reason)}{stop}}}')


def _json(value: str | int | None) -> str:
    """A string, an int or None as pydantic writes it (raw non-ASCII, the same escapes), made SSE-safe."""
    return "null" if value is None else json.dumps(value, ensure_ascii=False).translate(_LINE_BREAKS)


SSE_PING = ": ping\n\n"  # an SSE comment: clients ignore it, idle timeouts of proxies and clients see traffic


async def with_pings(events: AsyncIterator[str], interval: float) -> AsyncIterator[str]:
    """Pass ``events`` through; whenever ``interval`` seconds pass without one, send an SSE comment. A long
    prompt's prefill, or a full queue, can keep a stream silent for longer than a proxy's idle timeout
    (llama.cpp's server pings the same way). ``interval`` <= 0: no pings.

    One task pulls the events into a one-place queue and a timer puts a ping there when the stream has been
    silent for ``interval``: a ping never interrupts the source in the middle of a step, and an event costs
    a queue hand-over, not a task and a timed wait of its own (which took most of the event loop's time per
    streamed token)."""
    iterator = aiter(events)
    if interval <= 0:
        async for event in iterator:
            yield event
        return
    loop = asyncio.get_running_loop()
    ready: asyncio.Queue[str | _End] = asyncio.Queue(maxsize=1)
    last = loop.time()  # of the last event or ping handed over
    closing = False

    async def pump() -> None:
        try:
            async for event in iterator:
                await ready.put(event)
            await ready.put(_End(None))
        except BaseException as exc:  # raised again by the consumer, in its own task
            if not closing:
                await ready.put(_End(exc))
            if not isinstance(exc, Exception):
                raise
        finally:
            await iterator.aclose()  # a no-op when it ended; closes it when we were cancelled between events

    def ping() -> None:
        nonlocal timer
        silent = loop.time() - last
        if silent >= interval and ready.empty():
            ready.put_nowait(SSE_PING)
            silent = 0.0
        timer = loop.call_later(interval - silent if silent < interval else interval, ping)

    task = asyncio.ensure_future(pump())
    timer = loop.call_later(interval, ping)
    try:
        while True:
            item = await ready.get()
            last = loop.time()
            if isinstance(item, _End):
                if item.error is not None:
                    raise item.error
                return
            yield item
    finally:
        closing = True
        timer.cancel()
        task.cancel()  # the client went away (or the stream ended): stop pulling events


class _End:
    """The end of a pinged stream, with the error the events raised, if any."""

    def __init__(self, error: BaseException | None):
        self.error = error


def clamp(logprob: float) -> float:
    return max(logprob, LOGPROB_FLOOR)


class StreamUsage:
    """Token counts of a stream: the final usage chunk (``include_usage``) and, with
    ``continuous_usage_stats`` as well, the running usage on every chunk (as vLLM does)."""

    def __init__(self, options: StreamOptions | None, prompt_tokens: int):
        self.final = bool(options and options.include_usage)
        self.continuous = self.final and bool(options.continuous_usage_stats)
        self.prompt_tokens = prompt_tokens
        self.completion_tokens = 0
        self.cached_tokens = 0  # known when each request's prompt is done: its final output carries it

    def count(self, out: RequestOutput) -> None:
        """Add a step's delta of one request."""
        self.completion_tokens += out.num_generated_tokens
        self.cached_tokens += out.num_cached_tokens

    def usage(self) -> UsageInfo:
        return usage_info(self.prompt_tokens, self.completion_tokens, self.cached_tokens)

    def stamp(self, chunk: Chunk) -> Chunk:
        if self.continuous:
            chunk.usage = self.usage()
        return chunk

    def last_event(self, chunk_type: type[BaseModel], meta: dict[str, Any]) -> str | None:
        """The final usage chunk (no choices), if the stream asked for one."""
        return sse(chunk_type(**meta, choices=[], usage=self.usage())) if self.final else None


class SurpriseStream:
    """Streaming ``return_surprise``: per choice, the rows not sent yet, which go out with its next chunk (the
    prompt's with its first). Rows wait while a chunk is held back (text that may be a stop string)."""

    def __init__(self, layers: list[int]):
        self.layers = layers
        self.pending: dict[int, dict[str, list]] = {}

    def add(self, index: int, prompt: list[list[float]] | None, delta: CompletionOutput) -> None:
        entry = self.pending.setdefault(index, {"completion": []})
        if prompt is not None:
            entry["prompt"] = prompt
        entry["completion"] += delta.surprise or []

    def take(self, index: int) -> Surprise:
        """The ``surprise`` field of the choice's chunk now being sent."""
        return Surprise(layers=self.layers, **self.pending.pop(index, {"completion": []}))


class ServingBase:
    id_prefix = "cmpl"

    def __init__(self, engine: EngineClient, served_model_name: str, sse_ping_interval: float, text: TextLimits):
        self.engine = engine
        self.tokenizer = engine.tokenizer
        self.text = text
        self.served_model_name = served_model_name
        self.sse_ping_interval = sse_ping_interval

    def check_request(self, model: str | None, stream: bool | None, stream_options: StreamOptions | None) -> None:
        """The checks every endpoint makes: a served model, and stream_options only when streaming."""
        if model is not None and model != self.served_model_name:
            raise APIError(404, f"The model `{model}` does not exist.", "model", "model_not_found")
        if stream_options is not None and not stream:
            raise APIError(400, "stream_options can only be set when stream is true", "stream_options",
                           "invalid_value")

    def response_meta(self, object_name: str) -> dict[str, Any]:
        """id, object, created and model: the fields every response and stream chunk starts with."""
        return dict(id=f"{self.id_prefix}-{uuid.uuid4().hex}", object=object_name, created=int(time.time()),
                    model=self.served_model_name)

    def submit(self, prompts: list[tuple[list[int], str | None]], params: SamplingParams, raw: Request,
               cache_salt: str | None, context: StateContext | None = None) -> RequestGroup:
        """Queue the prompts, restoring and caching states only in the namespace of the request's tenant
        and salt (``context``: a saved state to continue, for the Responses API)."""
        try:
            return self.engine.submit(prompts, params, time.monotonic(), request_namespace(raw, cache_salt),
                                      context)
        except QueueFullError as exc:
            raise APIError(429, str(exc), None, "queue_full", {"Retry-After": RETRY_AFTER_SECONDS}) from exc
        except EngineUnavailableError as exc:
            raise unavailable(exc) from exc

    @property
    def surprise_layers(self) -> list[int]:
        """The layers a surprise row lists (the model's Miras layers), in order."""
        return list(self.engine.model_info.miras_layers)

    def surprise(self, prompt: list[list[float]] | None, out: CompletionOutput) -> Surprise:
        """A whole choice's ``surprise`` field (return_surprise, non-streaming)."""
        return Surprise(layers=self.surprise_layers, prompt=prompt or [], completion=out.surprise or [])

    def token_str(self, token_id: int) -> str:
        return token_text(self.tokenizer, token_id)

    def stream_response(self, events: AsyncIterator[str], group: RequestGroup) -> StreamingResponse:
        """SSE: ``data: <json>`` events (with comment pings while none comes), an in-band error event if
        generation fails after the 200, and ``data: [DONE]`` last, always. Starlette cancels the generator
        when the client disconnects; the group's iteration then aborts the requests and frees their slots."""

        async def framed() -> AsyncIterator[str]:
            try:
                async for event in with_pings(events, self.sse_ping_interval):
                    yield event
            except EngineUnavailableError as exc:
                yield sse(error_body(503, str(exc), None, "unavailable"))
            except Exception as exc:  # noqa: BLE001 - the 200 is already sent; report in band
                yield sse(error_body(500, f"internal server error: {type(exc).__name__}", None, "internal_error"))
            finally:
                group.abort()
            yield sse("[DONE]")

        return StreamingResponse(framed(), media_type="text/event-stream; charset=utf-8",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})

    async def unless_disconnected(self, raw: Request, work: Awaitable[T], group: RequestGroup) -> T:
        """Run a non-streaming request, aborting it (and freeing its slots) if the client goes away."""
        task = asyncio.ensure_future(work)
        gone = asyncio.ensure_future(_wait_for_disconnect(raw))
        try:
            await asyncio.wait({task, gone}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            gone.cancel()
            if not task.done():  # the client went away, or this handler itself was cancelled
                task.cancel()
                group.abort()
        if not task.done():
            raise APIError(499, "client disconnected", None, "client_disconnected")
        try:
            return task.result()
        except EngineUnavailableError as exc:
            raise unavailable(exc) from exc


def unavailable(exc: EngineUnavailableError) -> APIError:
    return APIError(503, str(exc), None, "unavailable", {"Retry-After": RETRY_AFTER_SECONDS})


async def collect(group: RequestGroup, count: int) -> list[RequestOutput]:
    """Fold a group's deltas into one finished output per prompt (non-streaming responses)."""
    finals: list[RequestOutput | None] = [None] * count
    async for index, delta in group:
        if finals[index] is None:
            finals[index] = RequestOutput(delta.request_id, delta.prompt_token_ids, [], prompt=delta.prompt)
        finals[index].merge(delta)
    return finals


async def _wait_for_disconnect(raw: Request) -> None:
    while (await raw.receive())["type"] != "http.disconnect":
        pass


def top_entries(entry: TokenLogprob, token_str: Callable[[int], str]) -> list[tuple[str, float]]:
    return [(token_str(t), clamp(lp)) for t, lp in entry.top]
