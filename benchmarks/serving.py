"""Serving benchmark: start miras-serve on loopback, sweep concurrency, then overload it at twice its capacity.

    python -m benchmarks.serving --model moneta-tiny [--out DIR]

writes ``serving-cpu.md`` and its plots (``serving-cpu/``) into ``--out`` (default docs/benchmarks/) with the
machine, date and commit. Capacity is the
best request throughput of the sweep; the overload run sends Poisson arrivals at twice that rate in
correctness mode, so every request must complete with its tokens or get a clean 429, and the server's
metrics must agree with the client.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

import httpx

from benchmarks import report
from deploy.local.launch import miras_serve
from miras_serve.loadtest.cli import run_cli
from miras_serve.loadtest.correctness import scrape
from miras_serve.models.checkpoint import resolve


def load_average() -> str:
    return " / ".join(f"{x:.1f}" for x in os.getloadavg())


async def server_metrics(url: str) -> dict[str, float]:
    async with httpx.AsyncClient(timeout=10) as client:
        return await scrape(client, url, "miras:")


def run_phase(url: str, out: Path, common: list[str], extra: list[str]) -> tuple[int, dict]:
    status = run_cli(["--base-url", url, "--result-dir", str(out), *common, *extra])
    if status == 2:
        raise RuntimeError("miras-loadtest could not run")
    return status, json.loads((out / "results.json").read_text())


def p50_p99(distribution: dict) -> str:
    return "-" if distribution["p50"] is None else f"{distribution['p50']:.0f} / {distribution['p99']:.0f}"


def table(levels: list[dict]) -> list[str]:
    rows = ["| load | done | errors | req/s | output tok/s | TTFT p50 / p99 ms | TPOT p50 / p99 ms "
            "| ITL p50 / p99 ms | E2E p50 / p99 ms |", "|---|---|---|---|---|---|---|---|---|"]
    for level in levels:
        s = level["summary"]
        errors = ", ".join(f"{k} {v}" for k, v in sorted(s["errors"].items())) or "0"
        latencies = " | ".join(p50_p99(s[f"{key}_ms"]) for key in ("ttft", "tpot", "itl", "e2el"))
        rows.append(f"| {level['label']} | {s['completed']} | {errors} | {s['request_throughput']:.2f} "
                    f"| {s['output_throughput']:.1f} | {latencies} |")
    return rows


def findings(levels: list[dict]) -> list[str]:
    """The sweep's shape in numbers: where throughput peaks and what the largest concurrency costs."""
    best = max(levels, key=lambda level: level["summary"]["request_throughput"])
    first, last = levels[0], levels[-1]
    peak = best["summary"]["request_throughput"]
    return [
        f"- Peak: {peak:.2f} req/s ({best['summary']['output_throughput']:.0f} output tok/s) at "
        f"{best['label']}, {peak / first['summary']['request_throughput']:.1f}x {first['label']}.",
        f"- At {last['label']}: {last['summary']['request_throughput'] / peak:.0%} of the peak throughput; "
        f"TPOT p50 {last['summary']['tpot_ms']['p50']:.0f} ms vs {first['summary']['tpot_ms']['p50']:.0f} ms at "
        f"{first['label']}.",
    ]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", required=True, help="shipped model name or checkpoint directory")
    p.add_argument("--model-note", default="", help="what the model is, for the report")
    p.add_argument("--note", default="", help="conditions worth knowing (other load on the machine, ...)")
    report.add_out_argument(p)
    p.add_argument("--name", default="serving-cpu")
    p.add_argument("--concurrency", default="1,2,4,8,16,32,64")
    p.add_argument("--duration", type=float, default=20.0, help="seconds per sweep level")
    p.add_argument("--input-len", default="uniform:32:256")
    p.add_argument("--output-len", default="fixed:64")
    p.add_argument("--overload-requests", type=int, default=400)
    p.add_argument("--server-flags", default="--max-queued-requests 64",
                   help="extra miras-serve flags, space separated (default: a queue small enough to overflow)")
    args = p.parse_args(argv)

    # Runs write to a scratch directory; only the kept files reach the docs, and only after a complete run.
    scratch = Path(tempfile.mkdtemp(prefix="miras-serving-benchmark-"))
    common = ["--tokenizer", str(resolve(args.model)), "--input-len", args.input_len, "--output-len", args.output_len,
              "--ignore-eos", "--no-progress", "--num-warmups", "4"]
    started = time.monotonic()
    loads = {"before": load_average()}
    with miras_serve(args.model, *args.server_flags.split(), threads=None, log=scratch / "server.log") as server:
        sweep_status, sweep = run_phase(server.url, scratch / "sweep", common,
                                        ["--sweep", f"concurrency:{args.concurrency}", "--duration",
                                         str(args.duration), "--title", "Concurrency sweep"])
        capacity = max(level["summary"]["request_throughput"] for level in sweep["levels"])
        rate = 2 * capacity
        check_status, overload = run_phase(server.url, scratch / "overload", common,
                                           ["--request-rate", f"{rate:.3f}", "--num-requests",
                                            str(args.overload_requests), "--max-concurrency", "2048", "--check",
                                            "--title", "Overload at twice capacity"])
        metrics = asyncio.run(server_metrics(server.url))
    loads["after"] = load_average()
    elapsed = time.monotonic() - started
    work = args.out / args.name
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    for phase, data in (("sweep", sweep), ("overload", overload)):
        # Keep plots and summaries; the per-request results run to megabytes.
        for kept in [*(scratch / phase).glob("*.png"), scratch / phase / "summary.md"]:
            shutil.move(kept, work / f"{phase}-{kept.name}")
        summaries = {"meta": data["meta"], "levels": [{k: v for k, v in level.items() if k != "results"}
                                                      for level in data["levels"]]}
        (work / f"{phase}-summary.json").write_text(json.dumps(summaries, indent=1))
    shutil.rmtree(scratch)

    level = overload["levels"][0]
    check = level["check"]
    s = level["summary"]
    lines = [
        *report.header(
            "Serving benchmark on CPU", __spec__.name, argv,
            f"load average (1/5/15 min) before {loads['before']}, after {loads['after']}; {elapsed / 60:.1f} min",
            f"model: `{Path(args.model).name if Path(args.model).is_dir() else args.model}` {args.model_note}".rstrip(),
            f"server: `miras-serve` defaults{' + ' + args.server_flags if args.server_flags else ''} "
            f"(server version {sweep['meta']['server version']}), client and server on the same machine; "
            f"{metrics.get('miras:state_slots_capacity', 0):g} state slots of "
            f"{metrics.get('miras:state_bytes_per_sequence', 0) / 1024:.0f} KiB each (constant in context length)",
            *([f"conditions: {args.note}"] if args.note else []),
            f"workload: `/v1/completions` streamed, prompts `{args.input_len}` tokens of synthetic text, "
            f"`{args.output_len}` output tokens with `ignore_eos`, greedy"),
        f"## Concurrency sweep ({args.duration:g} s per level, closed loop)",
        "",
        *table(sweep["levels"]),
        "",
        f"![throughput and latency vs concurrency]({args.name}/sweep-sweep.png)",
        "",
        f"![latency CDFs]({args.name}/sweep-latency_cdf.png)",
        "",
        *findings(sweep["levels"]),
        "",
        f"## Overload: Poisson arrivals at twice capacity ({rate:.2f} req/s = 2 x {capacity:.2f})",
        "",
        f"{s['requests']} requests in correctness mode (`--check`): each must complete with exactly its "
        f"{args.output_len.split(':')[-1]} tokens or get a clean 429/503, then the server must be healthy and "
        "idle and its `/metrics` must match the client's counts.",
        "",
        *table(overload["levels"]),
        "",
        f"Verdict: **{'nothing lost' if check['passed'] else 'FAILED'}**: "
        f"{check['facts']['completed']} completed, {check['facts']['cleanly_rejected']} cleanly rejected, "
        f"{check['facts']['lost']} lost; server counters: "
        + ", ".join(f"{k.removeprefix('server_').removesuffix('_delta')} +{v:g}"
                    for k, v in check["facts"].items() if k.startswith("server_")) + ".",
        *[f"- problem: {problem}" for problem in check["problems"]],
        "",
        f"![overload latency CDFs]({args.name}/overload-latency_cdf.png)",
        "",
        f"Under overload the server completed {s['request_throughput']:.2f} req/s, "
        f"{s['request_throughput'] / capacity:.0%} of the sweep's best; the rest were refused at once with 429.",
        "",
        f"Full `miras-loadtest` summaries (p50/p90/p99, errors): `{args.name}/sweep-summary.md`, "
        f"`{args.name}/overload-summary.md`, and as JSON `{args.name}/*-summary.json`.",
    ]
    print("\n".join(lines))
    report.write(args.out, f"{args.name}.md", lines)
    return 0 if sweep_status == 0 and check_status == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
