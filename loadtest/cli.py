"""Command line: ``miras-loadtest`` / ``python -m loadtest``."""

from __future__ import annotations

import argparse
import asyncio
import datetime
import os
import platform
import sys
from pathlib import Path

import httpx

from miras_serve.loadtest.client import ENDPOINTS, ApiConfig, new_client
from miras_serve.loadtest.correctness import check_run, wait_until_idle
from miras_serve.loadtest.report import markdown, plot_latency_cdfs, plot_sweep, write_json
from miras_serve.loadtest.runner import Load, run_load
from miras_serve.loadtest.stats import SLO, summarize
from miras_serve.loadtest.workload import LengthDist, Workload, load_tokenizer, read_corpus, synthetic_corpus

DEFAULT_NUM_REQUESTS = 100
LEVEL_INDEX_STRIDE = 1_000_000  # each level sends its own prompts, so no level profits from another's cache


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="miras-loadtest", description="Load-test an OpenAI-compatible streaming server: latency (TTFT, ITL, "
        "TPOT, E2E), throughput, goodput, errors; --check verifies nothing is lost under overload.")
    server = p.add_argument_group("server")
    server.add_argument("--base-url", default="http://127.0.0.1:8000", help="server root (default %(default)s)")
    server.add_argument("--endpoint", choices=sorted(ENDPOINTS), default="completions",
                        help="/v1/completions or /v1/chat/completions (default %(default)s)")
    server.add_argument("--model", help="model name to send (default: the first of GET /v1/models)")
    server.add_argument("--api-key", default=os.environ.get("MIRAS_API_KEY") or os.environ.get("OPENAI_API_KEY"),
                        help="bearer key (default: env MIRAS_API_KEY or OPENAI_API_KEY)")
    server.add_argument("--request-timeout", type=float, default=600.0, help="seconds per request (default 600)")
    load = p.add_argument_group("load (always bounded by --num-requests and/or --duration)")
    load.add_argument("--concurrency", type=int, help="closed loop: this many requests in flight (default 8)")
    load.add_argument("--request-rate", type=float, help="open loop: Poisson arrivals at this many requests/s")
    load.add_argument("--max-concurrency", type=int, default=256,
                      help="open loop: most requests in flight; later arrivals wait in the client (default 256)")
    load.add_argument("--sweep", metavar="AXIS:V1,V2,...",
                      help="one run per value, e.g. concurrency:1,2,4,8 or rate:0.5,1,2")
    load.add_argument("--num-requests", type=int, help=f"requests per run (default {DEFAULT_NUM_REQUESTS} when "
                      "no --duration)")
    load.add_argument("--duration", type=float, help="seconds per run: no request starts after it")
    load.add_argument("--num-warmups", type=int, default=1, help="unmeasured requests first (default 1)")
    work = p.add_argument_group("workload")
    work.add_argument("--input-len", default="fixed:128", help="prompt tokens: fixed:N, uniform:LOW:HIGH or "
                      "corpus[:MAX] (default %(default)s)")
    work.add_argument("--output-len", default="fixed:64", help="max_tokens, same forms (default %(default)s)")
    work.add_argument("--corpus", help="text file (paragraphs) or JSON list of strings to take prompts from "
                      "(default: synthetic plain-word text)")
    work.add_argument("--tokenizer", help="tokenizer.json or a model directory holding one, to cut "
                      "prompts to exact token counts (default: whitespace words)")
    work.add_argument("--ignore-eos", action="store_true", help="ask for exactly max_tokens (vLLM extension)")
    work.add_argument("--temperature", type=float, default=0.0)
    work.add_argument("--seed", type=int, default=0)
    out = p.add_argument_group("measurement and output")
    out.add_argument("--goodput", nargs="+", metavar="SLO:MS", default=[],
                     help="SLOs for goodput in ms, e.g. ttft:500 tpot:50 e2el:5000")
    out.add_argument("--check", action="store_true", help="correctness mode (implies --ignore-eos): every "
                     "request completes with its max_tokens or gets a clean 429/503; afterwards the server is "
                     "healthy and idle and its metrics match the client's counts. Exit status 1 if not")
    out.add_argument("--metrics-prefix", default="miras:", help="server metric prefix for --check (vllm: works too)")
    out.add_argument("--result-dir", type=Path, help="write results.json, summary.md and PNG plots here")
    out.add_argument("--title", default="Load test", help="report title")
    out.add_argument("--meta", nargs="+", metavar="KEY=VALUE", default=[], help="extra lines for the report")
    out.add_argument("--no-progress", action="store_true", help="no progress bar on stderr")
    return p


def parse_sweep(spec: str) -> tuple[str, list[float]]:
    axis, _, values = spec.partition(":")
    if axis not in ("concurrency", "rate") or not values:
        raise ValueError(f"--sweep {spec!r}: use concurrency:1,2,4 or rate:0.5,1,2")
    try:
        numbers = [float(v) for v in values.split(",")]
    except ValueError:
        raise ValueError(f"--sweep {spec!r}: values must be numbers") from None
    if any(n <= 0 for n in numbers) or (axis == "concurrency" and any(n != int(n) for n in numbers)):
        raise ValueError(f"--sweep {spec!r}: values must be positive (whole numbers for concurrency)")
    return axis, numbers


