"""Statistics over request results: percentiles, TPOT, goodput, throughput (vLLM's `bench serve` definitions)."""

from __future__ import annotations

import math
from collections import Counter
from dataclasses import dataclass, field

PERCENTILES = (50, 90, 99)


@dataclass
class RequestResult:
    """One request as the client saw it. Times are seconds from the start of the run."""

    index: int
    prompt_len: int  # prompt tokens by the workload's tokenizer
    max_tokens: int  # output tokens asked for
    scheduled_at: float  # when the arrival process released it
    sent_at: float = math.nan
    finished_at: float = math.nan
    error: str | None = None  # kind, e.g. "http_429", "timeout", "stream_cut"; None means success
    error_detail: str = ""
    status: int | None = None
    clean_rejection: bool = False  # a 429/503 with an OpenAI-shaped error body
    ttft: float | None = None  # first non-empty content chunk, from sent_at
    itl: list[float] = field(default_factory=list)  # gaps between content chunks
    output_tokens: int = 0  # usage.completion_tokens when reported, else content chunks
    prompt_tokens: int | None = None  # usage.prompt_tokens as the server counted them
    usage_reported: bool = False
    finish_reason: str | None = None

    @property
    def ok(self) -> bool:
        return self.error is None

    @property
    def e2e(self) -> float:
        return self.finished_at - self.sent_at

    @property
    def tpot(self) -> float | None:
        """Time per output token after the first: (e2e - ttft) / (output_tokens - 1)."""
        if not self.ok or self.ttft is None or self.output_tokens < 2:
            return None
        return (self.e2e - self.ttft) / (self.output_tokens - 1)


def percentile(values: list[float], p: float) -> float:
    """Linear interpolation between closest ranks (numpy's default method)."""
    if not values:
        return math.nan
    if not 0 <= p <= 100:
        raise ValueError(f"percentile must be in [0, 100], got {p}")
    ordered = sorted(values)
    rank = p / 100 * (len(ordered) - 1)
    low = math.floor(rank)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (rank - low)


def distribution(values: list[float], scale: float = 1.0) -> dict[str, float]:
    """count, mean, min, max and the PERCENTILES of ``values`` multiplied by ``scale`` (1000 for ms)."""
    scaled = [v * scale for v in values]
    out = {"count": len(scaled), "mean": sum(scaled) / len(scaled) if scaled else math.nan,
           "min": min(scaled, default=math.nan), "max": max(scaled, default=math.nan)}
    out.update({f"p{p}": percentile(scaled, p) for p in PERCENTILES})
    return out


@dataclass(frozen=True)
class SLO:
    """Service-level objectives in seconds; a request is "good" if it meets every one that is set."""

    ttft: float | None = None
    tpot: float | None = None
    e2el: float | None = None

    @classmethod
    def parse(cls, items: list[str]) -> SLO:
        """``["ttft:500", "tpot:50", "e2el:5000"]`` in milliseconds, as vLLM's --goodput takes them."""
        limits: dict[str, float] = {}
        for item in items:
            name, _, value = item.partition(":")
            if name not in ("ttft", "tpot", "e2el"):
                raise ValueError(f"--goodput: unknown SLO {name!r} (use ttft, tpot or e2el)")
            try:
                ms = float(value)
            except ValueError:
                raise ValueError(f"--goodput: {item!r} needs a number of milliseconds, like ttft:500") from None
            if ms <= 0:
                raise ValueError(f"--goodput: {item!r} must be positive")
            limits[name] = ms / 1000
        return cls(**limits)

    @property
    def empty(self) -> bool:
        return self.ttft is None and self.tpot is None and self.e2el is None

    def met_by(self, result: RequestResult) -> bool:
        if not result.ok:
            return False
        if self.ttft is not None and (result.ttft is None or result.ttft > self.ttft):
            return False
        # A one-token answer has no TPOT, so a TPOT objective cannot fail on it.
        if self.tpot is not None and result.tpot is not None and result.tpot > self.tpot:
            return False
        return self.e2el is None or result.e2e <= self.e2el


def peak_concurrency(results: list[RequestResult]) -> int:
    """Most requests in flight at once, from the send and finish times."""
    events = sorted([(r.sent_at, 1) for r in results if not math.isnan(r.sent_at)]
                    + [(r.finished_at, -1) for r in results if not math.isnan(r.sent_at)])
    peak = current = 0
    for _, step in events:  # at equal times -1 sorts first: a request that ends as another starts is not overlap
        current += step
        peak = max(peak, current)
    return peak


LATENCY_KEYS = ("ttft", "tpot", "itl", "e2el")


def latency_samples(results: list[RequestResult], key: str) -> list[float]:
    """Seconds: one sample per successful request for ttft/tpot/e2el, one per token gap for itl."""
    done = [r for r in results if r.ok]
    if key == "ttft":
        return [r.ttft for r in done if r.ttft is not None]
    if key == "tpot":
        return [t for r in done if (t := r.tpot) is not None]
    if key == "itl":
        return [gap for r in done for gap in r.itl]
    if key == "e2el":
        return [r.e2e for r in done]
    raise ValueError(f"unknown latency {key!r}")


def summarize(results: list[RequestResult], slo: SLO = SLO()) -> dict:
    """Everything a report needs about one load level, as plain JSON-able values."""
    sent = [r for r in results if not math.isnan(r.sent_at)]
    done = [r for r in results if r.ok]
    start = min((r.sent_at for r in sent), default=0.0)
    end = max((r.finished_at for r in sent), default=0.0)
    duration = end - start
    per_second = (lambda x: x / duration) if duration > 0 else (lambda x: math.nan)
    output_tokens = sum(r.output_tokens for r in done)
    prompt_tokens = sum(r.prompt_tokens if r.prompt_tokens is not None else r.prompt_len for r in done)
    summary = {
        "requests": len(results),
        "completed": len(done),
        "failed": len(results) - len(done),
        "errors": dict(Counter(r.error for r in results if not r.ok)),
        "duration_s": duration,
        "prompt_tokens": prompt_tokens,
        "output_tokens": output_tokens,
        "request_throughput": per_second(len(done)),
        "output_throughput": per_second(output_tokens),
        "total_token_throughput": per_second(output_tokens + prompt_tokens),
        "peak_concurrency": peak_concurrency(results),
        **{f"{key}_ms": distribution(latency_samples(results, key), 1000) for key in LATENCY_KEYS},
        "client_queue_ms": distribution([r.sent_at - r.scheduled_at for r in sent], 1000),
    }
    if not slo.empty:
        good = sum(slo.met_by(r) for r in results)
        summary["goodput"] = {"slo_ms": {k: v * 1000 for k, v in vars(slo).items() if v is not None},
                              "good_requests": good, "request_goodput": per_second(good)}
    return summary
