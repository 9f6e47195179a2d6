"""Limits that act before any work is done, so that one request can never stall the server.

- ``BodyLimitMiddleware`` (ASGI): refuses a body by its Content-Length, or by the bytes counted while it
  arrives, with 413 (--max-request-bytes), and a body still incomplete --request-read-timeout seconds after
  its headers with 408. It reads the body before the app sees it, so nothing is parsed until all of it is
  in, and no more than the limit is ever held.
- ``GuardedH11Protocol`` (uvicorn): a deadline for a request's headers, which uvicorn lacks (a client
  sending them a byte at a time would hold its connection, and a file descriptor, forever), and for the
  unread rest of a refused body.
- ``TextLimits``: the character limit of a text prompt, checked before tokenizing, and tokenization (and
  detokenization) of large inputs on a worker thread (the tokenizer releases the GIL), so the event loop
  keeps answering.
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass

import h11
from starlette.types import ASGIApp, Message, Receive, Scope, Send
from uvicorn.protocols.http.h11_impl import H11Protocol

from miras_serve.models import MirasTokenizer

from .engine_args import DEFAULTS
from .errors import APIError, error_body, wire_json

logger = logging.getLogger("miras.api")

BODY_BYTES_PER_TOKEN = 16  # a token id in a JSON list takes <= 8 bytes; text ~4 chars a token, some escaped
BODY_HEADROOM_BYTES = 1 << 20  # sampling fields, chat framing
OFF_LOOP_CHARS = 16_384  # texts at least this long are tokenized on a worker thread
OFF_LOOP_TOKENS = 4_096  # and token-id lists at least this long detokenized on one


def default_max_request_bytes(max_prompt_tokens: int) -> int:
    """A body limit that any prompt within --max-prompt-tokens fits, as text or as token ids."""
    return BODY_BYTES_PER_TOKEN * max_prompt_tokens + BODY_HEADROOM_BYTES


def default_max_prompt_chars(tokenizer: MirasTokenizer, max_prompt_tokens: int) -> int:
    """The longest text that could still be within --max-prompt-tokens: no token covers more characters
    than its bytes, so a text longer than ``max_prompt_tokens`` times the longest token's bytes has more
    tokens than that, and is refused without tokenizing it."""
    longest = max(len(tokenizer.token_bytes(i)) for i in range(tokenizer.vocab_size))
    return max_prompt_tokens * max(longest, 1)


def _reject(status: int, message: str, code: str, close: bool) -> list[Message]:
    """A complete error response; ``close``: the connection closes after it. Otherwise whatever of the body
    is still to come is dropped as it arrives (GuardedH11Protocol bounds for how long)."""
    body = wire_json(error_body(status, message, None, code)).encode()
    headers = [(b"content-type", b"application/json")] + ([(b"connection", b"close")] if close else [])
    return [{"type": "http.response.start", "status": status, "headers": headers},
            {"type": "http.response.body", "body": body}]


class BodyLimitMiddleware:
    """Reads each request body, up to ``max_bytes`` and within ``timeout`` seconds, then hands it to the app."""

    def __init__(self, app: ASGIApp, max_bytes: int, timeout: float):
        self.app = app
        self.max_bytes = max_bytes
        self.timeout = timeout
        self.too_large = (f"request body is larger than the server's limit of {max_bytes} bytes "
                          f"(--max-request-bytes)")

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["method"] in ("GET", "HEAD", "OPTIONS"):
            return await self.app(scope, receive, send)
        declared = dict(scope["headers"]).get(b"content-length")
        if declared is not None and (not declared.isdigit() or int(declared) > self.max_bytes):
            return await self._send(send, 413, self.too_large, "request_too_large")
        try:
            body = await asyncio.wait_for(self._read(receive), self.timeout)
        except asyncio.TimeoutError:
            message = (f"request body not received within {self.timeout:g} s of its headers "
                       f"(--request-read-timeout)")
            return await self._send(send, 408, message, "request_timeout", close=True)
        except APIError as exc:
            return await self._send(send, exc.status, exc.message, exc.code)
        if body is None:  # the client went away
            return None
        replayed = False

        async def replay() -> Message:
            nonlocal replayed
            if replayed:
                return await receive()  # after the body: only http.disconnect comes
            replayed = True
            return {"type": "http.request", "body": body, "more_body": False}

        await self.app(scope, replay, send)

    async def _read(self, receive: Receive) -> bytes | None:
        chunks, size, more = [], 0, True
        while more:
            message = await receive()
            if message["type"] == "http.disconnect":
                return None
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > self.max_bytes:
                raise APIError(413, self.too_large, None, "request_too_large")
            chunks.append(chunk)
            more = message.get("more_body", False)
        return b"".join(chunks)

    @staticmethod
    async def _send(send: Send, status: int, message: str, code: str, close: bool = False) -> None:
        for event in _reject(status, message, code, close):
            await send(event)


class GuardedH11Protocol(H11Protocol):
    """uvicorn's h11 protocol, plus a deadline (``read_timeout`` seconds) for every stretch of time in which
    the connection waits on its client with no request being worked on: for the headers of the next
    request (from the connection opening, or the previous response), and for the rest of a body the app
    answered without reading (a 413 or 401: what still comes is read and dropped, as nginx's lingering
    close does, so that the client gets the answer instead of a reset). The deadline is not extended by
    bytes that trickle in; past it the connection is closed, with a 408 if part of a request's headers had
    arrived. Use :func:`h11_protocol` to set it."""

    read_timeout: float = DEFAULTS.request_read_timeout

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        self._deadline: asyncio.TimerHandle | None = None
        super().connection_made(transport)
        self._watch()

    def connection_lost(self, exc: Exception | None) -> None:
        self._stop_watching()
        super().connection_lost(exc)

    def handle_events(self) -> None:
        super().handle_events()
        self._watch()

    def on_response_complete(self) -> None:
        super().on_response_complete()
        self._watch()

    def _waiting_on_client(self) -> bool:
        return self.cycle is None or self.cycle.response_complete

    def _watch(self) -> None:
        if not self._waiting_on_client() or self.transport.is_closing():
            self._stop_watching()
        elif self._deadline is None:
            self._deadline = self.loop.call_later(self.read_timeout, self._timed_out)

    def _stop_watching(self) -> None:
        if self._deadline is not None:
            self._deadline.cancel()
            self._deadline = None

    def _timed_out(self) -> None:
        self._deadline = None
        if self.transport.is_closing() or not self._waiting_on_client():
            return
        if self.conn.their_state is h11.IDLE and self.conn.trailing_data[0]:  # part of the headers came
            message = f"request headers not received within {self.read_timeout:g} s (--request-read-timeout)"
            body = wire_json(error_body(408, message, None, "request_timeout")).encode()
            self.transport.write(b"HTTP/1.1 408 Request Timeout\r\ncontent-type: application/json\r\n"
                                 b"connection: close\r\ncontent-length: %d\r\n\r\n%s" % (len(body), body))
        self.transport.close()


def h11_protocol(read_timeout: float) -> type[GuardedH11Protocol]:
    """The protocol class to give uvicorn (``Config(http=...)``) for a client deadline of ``read_timeout``."""
    return type("GuardedH11Protocol", (GuardedH11Protocol,), {"read_timeout": read_timeout})


@dataclass
class TextLimits:
    """Turns request texts into token ids and back: texts are refused past ``max_chars`` before any
    tokenizing; long inputs are handled on a worker thread, so the event loop keeps serving meanwhile."""

    tokenizer: MirasTokenizer
    max_chars: int

    def check(self, text: str, param: str) -> None:
        if len(text) > self.max_chars:
            raise APIError(400, f"{param} has {len(text)} characters, more than the server's limit of "
                           f"{self.max_chars} (--max-prompt-chars)", param, "prompt_too_long")

    async def encode(self, text: str, add_bos: bool, param: str) -> list[int]:
        self.check(text, param)
        if len(text) < OFF_LOOP_CHARS:
            return self.tokenizer.encode(text, add_bos=add_bos)
        return await asyncio.to_thread(self.tokenizer.encode, text, add_bos)

    async def decode(self, token_ids: list[int]) -> str:
        if len(token_ids) < OFF_LOOP_TOKENS:
            return self.tokenizer.decode(token_ids)
        return await asyncio.to_thread(self.tokenizer.decode, token_ids)
