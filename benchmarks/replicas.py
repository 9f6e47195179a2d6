"""Conversations over several replicas: per-turn time to first token and where each turn's state came from,
with conversation-affine routing vs round-robin (and vllm-router, when installed), then with one replica
killed mid-run (SIGKILL): its conversations continue on the others from the shared store.

    python -m benchmarks.replicas                  # make bench-replicas; writes replicas-cpu.md into --out

Every phase starts a fresh stack (Redis, ``--replicas`` replicas, the router) and runs ``--conversations``
conversations of ``--turns`` turns through the Responses API (each turn continues the previous one by
``previous_response_id``, streaming, greedy, ``--max-output-tokens``), ``--concurrency`` conversations at
a time. A turn whose stream breaks (its replica died under it) is sent again, counted as retried; a turn
that fails three times is lost. Where a state came from is read from the replicas' metrics
(``miras:state_tier_hits_total{tier}``): memory (the conversation's own replica), redis (another replica's,
from the shared store), none (recomputed).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import statistics
import time

import httpx
from prometheus_client.parser import text_string_to_metric_families

from benchmarks import report
from deploy.local.replicas import Stack

WORDS = ["king", "queen", "sword", "crown", "night", "love", "death", "honour", "storm", "sea", "ghost", "letter",
         "ring", "father", "daughter", "war", "peace", "castle", "forest", "feast", "wine", "blood", "moon", "star"]


async def turn(http: httpx.AsyncClient, url: str, conversation: str, text: str, previous: str | None,
               max_tokens: int) -> tuple[float, str, int]:
    """One streamed turn: (time to first token, response id, cached tokens); raises if the stream breaks."""
    body = {"input": text, "previous_response_id": previous, "max_output_tokens": max_tokens, "temperature": 0,
            "stream": True}
    start, ttft, done = time.perf_counter(), None, None
    async with http.stream("POST", f"{url}/v1/responses", json=body, headers={"x-session-id": conversation}) as r:
        r.raise_for_status()
        async for line in r.aiter_lines():
            if not line.startswith("data: "):
                continue
            event = json.loads(line[6:])
            if event["type"] == "response.output_text.delta" and ttft is None:
                ttft = time.perf_counter() - start
            elif event["type"] in ("response.completed", "response.incomplete"):
                done = event["response"]
            elif event["type"] in ("response.failed", "error"):
                raise RuntimeError(f"turn failed: {event}")
    if done is None:
        raise RuntimeError("stream ended without a final event")
    return ttft if ttft is not None else time.perf_counter() - start, done["id"], \
        done["usage"]["input_tokens_details"]["cached_tokens"]


async def run_phase(stack: Stack, args: argparse.Namespace, kill_after: int | None) -> dict:
    """Turn by turn: every conversation's turn t (``--concurrency`` at a time), then turn t + 1, so every turn
    runs under the same load and a kill hits conversations in the middle."""
    ttfts: list[list[float]] = [[] for _ in range(args.turns)]
    stats = {"turns": 0, "retried": 0, "lost": 0, "restored": 0}
    rng = random.Random(args.seed)
    names = [f"conv-{args.seed}-{c}-{rng.getrandbits(32):08x}" for c in range(args.conversations)]
    previous: dict[str, str | None] = dict.fromkeys(names)
    semaphore = asyncio.Semaphore(args.concurrency)
    before, gone = tier_hits(stack), {}

    async def one(http: httpx.AsyncClient, name: str, t: int) -> None:
        nonlocal gone
        if name not in previous:  # lost earlier
            return
        text = " ".join(rng.choice(WORDS) for _ in range(6))
        async with semaphore:
            for attempt in range(3):  # bounded: a turn is lost after three failures
                try:
                    ttft, previous[name], cached = await turn(http, stack.url, name, text, previous[name],
                                                              args.max_output_tokens)
                    break
                except (httpx.HTTPError, RuntimeError):
                    if attempt == 2:
                        stats["lost"] += 1
                        del previous[name]
                        return
                    stats["retried"] += 1
                    await asyncio.sleep(0.5)
        ttfts[t].append(ttft)
        stats["turns"] += 1
        stats["restored"] += t > 0 and cached > 0
        if kill_after is not None and stats["turns"] == kill_after:
            gone = tier_hits(stack, only=0)  # what the replica restored before it dies
            stack.kill_replica(0)

    start = time.perf_counter()
    async with httpx.AsyncClient(timeout=httpx.Timeout(300.0), limits=httpx.Limits(max_connections=64)) as http:
        for t in range(args.turns):
            rng.shuffle(names)  # in a fixed order, round robin would send each conversation to the same replica
            await asyncio.gather(*(one(http, name, t) for name in names))
    after = tier_hits(stack)
    hits = {tier: after.get(tier, 0) + gone.get(tier, 0) - before.get(tier, 0) for tier in ("memory", "redis", "disk")}
    wall = time.perf_counter() - start
    return {"ttft": ttfts, "wall": wall, "hits": hits, "overhead": await router_overhead(stack), **stats}


async def router_overhead(stack: Stack, n: int = 200) -> float:
    """Median extra latency (s) of a request through the router over one sent to a replica directly
    (GET /v1/models, alternating, sequential)."""
    direct, routed = [], []
    live = [port for port, proc in zip(stack.replica_ports, stack.replicas, strict=True) if proc.alive()]
    async with httpx.AsyncClient(timeout=30) as http:
        for i in range(n):
            for url, into in ((f"http://127.0.0.1:{live[i % len(live)]}", direct),
                              (stack.url, routed)):
                start = time.perf_counter()
                (await http.get(f"{url}/v1/models", headers={"x-session-id": f"probe-{i}"})).raise_for_status()
                into.append(time.perf_counter() - start)
    return statistics.median(routed) - statistics.median(direct)


def tier_hits(stack: Stack, only: int | None = None) -> dict[str, float]:
    """State restores by tier, summed over the replicas still up (or of replica ``only``)."""
    total: dict[str, float] = {}
    for i, (port, proc) in enumerate(zip(stack.replica_ports, stack.replicas, strict=True)):
        if not proc.alive() or only not in (None, i):
            continue
        text = httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=10).text
        for family in text_string_to_metric_families(text):
            for s in family.samples:
                if s.name == "miras:state_tier_hits_total":
                    total[s.labels["tier"]] = total.get(s.labels["tier"], 0) + s.value
    return total


def ms(xs: list[float]) -> str:
    return f"{1000 * statistics.median(xs):.0f}" if xs else "-"


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser("python -m benchmarks.replicas", description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="moneta-tiny")
    p.add_argument("--replicas", type=int, default=3)
    p.add_argument("--conversations", type=int, default=32)
    p.add_argument("--turns", type=int, default=8)
    p.add_argument("--concurrency", type=int, default=6)
    p.add_argument("--max-output-tokens", type=int, default=8)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--routers", nargs="+", default=["nginx", "vllm-router"])
    report.add_out_argument(p)
    args = p.parse_args(argv)
    if not (1 <= args.conversations <= 256 and 1 <= args.turns <= 64 and 1 <= args.concurrency <= 64):
        p.error("conversations 1-256, turns 1-64, concurrency 1-64")
    phases = [("nginx", "session", None, "nginx, hash on x-session-id (affine)"),
              ("nginx", "round-robin", None, "nginx, round robin")]
    if "vllm-router" in args.routers:
        phases.append(("vllm-router", "session", None, "vllm-router, consistent_hash on x-session-id"))
    phases.append(("nginx", "session", args.conversations * args.turns // 2 + args.conversations // 2,
                   f"nginx affine, replica 0 killed (SIGKILL) during turn {args.turns // 2 + 1}"))
    results = []
    for router, policy, kill_after, label in phases:
        try:
            with Stack(args.model, args.replicas, router=router, policy=policy) as stack:
                result = asyncio.run(run_phase(stack, args, kill_after))
        except RuntimeError as exc:  # e.g. vllm-router not installed
            print(f"skipped {label}: {exc}")
            continue
        result["label"] = label
        results.append(result)
        print(f"{label}: {result['turns']} turns in {result['wall']:.0f} s, per-turn TTFT ms "
              f"{[ms(x) for x in result['ttft']]}, hits {result['hits']}, retried {result['retried']}, "
              f"lost {result['lost']}, router overhead {1000 * result['overhead']:.2f} ms")
    write_report(args, argv, results)


def write_report(args: argparse.Namespace, argv: list[str] | None, results: list[dict]) -> None:
    header = "| routing | " + " | ".join(f"turn {t + 1}" for t in range(args.turns)) + \
        " | restored from memory / shared store / recomputed (turns 2+) | retried | lost | wall s | router ms |"
    lines = [
        *report.header("Many replicas: conversation-affine routing and the shared store (CPU)", __spec__.name, argv),
        f"{args.replicas} replicas of {args.model} on CPU (one thread each), Redis, a router; "
        f"{args.conversations} conversations x {args.turns} turns through the Responses API "
        f"(`previous_response_id`, streamed, greedy, {args.max_output_tokens} output tokens), "
        f"{args.concurrency} requests at a time, turn by turn (every conversation's turn t, then turn t + 1). Median "
        "time to first token per turn (ms), over HTTP through the router; every phase on a fresh stack. Router ms: "
        "median extra latency of `GET /v1/models` through the router over a replica directly.",
        "",
        header,
        "|" + "---|" * (args.turns + 6),
    ]
    for r in results:
        restores = args.conversations * (args.turns - 1)
        mem, shared = r["hits"]["memory"], r["hits"]["redis"]
        lines.append(f"| {r['label']} | " + " | ".join(ms(x) for x in r["ttft"]) +
                     f" | {mem / restores:.0%} / {shared / restores:.0%} / "
                     f"{max(0, restores - mem - shared) / restores:.0%} | {r['retried']} | {r['lost']} | "
                     f"{r['wall']:.0f} | {1000 * r['overhead']:.2f} |")
    print("\n".join(lines))
    report.write(args.out, "replicas-cpu.md", lines)


if __name__ == "__main__":
    main()
