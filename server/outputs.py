"""What the engine hands back: per-step deltas of each request, and the offline API's full results."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class TokenLogprob:
    """One position's logprob: the chosen token's and the top alternatives' (raw model distribution)."""

    token_id: int
    logprob: float
    top: list[tuple[int, float]] = field(default_factory=list)


@dataclass
class CompletionOutput:
    """One of a request's n sequences. In a step delta, text/token_ids/logprobs are what is new."""

    index: int
    text: str = ""
    token_ids: list[int] = field(default_factory=list)
    logprobs: list[TokenLogprob] | None = None
    finish_reason: str | None = None  # "stop" | "length" | "abort"
    stop_reason: str | int | None = None  # the stop string or stop token id that fired; None for EOS
    # return_surprise: one row (a float per Miras layer) per generated token whose surprise is known, in order;
    # a token's is known once it is fed (a step after it is sampled); the last token's, never fed, is None
    surprise: list[list[float] | None] | None = None

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None

    def merge(self, delta: CompletionOutput) -> None:
        self.text += delta.text
        self.token_ids += delta.token_ids
        if delta.logprobs is not None:
            self.logprobs = (self.logprobs or []) + delta.logprobs
        if delta.surprise is not None:
            self.surprise = (self.surprise or []) + delta.surprise
        if delta.finish_reason is not None:
            self.finish_reason, self.stop_reason = delta.finish_reason, delta.stop_reason


@dataclass
class RequestOutput:
    request_id: str
    prompt_token_ids: list[int]
    outputs: list[CompletionOutput]
    finished: bool = False
    prompt: str | None = None
    # in the delta with the request's first tokens and in its final one; first position: None
    prompt_logprobs: list[TokenLogprob | None] | None = None
    num_cached_tokens: int = 0  # tokens of the context restored from a saved state (final output only)
    # return_surprise: a row per prompt token (a float per Miras layer), in the first output with generated tokens
    prompt_surprise: list[list[float]] | None = None

    @property
    def num_generated_tokens(self) -> int:
        return sum(len(o.token_ids) for o in self.outputs)

    def merge(self, delta: RequestOutput) -> None:
        """Fold a step delta into an accumulated output."""
        by_index = {o.index: o for o in self.outputs}
        for out in delta.outputs:
            if out.index in by_index:
                by_index[out.index].merge(out)
            else:
                fresh = CompletionOutput(out.index)
                fresh.merge(out)
                self.outputs.append(fresh)
                by_index[out.index] = fresh
        self.outputs.sort(key=lambda o: o.index)
        if delta.prompt_logprobs is not None:
            self.prompt_logprobs = delta.prompt_logprobs
        if delta.prompt_surprise is not None:
            self.prompt_surprise = delta.prompt_surprise
        self.num_cached_tokens = max(self.num_cached_tokens, delta.num_cached_tokens)
        self.finished = delta.finished