def plan_loads(args: argparse.Namespace) -> tuple[str, list[Load]]:
    """The load levels to run, and the axis they vary along."""
    if args.concurrency is not None and args.request_rate is not None:
        raise ValueError("give --concurrency or --request-rate, not both")
    for name in ("concurrency", "max_concurrency", "num_requests"):
        value = getattr(args, name)
        if value is not None and value < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be at least 1")
    if args.duration is not None and args.duration <= 0:
        raise ValueError("--duration must be positive")
    if args.request_rate is not None and args.request_rate <= 0:
        raise ValueError("--request-rate must be positive")
    bound = {"num_requests": args.num_requests, "duration": args.duration}
    if args.num_requests is None and args.duration is None:
        bound["num_requests"] = DEFAULT_NUM_REQUESTS
    if args.sweep:
        axis, values = parse_sweep(args.sweep)
        if axis == "concurrency":
            return axis, [Load(concurrency=int(v), **bound) for v in values]
        return axis, [Load(rate=v, max_concurrency=args.max_concurrency, **bound) for v in values]
    if args.request_rate is not None:
        return "rate", [Load(rate=args.request_rate, max_concurrency=args.max_concurrency, **bound)]
    return "concurrency", [Load(concurrency=args.concurrency or 8, **bound)]


async def discover_model(client: httpx.AsyncClient, api_base: str, headers: dict[str, str]) -> str:
    response = await client.get(api_base.rstrip("/") + "/v1/models", headers=headers)
    response.raise_for_status()
    return response.json()["data"][0]["id"]


def server_version(response: httpx.Response) -> str:
    """/version's {"version": ...} where the server has one (ours and vLLM do), else "unknown"."""
    try:
        return str(response.json()["version"]) if response.status_code == 200 else "unknown"
    except (ValueError, KeyError, TypeError):
        return "unknown"


async def run(args: argparse.Namespace, axis: str, loads: list[Load], workload: Workload) -> tuple[dict, list]:
    async with new_client(30.0) as probe:
        headers = {"Authorization": f"Bearer {args.api_key}"} if args.api_key else {}
        model = args.model or await discover_model(probe, args.base_url, headers)
        api = ApiConfig(args.base_url, model, args.endpoint, args.api_key, args.ignore_eos or args.check,
                        args.temperature)
        if args.num_warmups:
            warm = await run_load(api, workload, Load(concurrency=1, num_requests=args.num_warmups), seed=args.seed,
                                  timeout=args.request_timeout, first_index=len(loads) * LEVEL_INDEX_STRIDE,
                                  progress=False)
            failed = [r for r in warm if not r.ok]
            if failed:
                raise RuntimeError(f"warm-up request failed: {failed[0].error} {failed[0].error_detail}")
        levels = []
        for number, load in enumerate(loads):
            before = (await wait_until_idle(probe, args.base_url, args.metrics_prefix))[1] if args.check else None
            results = await run_load(api, workload, load, seed=args.seed + number, check=args.check,
                                     timeout=args.request_timeout, first_index=number * LEVEL_INDEX_STRIDE,
                                     progress=not args.no_progress)
            level = {"label": load.label, "load": {"concurrency": load.concurrency, "rate": load.rate,
                                                   "max_concurrency": load.max_concurrency,
                                                   "num_requests": load.num_requests, "duration": load.duration},
                     "summary": summarize(results, SLO.parse(args.goodput)), "results": results}
            if args.check:
                health, after = await wait_until_idle(probe, args.base_url, args.metrics_prefix)
                report = check_run(results, health, before, after, args.metrics_prefix)
                level["check"] = {"passed": report.passed, "problems": report.problems, "facts": report.facts}
            levels.append(level)
        version = await probe.get(args.base_url.rstrip("/") + "/version")
    meta = {"title": args.title, "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
            "server": args.base_url, "server version": server_version(version),
            "model": model, "endpoint": ENDPOINTS[args.endpoint], "input length": args.input_len,
            "output length": args.output_len, "ignore_eos": api.ignore_eos,
            "corpus": args.corpus or "synthetic words", "tokenizer": args.tokenizer or "whitespace words",
            "client machine": f"{platform.node()} ({os.cpu_count()} CPUs, Python {platform.python_version()})",
            **dict(item.split("=", 1) for item in args.meta), "axis": axis}
    return meta, levels


def run_cli(argv: list[str]) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        axis, loads = plan_loads(args)
        SLO.parse(args.goodput)
        if any("=" not in item for item in args.meta):
            raise ValueError("--meta items are KEY=VALUE")
        corpus = read_corpus(args.corpus) if args.corpus else synthetic_corpus(seed=args.seed)
        workload = Workload(corpus, load_tokenizer(args.tokenizer), LengthDist.parse(args.input_len),
                            LengthDist.parse(args.output_len), args.seed)
    except (ValueError, OSError) as exc:
        parser.error(str(exc))
    try:
        meta, levels = asyncio.run(run(args, axis, loads, workload))
    except (httpx.HTTPError, RuntimeError, KeyError, IndexError) as exc:
        print(f"miras-loadtest: cannot run against {args.base_url}: {type(exc).__name__}: {exc}", file=sys.stderr)
        return 2
    summary = markdown(meta, levels)
    print(summary)
    if args.result_dir:
        args.result_dir.mkdir(parents=True, exist_ok=True)
        write_json(args.result_dir / "results.json", meta, levels)
        (args.result_dir / "summary.md").write_text(summary)
        plot_latency_cdfs(args.result_dir / "latency_cdf.png", levels)
        if len(levels) > 1:
            plot_sweep(args.result_dir / "sweep.png", levels, axis)
    return 1 if any(not level.get("check", {"passed": True})["passed"] for level in levels) else 0
