"""Drive a server at a fixed concurrency or a Poisson rate, always bounded by a request count or a duration."""

from __future__ import annotations

import asyncio
import itertools
import sys
import time
from dataclasses import dataclass

import httpx

from miras_serve.loadtest.client import ApiConfig, check_tokens, new_client, send_request
from miras_serve.loadtest.stats import RequestResult
from miras_serve.loadtest.workload import Workload, poisson_arrivals


@dataclass(frozen=True)
class Load:
    """One load level: ``concurrency`` closed-loop workers, or Poisson arrivals at ``rate`` req/s served by at
    most ``max_concurrency`` workers. It ends after ``num_requests`` or ``duration`` seconds (whichever first)."""

    concurrency: int | None = None
    rate: float | None = None
    max_concurrency: int = 256
    num_requests: int | None = None
    duration: float | None = None

    def __post_init__(self) -> None:
        if (self.concurrency is None) == (self.rate is None):
            raise ValueError("a load level has a concurrency or a request rate, not both")
        if self.num_requests is None and self.duration is None:
            raise ValueError("a load level needs num_requests or duration: runs are always bounded")

    @property
    def label(self) -> str:
        return f"concurrency {self.concurrency}" if self.concurrency is not None else f"rate {self.rate:g} req/s"

    @property
    def workers(self) -> int:
        count = self.concurrency if self.concurrency is not None else self.max_concurrency
        return min(count, self.num_requests) if self.num_requests is not None else count


class Progress:
    """A one-line progress bar on stderr, redrawn at most ten times a second."""

    def __init__(self, label: str, total: int | None, duration: float | None, enabled: bool = True):
        self.label, self.total, self.duration, self.enabled = label, total, duration, enabled
        self.ok = self.failed = 0
        self.start = self.last_draw = time.perf_counter()

    def update(self, result: RequestResult) -> None:
        if result.ok:
            self.ok += 1
        else:
            self.failed += 1
        now = time.perf_counter()
        if now - self.last_draw >= 0.1:
            self.draw(now)

    def draw(self, now: float) -> None:
        if not self.enabled:
            return
        self.last_draw = now
        elapsed = now - self.start
        fractions = [(self.ok + self.failed) / self.total] if self.total else []
        fractions += [elapsed / self.duration] if self.duration else []
        fraction = min(1.0, max(fractions))
        bar = "#" * int(30 * fraction)
        sys.stderr.write(f"\r{self.label:>22} [{bar:<30}] {self.ok + self.failed}"
                         f"{'/' + str(self.total) if self.total else ''} ok {self.ok} errors {self.failed}"
                         f" {elapsed:6.1f}s")
        sys.stderr.flush()

    def close(self) -> None:
        if self.enabled:
            self.draw(time.perf_counter())
            sys.stderr.write("\n")


async def run_load(api: ApiConfig, workload: Workload, load: Load, *, seed: int = 0, check: bool = False,
                   timeout: float = 600.0, first_index: int = 0, progress: bool = True) -> list[RequestResult]:
    """Every request released is returned with its outcome: none is dropped, whatever the server does."""
    t0 = time.perf_counter()
    results: list[RequestResult] = []
    bar = Progress(load.label, load.num_requests, load.duration, progress)
    queue: asyncio.Queue[tuple[int, float] | None] = asyncio.Queue()

    async def serve(index: int, scheduled_at: float, client: httpx.AsyncClient) -> None:
        result = await send_request(client, api, workload.request(first_index + index), scheduled_at, t0)
        if check:
            check_tokens(result)
        results.append(result)
        bar.update(result)

    async def closed_loop_worker(counter: itertools.count) -> None:
        async with new_client(timeout) as client:
            while True:
                now = time.perf_counter() - t0
                if load.duration is not None and now >= load.duration:
                    return
                index = next(counter)
                if load.num_requests is not None and index >= load.num_requests:
                    return
                await serve(index, now, client)

    async def queue_worker() -> None:
        async with new_client(timeout) as client:
            while (item := await queue.get()) is not None:
                await serve(*item, client)

    async def release_arrivals() -> None:
        arrivals = poisson_arrivals(load.rate, seed, load.num_requests, load.duration)
        for index, at in enumerate(arrivals):
            await asyncio.sleep(max(0.0, at - (time.perf_counter() - t0)))
            queue.put_nowait((index, at))
        for _ in range(load.workers):
            queue.put_nowait(None)

    if load.concurrency is not None:
        counter = itertools.count()
        await asyncio.gather(*(closed_loop_worker(counter) for _ in range(load.workers)))
    else:
        await asyncio.gather(release_arrivals(), *(queue_worker() for _ in range(load.workers)))
    bar.close()
    return sorted(results, key=lambda r: r.index)
