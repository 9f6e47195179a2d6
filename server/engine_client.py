"""The one interface between the HTTP layer and the engine.

The routes, the serving classes and the middleware (server/api.py, serving_*.py, middleware.py) talk to the
engine only through :class:`EngineClient`: submit prompts and iterate their outputs, abort, ask what the model
is, forget or flush saved states, read the metrics, and start, drain and stop. The async engine
(server/async_engine.py) implements it over the engine thread; nothing on the HTTP side reaches into the
engine, its scheduler or its state pool.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Protocol

from prometheus_client import CollectorRegistry

from miras_serve.models import MirasTokenizer

from .outputs import RequestOutput
from .request import StateContext
from .sampling_params import SamplingParams


class QueueFullError(RuntimeError):
    """The waiting queue is full; retry later."""


class EngineUnavailableError(RuntimeError):
    """The engine is draining for shutdown, or dead."""


@dataclass(frozen=True)
class ModelInfo:
    """What the HTTP layer needs to know of the served model, fixed at start-up."""

    max_prompt_tokens: int  # --max-prompt-tokens
    vocab_size: int  # token ids the tokenizer can decode
    miras_layers: tuple[int, ...]  # the layers a surprise row lists, in order
    saves_states: bool  # the state cache is on: a conversation can continue from a saved state


class EngineClient(Protocol):
    @property
    def tokenizer(self) -> MirasTokenizer: ...

    @property
    def model_info(self) -> ModelInfo: ...

    @property
    def metrics_registry(self) -> CollectorRegistry:
        """The engine's Prometheus metrics (GET /metrics)."""
        ...

    @property
    def running(self) -> bool:
        """Started, and neither stopped nor dead."""
        ...

    @property
    def dead(self) -> BaseException | None:
        """What killed the engine, if it died."""
        ...

    def submit(self, prompts: list[tuple[list[int], str | None]], params: SamplingParams,
               arrival_time: float | None = None, cache_namespace: str = "",
               context: StateContext | None = None) -> RequestGroup:
        """Queue one request per (token ids, text) prompt, all or none; iterate the group for the outputs.
        Raises ParamError (bad input, naming the field), QueueFullError or EngineUnavailableError."""
        ...

    def abort(self, request_id: str) -> None: ...

    def forget_states(self, keys: list[bytes]) -> None:
        """Delete saved states (a deleted conversation's) from every tier."""
        ...

    def flush_saved_states(self) -> None:
        """Wait until the states saved so far are written below memory (at shutdown)."""
        ...

    def start(self) -> None: ...

    def stop(self) -> None: ...

    async def drain(self, timeout: float) -> None:
        """Refuse new requests, let in-flight ones finish for up to ``timeout`` s, then abort the rest."""
        ...


class RequestGroup:
    """The requests of one API call (one per prompt). Iterating yields (prompt index, delta) until all
    finish; leaving early, or ``abort()``, aborts whatever is unfinished (a client that went away)."""

    def __init__(self, engine: EngineClient, request_ids: list[str], queue: asyncio.Queue):
        self.engine = engine
        self.index = {rid: i for i, rid in enumerate(request_ids)}
        self.unfinished = set(request_ids)
        self.queue = queue

    def __aiter__(self) -> AsyncIterator[tuple[int, RequestOutput]]:
        return self._iterate()

    async def _iterate(self) -> AsyncIterator[tuple[int, RequestOutput]]:
        try:
            while self.unfinished:
                item = await self.queue.get()
                if isinstance(item, BaseException):
                    raise item
                if item.finished:
                    self.unfinished.discard(item.request_id)
                yield self.index[item.request_id], item
        finally:
            self.abort()

    def abort(self) -> None:
        for request_id in self.unfinished:
            self.engine.abort(request_id)
        self.unfinished = set()
