"""Per-request sampling parameters (vLLM's names and defaults), checked on construction."""

from __future__ import annotations

from dataclasses import dataclass, field

from .bounds import Bound

GREEDY_EPSILON = 1e-5  # temperatures below this decode greedily (as in vLLM)
MAX_LOGPROBS = 20
MAX_STOP_STRINGS = 16
MAX_STOP_STRING_CHARS = 256
MAX_TOKENS_LIMIT = 1 << 20  # a guard against absurd requests; a recurrent state has no context wall

# The ranges of the sampling parameters (vLLM's), checked here and stated in the API's request models
# (server/protocol.py: ``Field(**RANGES[name].field_limits())``) and so in its OpenAPI schema.
RANGES = {
    "temperature": Bound(0),
    "top_p": Bound(0, inclusive=False, high=1),
    "min_p": Bound(0, high=1),
    "presence_penalty": Bound(-2, high=2),
    "frequency_penalty": Bound(-2, high=2),
    "repetition_penalty": Bound(0.01, high=2),
    "logit_bias": Bound(-100, high=100),  # each value
    "max_tokens": Bound(0, high=MAX_TOKENS_LIMIT),
    "logprobs": Bound(0, high=MAX_LOGPROBS),
    "prompt_logprobs": Bound(0, high=MAX_LOGPROBS),
}


class ParamError(ValueError):
    """A request parameter is invalid; ``param`` names the field (an OpenAI error's ``param``)."""

    def __init__(self, param: str | None, message: str):
        super().__init__(message)
        self.param = param


@dataclass(frozen=True)
class GuidedDecoding:
    """A constraint on the output (structured outputs, server/structured.py): ``kind`` is "json" (``value``: a
    JSON schema, as JSON text), "json_object", "regex", "choice" (``value``: a JSON list of strings) or
    "grammar" (Lark or GBNF); ``field`` names the request field it came from, for errors."""

    kind: str
    value: str
    field: str


@dataclass
class SamplingParams:
    n: int = 1
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0  # 0 or -1: off
    min_p: float = 0.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0
    logit_bias: dict[int, float] = field(default_factory=dict)
    seed: int | None = None
    max_tokens: int = 16
    min_tokens: int = 0
    stop: list[str] = field(default_factory=list)
    stop_token_ids: list[int] = field(default_factory=list)
    include_stop_str_in_output: bool = False
    ignore_eos: bool = False
    logprobs: int | None = None  # top-k logprobs of each generated token (the sampled one always)
    prompt_logprobs: int | None = None
    skip_special_tokens: bool = True
    guided: GuidedDecoding | None = None
    # each consumed token's surprise per Miras layer (docs/surprise.md): computed only for requests that ask
    return_surprise: bool = False

    def __post_init__(self) -> None:
        if isinstance(self.stop, str):
            self.stop = [self.stop]
        self.stop = list(self.stop)
        self.stop_token_ids = list(self.stop_token_ids)
        if self.top_k == -1:
            self.top_k = 0
        self.validate()

    @property
    def greedy(self) -> bool:
        return self.temperature < GREEDY_EPSILON

    def validate(self) -> None:
        def need(ok: bool, name: str, message: str) -> None:
            if not ok:
                raise ParamError(name, f"{name} {message}")

        need(isinstance(self.n, int) and self.n >= 1, "n", f"must be >= 1, got {self.n!r}")
        need(self.top_k >= 0, "top_k", f"must be 0 or -1 (off) or a positive integer, got {self.top_k}")
        for name in ("temperature", "top_p", "min_p", "presence_penalty", "frequency_penalty", "repetition_penalty",
                     "max_tokens"):
            value = getattr(self, name)
            need(RANGES[name].holds(value), name, f"must be {RANGES[name].describe()}, got {value}")
        bias = RANGES["logit_bias"]
        need(all(bias.holds(b) for b in self.logit_bias.values()), "logit_bias", f"values must be {bias.describe()}")
        need(0 <= self.min_tokens <= self.max_tokens, "min_tokens",
             f"must be in [0, max_tokens={self.max_tokens}], got {self.min_tokens}")
        need(len(self.stop) <= MAX_STOP_STRINGS, "stop",
             f"allows at most {MAX_STOP_STRINGS} strings, got {len(self.stop)}")
        need(all(isinstance(s, str) and 0 < len(s) <= MAX_STOP_STRING_CHARS for s in self.stop), "stop",
             f"strings must be non-empty and at most {MAX_STOP_STRING_CHARS} characters")
        need(len(self.stop_token_ids) <= MAX_STOP_STRINGS, "stop_token_ids",
             f"allows at most {MAX_STOP_STRINGS} ids, got {len(self.stop_token_ids)}")
        for name in ("logprobs", "prompt_logprobs"):
            value = getattr(self, name)
            need(value is None or RANGES[name].holds(value), name, f"must be {RANGES[name].describe()}, got {value}")

    def check_vocab(self, vocab_size: int) -> None:
        """Token ids named by the request must exist (called by the engine, which knows the vocabulary)."""
        for name, ids in (("stop_token_ids", self.stop_token_ids), ("logit_bias", list(self.logit_bias))):
            bad = [i for i in ids if not 0 <= i < vocab_size]
            if bad:
                raise ParamError(name, f"{name}: token id {bad[0]} is out of vocabulary (size {vocab_size})")
