"""Correctness mode: nothing lost under load, the server idle and healthy afterwards, its metrics in agreement.

Compares the server's Prometheus counters before and after the run with what the client saw, so the server
must serve no other traffic meanwhile.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, field

import httpx
from prometheus_client.parser import text_string_to_metric_families

from miras_serve.loadtest.stats import RequestResult


async def scrape(client: httpx.AsyncClient, base_url: str, prefix: str) -> dict[str, float]:
    """Samples of metrics named ``prefix*``, summed over their labels, keyed by sample name
    (``miras:request_success_total``, ``miras:num_requests_running``, ...)."""
    response = await client.get(base_url.rstrip("/") + "/metrics")
    response.raise_for_status()
    totals: dict[str, float] = {}
    for family in text_string_to_metric_families(response.text):
        for sample in family.samples:
            if sample.name.startswith(prefix) and not sample.name.endswith(("_bucket", "_created")):
                totals[sample.name] = totals.get(sample.name, 0.0) + sample.value
    return totals


async def wait_until_idle(client: httpx.AsyncClient, base_url: str, prefix: str,
                          timeout: float = 10.0) -> tuple[int, dict[str, float]]:
    """Poll until /health is 200 and nothing runs or waits (the gauges trail the last [DONE] a little)."""
    deadline = time.monotonic() + timeout
    while True:
        health = (await client.get(base_url.rstrip("/") + "/health")).status_code
        metrics = await scrape(client, base_url, prefix)
        busy = metrics.get(f"{prefix}num_requests_running", 0) + metrics.get(f"{prefix}num_requests_waiting", 0)
        if (health == 200 and busy == 0) or time.monotonic() > deadline:
            return health, metrics
        await asyncio.sleep(0.1)


@dataclass
class CheckReport:
    problems: list[str] = field(default_factory=list)
    facts: dict[str, float | int] = field(default_factory=dict)

    @property
    def passed(self) -> bool:
        return not self.problems


def check_run(results: list[RequestResult], health: int, before: dict[str, float], after: dict[str, float],
              prefix: str) -> CheckReport:
    report = CheckReport()
    done = [r for r in results if r.ok]
    rejected = [r for r in results if r.clean_rejection]
    lost = [r for r in results if not r.ok and not r.clean_rejection]
    for r in lost[:10]:
        report.problems.append(f"request {r.index}: {r.error} {r.error_detail}".strip())
    if len(lost) > 10:
        report.problems.append(f"... and {len(lost) - 10} more requests neither completed nor cleanly rejected")
    if health != 200:
        report.problems.append(f"/health answered {health} after the run")

    def delta(name: str) -> float:
        return after.get(prefix + name, 0.0) - before.get(prefix + name, 0.0)

    expected = {
        "request_success_total": len(done),
        "generation_tokens_total": sum(r.output_tokens for r in done),
        "prompt_tokens_total": sum(r.prompt_tokens or 0 for r in done),
    }
    if any(name.startswith(prefix + "request_rejected") for name in after):
        expected["request_rejected_total"] = len(rejected)
    for name, client_count in expected.items():
        if prefix + name not in after:
            report.problems.append(f"the server exports no {prefix}{name}")
        elif delta(name) != client_count:
            report.problems.append(f"{prefix}{name} rose by {delta(name):g}, the client saw {client_count}")
    for gauge in ("num_requests_running", "num_requests_waiting"):
        if after.get(prefix + gauge, 0) != 0:
            report.problems.append(f"{prefix}{gauge} is {after[prefix + gauge]:g} after the run")
    report.facts = {"requests": len(results), "completed": len(done), "cleanly_rejected": len(rejected),
                    "lost": len(lost), "health": health,
                    **{f"server_{name}_delta": delta(name) for name in expected}}
    return report
