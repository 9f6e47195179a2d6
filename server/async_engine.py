"""Runs the engine in a background thread and serves its outputs to asyncio callers.

Torch releases the GIL inside its kernels, so the event loop keeps streaming while a step runs. Callers
add and abort requests through an inbox the engine thread drains between steps; outputs travel back
through one asyncio queue per request. The waiting queue is bounded: beyond ``max_queued_requests``
requests waiting for a slot (not yet admitted, less the free slots), ``submit`` raises QueueFullError (HTTP
429) instead of growing a backlog.
It is the HTTP layer's :class:`~server.engine_client.EngineClient`.

On a CPU the engine thread is the process's only user of torch's intra-op (OpenMP) threads: see
:func:`reserve_intra_op_threads`.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
import uuid
from dataclasses import dataclass

import torch
from prometheus_client import CollectorRegistry

from miras_serve.models import MirasTokenizer

from .engine import LLMEngine
from .engine_args import DEFAULTS
from .engine_client import EngineUnavailableError, ModelInfo, QueueFullError, RequestGroup
from .outputs import RequestOutput
from .request import StateContext
from .sampling_params import ParamError, SamplingParams

logger = logging.getLogger("miras.engine")


def reserve_intra_op_threads() -> int:
    """Leave the calling thread (the server's main thread: start-up, then the event loop) one torch thread and
    return the count the engine thread should run with instead (torch's default: every core, or
    ``OMP_NUM_THREADS``). Call it before any torch work in that thread.

    Why: each thread that runs a parallel torch op gets its own OpenMP team, whose worker threads live as long
    as it does. Once the process holds more of them than there are cores, GNU OpenMP stops spin-waiting between
    parallel regions (its throttled spin count) and every op of the engine thread pays a futex wake-up of its
    workers: a 266-token prefill of moneta-tiny in the server's engine thread took 111-169 ms after the main
    thread had loaded the model on two threads, and 85-91 ms when the main thread kept one (two in-process
    runs each, 2 cores; docs/serving.md)."""
    threads = torch.get_num_threads()  # also settles this thread's count, so that later ops keep the 1 below
    torch.set_num_threads(1)
    return threads


@dataclass
class _Pending:
    request_id: str
    prompt_token_ids: list[int]
    params: SamplingParams
    prompt: str | None
    arrival_time: float
    queue: asyncio.Queue
    loop: asyncio.AbstractEventLoop
    cache_namespace: str
    context: StateContext | None = None


class AsyncEngine:
    """The engine thread runs on the engine's ``config.step_threads`` torch intra-op threads (what its decode
    steps were compiled for; :func:`reserve_intra_op_threads`); None leaves torch's count as the thread finds
    it."""

    def __init__(self, engine: LLMEngine, max_queued_requests: int = DEFAULTS.max_queued_requests):
        self.engine = engine
        self.model_info = ModelInfo(engine.config.max_prompt_tokens, engine.vocab_size, tuple(engine.miras_layers),
                                    engine.state_cache is not None)
        self.max_queued_requests = max_queued_requests
        self.draining = False
        self.dead: BaseException | None = None
        self._lock = threading.Lock()
        self._wake = threading.Condition(self._lock)
        self._inbox: list[_Pending] = []
        self._aborts: list[str] = []
        self._forgotten: list[bytes] = []  # state-cache keys to delete on the engine thread
        self._streams: dict[str, _Pending] = {}  # engine thread only
        self._stop = False
        self._closed = False  # set (under the lock) once the engine thread takes no more requests
        self._thread: threading.Thread | None = None

    # ---- lifecycle ------------------------------------------------------------------------------------

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="miras-engine", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        with self._lock:
            self._stop = True
            self._wake.notify()
        if self._thread is not None:
            self._thread.join(timeout=30)

    # ---- what the HTTP layer may know of the engine (EngineClient) ---------------------------------------

    @property
    def tokenizer(self) -> MirasTokenizer:
        return self.engine.tokenizer

    @property
    def metrics_registry(self) -> CollectorRegistry:
        return self.engine.metrics.registry

    def flush_saved_states(self) -> None:
        self.engine.flush_saved_states()

    @property
    def running(self) -> bool:
        return self._thread is not None and self._thread.is_alive() and self.dead is None

    def num_unfinished(self) -> int:
        with self._lock:
            return len(self._inbox) + len(self.engine.requests)

    async def drain(self, timeout: float) -> None:
        """Refuse new requests, let in-flight ones finish for up to ``timeout`` s, then abort the rest."""
        self.draining = True
        deadline = time.monotonic() + timeout
        while self.num_unfinished() and self.running and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        with self._lock:
            self._aborts.extend(p.request_id for p in self._inbox)
            self._aborts.extend(self.engine.requests)
            self._wake.notify()
        while self.num_unfinished() and self.running:
            await asyncio.sleep(0.02)

    # ---- requests -------------------------------------------------------------------------------------

    def submit(self, prompts: list[tuple[list[int], str | None]], params: SamplingParams,
               arrival_time: float | None = None, cache_namespace: str = "",
               context: StateContext | None = None) -> RequestGroup:
        """Queue one request per prompt (validated first; all or none), restoring and caching states in
        ``cache_namespace`` only; with ``context``, each prompt continues that saved state.
        Raises ParamError (bad input), QueueFullError or EngineUnavailableError.
        Iterate the returned group to get the outputs."""
        if self.draining or not self.running:
            self.engine.metrics.request_rejected["draining"].inc()
            reason = "the server is shutting down" if self.draining else "the engine is not running"
            raise EngineUnavailableError(reason)
        if len(prompts) > self.max_queued_requests:  # could never fit: a 429 would be retried forever
            raise ParamError("prompt", f"{len(prompts)} prompts in one request is more than the server's queue "
                             f"holds ({self.max_queued_requests}, --max-queued-requests)")
        for ids, _ in prompts:
            self.engine.validate(ids, params)
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue = asyncio.Queue()
        arrival = arrival_time or time.monotonic()
        pending = [_Pending(uuid.uuid4().hex, list(ids), params, text, arrival, queue, loop, cache_namespace, context)
                   for ids, text in prompts]
        with self._lock:
            if self._closed:  # the engine thread stopped or died after the check above
                raise EngineUnavailableError("the engine is not running")
            # requests that will wait for a slot: those not yet admitted, less the slots free now (a burst
            # into an idle server is admitted, not refused because the engine thread has not yet taken it)
            not_admitted = len(self._inbox) + self.engine.num_waiting + len(pending)
            if not_admitted - self.engine.num_free_slots > self.max_queued_requests:
                self.engine.metrics.request_rejected["queue_full"].inc()
                raise QueueFullError(f"the server's queue is full ({self.max_queued_requests} waiting requests)")
            self._inbox.extend(pending)
            self._wake.notify()
        return RequestGroup(self, [p.request_id for p in pending], queue)

    def abort(self, request_id: str) -> None:
        with self._lock:
            self._aborts.append(request_id)
            self._wake.notify()

    def forget_states(self, keys: list[bytes]) -> None:
        """Delete saved states (a deleted conversation's), from every tier, on the engine thread. A request
        that was about to restore one rebuilds it instead."""
        if self.engine.state_cache is None:
            return
        with self._lock:
            self._forgotten.extend(keys)
            self._wake.notify()

    # ---- engine thread ---------------------------------------------------------------------------------

    def _take_inbox(self) -> list[str] | None:
        """Wait for work; add queued requests to the engine and return the ids to abort (None: stop)."""
        with self._lock:
            while not (self._stop or self._inbox or self._aborts or self._forgotten or self.engine.has_unfinished()):
                self._wake.wait()
            if self._stop:
                return None
            # added under the lock, so a waiting request is always counted by generate's admission check
            for p in self._inbox:
                self._add(p)
            for key in self._forgotten:
                self.engine.state_cache.delete(key)
            aborts = self._aborts
            self._inbox, self._aborts, self._forgotten = [], [], []
            return aborts

    def _add(self, p: _Pending) -> None:
        try:
            self.engine.add_request(p.request_id, p.prompt_token_ids, p.params, p.prompt, p.arrival_time,
                                    validated=True, cache_namespace=p.cache_namespace, context=p.context)
            self._streams[p.request_id] = p
        except ValueError as exc:  # validated before queueing, so only a duplicate id gets here
            p.loop.call_soon_threadsafe(p.queue.put_nowait, exc)

    def _deliver(self, outputs: list[RequestOutput]) -> None:
        by_loop: dict[asyncio.AbstractEventLoop, list[tuple[asyncio.Queue, RequestOutput]]] = {}
        for out in outputs:
            stream = self._streams.get(out.request_id)
            if stream is None:
                continue
            if out.finished:
                del self._streams[out.request_id]
            by_loop.setdefault(stream.loop, []).append((stream.queue, out))
        for loop, items in by_loop.items():  # one wake-up of the event loop per step, not per request
            loop.call_soon_threadsafe(_put_all, items)

    def _run(self) -> None:
        error = EngineUnavailableError("the engine stopped")
        try:
            if self.engine.config.step_threads is not None:
                torch.set_num_threads(self.engine.config.step_threads)
            while True:
                aborts = self._take_inbox()
                if aborts is None:
                    return
                outputs = [out for rid in aborts if (out := self.engine.abort_request(rid)) is not None]
                if self.engine.has_unfinished():
                    outputs += self.engine.step()
                self._deliver(outputs)
        except BaseException as exc:  # a dead engine must fail every request, not hang them
            logger.exception("engine loop died")
            self.dead = exc
            error = EngineUnavailableError(f"engine failed: {exc}")
        finally:
            self._fail_all(error)

    def _fail_all(self, error: Exception) -> None:
        """The engine thread is leaving: end every stream it still owes an answer, and take no more."""
        with self._lock:
            self._closed = True
            streams = list(self._streams.values()) + self._inbox
            self._inbox, self._streams = [], {}
        for p in streams:
            p.loop.call_soon_threadsafe(p.queue.put_nowait, error)


def _put_all(items: list[tuple[asyncio.Queue, RequestOutput]]) -> None:
    for queue, out in items:
        queue.put_nowait(out)
