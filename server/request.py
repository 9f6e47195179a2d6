"""A request (one prompt) and its n sequences, as the scheduler and engine track them."""

from __future__ import annotations

import enum
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from .detokenizer import IncrementalDetokenizer
from .outputs import TokenLogprob
from .sampling_params import SamplingParams
from .state_cache import state_key
from .structured import GrammarMatcher


class RequestStatus(enum.Enum):
    WAITING = "waiting"  # queued, holds no state slot
    PREFILLING = "prefilling"  # holds its slots; prompt partly consumed
    DECODING = "decoding"
    FINISHED = "finished"


@dataclass
class Sequence:
    """One generated continuation; it owns one state slot from admission until it finishes."""

    request_id: str
    index: int
    slot: int
    detokenizer: IncrementalDetokenizer
    token_ids: list[int] = field(default_factory=list)
    logprobs: list[TokenLogprob] | None = None
    finish_reason: str | None = None
    stop_reason: str | int | None = None
    finish_reported: bool = False
    last_token_time: float = 0.0
    # what has not been handed out yet (the step delta)
    new_token_ids: list[int] = field(default_factory=list)
    new_logprobs: list[TokenLogprob] = field(default_factory=list)
    matcher: GrammarMatcher | None = None  # its grammar (structured outputs), advanced with each token
    new_surprise: list[list[float] | None] = field(default_factory=list)  # return_surprise: rows not handed out

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None


@dataclass(frozen=True)
class StateContext:
    """A saved state a prompt continues (a conversation continued by reference): the prompt holds only
    the tokens after it. ``token_ids`` gives the tokens that state consumed, to rebuild it if it is gone."""

    key: bytes  # its state-cache key
    length: int  # tokens it consumed
    token_ids: Callable[[], list[int]]


@dataclass
class Request:
    request_id: str
    prompt_token_ids: list[int]
    params: SamplingParams
    prompt: str | None = None
    cache_namespace: str = ""  # the tenant (and salt) whose state-cache entries this request may use
    arrival_time: float = field(default_factory=time.monotonic)
    status: RequestStatus = RequestStatus.WAITING
    num_prefilled: int = 0
    slots: list[int] = field(default_factory=list)  # n slots; slots[0] carries the prefill
    sequences: list[Sequence] = field(default_factory=list)
    prompt_logprobs: list[TokenLogprob | None] | None = None
    prompt_surprise: list[list[float]] | None = None  # return_surprise: a row per prompt token prefilled so far
    prompt_surprise_reported: bool = False
    prompt_logprobs_sent: bool = False  # handed out (once, with the first generated tokens)
    scheduled_time: float | None = None
    first_token_time: float | None = None
    context: StateContext | None = None
    context_length: int = 0  # prompt tokens that rebuild a lost context (they come first in the prompt)
    num_cached_tokens: int = 0  # tokens restored from a saved state instead of prefilled (context included)

    def cache_key(self, token_ids: list[int]) -> bytes:
        """The state-cache key of the state after ``token_ids`` (the prompt, then generated tokens)."""
        context = self.context.key if self.context is not None else None
        return state_key(context, self.cache_namespace, token_ids[self.context_length:])

    @property
    def num_prompt_tokens(self) -> int:
        return len(self.prompt_token_ids)

    @property
    def num_generated_tokens(self) -> int:
        return sum(len(s.token_ids) for s in self.sequences)

    @property
    def finished(self) -> bool:
        return self.status is RequestStatus.FINISHED
