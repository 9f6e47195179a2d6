"""Continuous batching over a fixed pool of state slots.

Each step every decoding sequence gets one token; the rest of the token budget goes to prefill chunks,
first of prompts already being prefilled, then of waiting requests admitted in arrival order while
enough slots are free (n slots for a request with n samples). A recurrent state has a fixed size, so a
slot is all a request needs: admission never depends on prompt length and nothing is ever preempted.

Prefill pieces are multiples of the model's chunk size (except a prompt's last piece). A request can
start from a saved state when ``cached_prefix`` finds one in the state cache, past as many prompt tokens as
that state consumed; if that is all of them, it is admitted without a prefill piece. ``schedule()`` returns
what it decided: the decodes, the prefill pieces, the requests admitted, and the saved state each restored
request starts from.
"""

from __future__ import annotations

import heapq
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

from .request import Request, RequestStatus, Sequence
from .state_cache import CachedState

# A request about to be admitted -> the saved state it can start from (None: none) and how many of its
# prompt tokens that state has consumed (the prefill starts there).
CachedPrefix = Callable[[Request], tuple[CachedState | None, int]]


@dataclass
class PrefillChunk:
    request: Request
    start: int
    end: int

    @property
    def last(self) -> bool:
        return self.end == self.request.num_prompt_tokens


@dataclass
class SchedulerOutput:
    decodes: list[Sequence] = field(default_factory=list)
    prefills: list[PrefillChunk] = field(default_factory=list)
    admitted: list[Request] = field(default_factory=list)
    # admitted requests that start from a saved state instead of a fresh one: request id -> that state
    restored: dict[str, CachedState] = field(default_factory=dict)

    @property
    def num_tokens(self) -> int:
        return len(self.decodes) + sum(c.end - c.start for c in self.prefills)

    @property
    def empty(self) -> bool:
        return not self.decodes and not self.prefills and not self.admitted


class Scheduler:
    def __init__(self, max_num_seqs: int, max_num_batched_tokens: int, chunk_size: int,
                 cached_prefix: CachedPrefix | None = None):
        if max_num_batched_tokens < max_num_seqs + chunk_size:
            # otherwise a full decode batch could leave no room for any prefill chunk
            raise ValueError(f"max_num_batched_tokens ({max_num_batched_tokens}) must be >= max_num_seqs "
                             f"({max_num_seqs}) + the model's chunk_size ({chunk_size})")
        self.max_num_seqs = max_num_seqs
        self.max_num_batched_tokens = max_num_batched_tokens
        self.chunk_size = chunk_size
        self.cached_prefix = cached_prefix  # the state cache's answer for a request about to be admitted
        # A min-heap: the lowest free slot is handed out first, which keeps the running sequences in few
        # runs of consecutive slots (the PyTorch decode path reads and writes one run through views).
        self.free_slots: list[int] = list(range(max_num_seqs))
        self.waiting: deque[Request] = deque()
        self.running: dict[str, Request] = {}  # admitted (prefilling or decoding), in admission order

    @property
    def num_waiting(self) -> int:
        return len(self.waiting)

    @property
    def num_running(self) -> int:
        return len(self.running)

    @property
    def num_slots_used(self) -> int:
        return self.max_num_seqs - len(self.free_slots)

    def add(self, request: Request) -> None:
        if request.params.n > self.max_num_seqs:
            raise ValueError(f"n={request.params.n} exceeds max_num_seqs={self.max_num_seqs}")
        self.waiting.append(request)

    def has_unfinished(self) -> bool:
        return bool(self.waiting or self.running)

    def _prefill_size(self, request: Request, budget: int, start: int) -> int:
        """Tokens of the next prefill piece from prompt position ``start`` within ``budget``."""
        remaining = request.num_prompt_tokens - start
        if remaining <= budget:
            return remaining
        return budget // self.chunk_size * self.chunk_size

    def schedule(self) -> SchedulerOutput:
        out = SchedulerOutput()
        prefilling = []
        for request in self.running.values():
            if request.status is RequestStatus.DECODING:
                out.decodes.extend(s for s in request.sequences if not s.finished)
            else:
                prefilling.append(request)
        budget = self.max_num_batched_tokens - len(out.decodes)
        for request in prefilling:
            size = self._prefill_size(request, budget, request.num_prefilled)
            if size == 0:
                return out
            out.prefills.append(PrefillChunk(request, request.num_prefilled, request.num_prefilled + size))
            budget -= size
        while self.waiting and len(self.free_slots) >= self.waiting[0].params.n:
            request = self.waiting[0]
            entry, start = self.cached_prefix(request) if self.cached_prefix else (None, 0)
            size = self._prefill_size(request, budget, start)
            if size == 0 and start < request.num_prompt_tokens:
                break
            self.waiting.popleft()
            request.num_prefilled = start
            request.slots = [heapq.heappop(self.free_slots) for _ in range(request.params.n)]
            request.status = RequestStatus.PREFILLING
            request.scheduled_time = time.monotonic()
            self.running[request.request_id] = request
            out.admitted.append(request)
            if entry is not None:
                out.restored[request.request_id] = entry
            if size:
                out.prefills.append(PrefillChunk(request, start, start + size))
            budget -= size
        return out

    def free_sequence(self, sequence: Sequence) -> None:
        heapq.heappush(self.free_slots, sequence.slot)

    def remove(self, request: Request) -> None:
        """Drop a request (finished or aborted), returning every slot it still holds."""
        if request.status is RequestStatus.WAITING:
            self.waiting.remove(request)
        elif self.running.pop(request.request_id, None) is not None:
            held = request.slots if request.status is RequestStatus.PREFILLING else \
                [s.slot for s in request.sequences if not s.finished]
            for slot in held:
                heapq.heappush(self.free_slots, slot)
        request.status = RequestStatus.FINISHED
