"""The server's own work per streamed token, this tree against a baseline revision side by side in one run:

1. the engine step's host work (the step minus the model call; its sampler part) at batch 1 (the compiled
   step the server runs) and 32, moneta-tiny, one torch thread, CPU time of the engine thread;
2. the event loop's work per streamed token: serialising a plain text chunk and passing it through the
   SSE ping wrapper, CPU time;
3. over HTTP: both servers (the default CLI, compiled batch-1 step) up at once and loaded in turn by the same
   client (``miras-loadtest``, 128-token prompts, 128 greedy tokens): ITL at concurrency 1 and output tokens/s
   at concurrency 8 and 32, each the best of ``--repeats`` alternating runs.

    python -m benchmarks.server_overhead [--baseline REV] [--repeats 2] [--out DIR]

Each tree runs from an import root of its own (a ``miras_serve`` folder linking its top-level folders), so the
baseline is measured by its own code; parts 1 and 2 run in worker processes of each tree, this file copied in.
Writes ``server-overhead-cpu.md``. Timings on a shared machine are noisy: compare the two trees' columns, which
were measured minutes apart under the load average the report gives.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

from benchmarks import report
from benchmarks.trees import export, import_root, run_worker

ENGINE_BATCHES = (1, 32)


# ---- workers (run inside one tree's import root) ----------------------------------------------------------


def engine_host(batch: int, steps: int) -> dict[str, float]:
    """CPU ms per decode step of the engine thread: the whole step, the model call, and the sampler."""
    import torch

    from miras_serve import models
    from miras_serve.server.engine import EngineConfig, LLMEngine
    from miras_serve.server.sampling_params import SamplingParams

    torch.set_num_threads(1)
    net, tokenizer = models.load_pretrained("moneta-tiny")
    engine = LLMEngine(net, tokenizer, EngineConfig(max_num_seqs=max(batch, 2), compiled_steps=True))
    params = SamplingParams(temperature=0.0, max_tokens=100_000, ignore_eos=True)
    for i in range(batch):
        engine.add_request(str(i), list(range(5, 5 + 128)), params)
    seconds = {"model": 0.0, "sampler": 0.0}

    def timed(name: str, fn):
        def call(*args, **kwargs):
            start = time.thread_time()
            try:
                return fn(*args, **kwargs)
            finally:
                seconds[name] += time.thread_time() - start
        return call

    # every decode goes through the decode steps (compiled up to their batch limit, padded eager above); the
    # model itself is not wrapped, which would break the compiled graph
    engine.decode_graphs.run = timed("model", engine.decode_graphs.run)
    engine.sampler.sample = timed("sampler", engine.sampler.sample)
    for _ in range(20):  # prefill, compile, warm up
        engine.step()
    totals = {"step": [], "model": [], "sampler": []}
    for _ in range(steps):
        before = dict(seconds)
        start = time.thread_time()
        engine.step()
        totals["step"].append(time.thread_time() - start)
        for name in seconds:
            totals[name].append(seconds[name] - before[name])
    result = {name: statistics.median(values) * 1e3 for name, values in totals.items()}
    result["host"] = statistics.median(s - m for s, m in zip(totals["step"], totals["model"], strict=True)) * 1e3
    return result


def event_loop(events: int) -> dict[str, float]:
    """CPU µs per streamed token: serialising a plain text chunk, and the SSE ping wrapper passing it on."""
    from miras_serve.server import serving_base
    from miras_serve.server.protocol import CompletionChoice, CompletionResponse
    from miras_serve.server.serving_base import sse, with_pings

    meta = dict(id="cmpl-0123456789abcdef0123456789abcdef", object="text_completion", created=1764486000,
                model="moneta-tiny")
    if hasattr(serving_base, "TextChunks"):
        chunks = serving_base.TextChunks(CompletionResponse, meta)
        serialise = lambda text: chunks.completion(3, text, None, None)  # noqa: E731
    else:
        def serialise(text: str) -> str:
            choice = CompletionChoice(index=0, text=text, logprobs=None, finish_reason=None, stop_reason=None)
            choice.index = 3
            return sse(CompletionResponse(**meta, choices=[choice]))
    start = time.thread_time()
    for _ in range(events):
        serialise(" hello")
    chunk = (time.thread_time() - start) / events * 1e6

    async def source():
        queue: asyncio.Queue = asyncio.Queue()
        for _ in range(events):
            queue.put_nowait("data: x\n\n")
        for _ in range(events):
            yield await queue.get()

    async def drain() -> float:
        start = time.thread_time()
        async for _ in with_pings(source(), 30.0):
            pass
        return (time.thread_time() - start) / events * 1e6

    return {"chunk_us": chunk, "pings_us": asyncio.run(drain())}


# ---- HTTP ------------------------------------------------------------------------------------------------


def start_server(root: Path, log: Path):
    from deploy.local.launch import STARTUP_TIMEOUT, empty_workdir, serve_command
    from miras_serve.loadtest.process import ServerProcess, free_port

    port = free_port()
    env = {k: v for k, v in os.environ.items() if k != "OMP_NUM_THREADS"}  # the CLI's own thread default
    env["PYTHONPATH"] = str(root)
    return ServerProcess(serve_command("moneta-tiny", port), url=f"http://127.0.0.1:{port}", env=env,
                         cwd=empty_workdir(), log=log,
                         timeout=STARTUP_TIMEOUT)


def load(url: str, out: Path, clients: int, requests: int) -> dict:
    from miras_serve.loadtest.cli import run_cli

    status = run_cli(["--base-url", url, "--result-dir", str(out), "--concurrency", str(clients), "--num-requests",
                      str(requests), "--input-len", "fixed:128", "--output-len", "fixed:128", "--ignore-eos",
                      "--num-warmups", "1", "--no-progress"])
    if status == 2:
        raise RuntimeError("miras-loadtest could not run")
    return json.loads((out / "results.json").read_text())["levels"][0]["summary"]


def http_side_by_side(roots: dict[str, Path], work: Path, repeats: int, levels: list[int]
                      ) -> dict[str, dict[str, list[dict]]]:
    """Every run's summary, by load label and tree, in order (the trees alternate, run after run)."""
    servers = {name: start_server(root, work / f"{name}-server.log") for name, root in roots.items()}
    loads = [load_of(clients) for clients in levels]
    try:
        for name, server in servers.items():  # compile the batch-1 step, warm every path once
            for _, clients, _ in loads:
                load(server.url, work / f"warm-{name}-{clients}", clients, clients)
        runs: dict[str, dict[str, list[dict]]] = {label: {name: [] for name in roots} for label, _, _ in loads}
        for repeat in range(repeats):
            for label, clients, requests in loads:
                for name, server in servers.items():
                    s = load(server.url, work / f"{name}-{clients}-{repeat}", clients, requests)
                    s["load_average"] = os.getloadavg()[0]
                    print(name, label, f"ITL p50 {s['itl_ms']['p50']:.2f} ms, {s['output_throughput']:.0f} tok/s, "
                          f"load {s['load_average']:.1f}", flush=True)
                    runs[label][name].append(s)
        return runs
    finally:
        for server in servers.values():
            server.stop()


def load_of(clients: int) -> tuple[str, int, int]:
    """(label, clients, requests) of a closed-loop run: 8 requests alone, else enough for two waves or more."""
    return f"concurrency {clients}", clients, 8 if clients == 1 else max(2 * clients, 24)


# ---- report ----------------------------------------------------------------------------------------------


def engine_section(engine: dict[int, dict[str, dict]]) -> list[str]:
    return ["## Engine thread: host work per decode step", "",
            "CPU ms of the engine thread per step (medians of `--steps` steps, one torch thread, the state cache "
            "on as the server runs it): host = the step minus the model call (scheduling, building the inputs, "
            "sampling, detokenising, stop checks, metrics, deltas). Batch 1 runs the compiled step, batch 32 the "
            "eager one (ENGINE_COMPILE_MAX_BATCH). Every row greedy. Each row: the run with the least host time.",
            "", *report.table(["batch", "tree", "step ms", "model ms", "host ms", "sampler ms"],
                              [(b, name, *(f"{r[k]:.3f}" for k in ("step", "model", "host", "sampler")))
                               for b, by_tree in engine.items() for name, r in by_tree.items()]),
            "", *report.table(["batch", "host: baseline / current", "sampler: baseline / current"],
                              [(b, f"{t['baseline']['host'] / t['current']['host']:.2f}x",
                                f"{t['baseline']['sampler'] / t['current']['sampler']:.2f}x")
                               for b, t in engine.items()]), ""]


def loop_section(loop: dict[str, dict]) -> list[str]:
    return ["## Event loop: work per streamed token", "",
            "CPU µs per event: a plain text completion chunk serialised as its SSE event, and one event passed "
            "through the SSE ping wrapper (30 s interval).", "",
            *report.table(["tree", "chunk µs", "ping wrapper µs", "sum µs"],
                          [(name, f"{r['chunk_us']:.1f}", f"{r['pings_us']:.1f}",
                            f"{r['chunk_us'] + r['pings_us']:.1f}") for name, r in loop.items()]), ""]


def http_section(runs: dict[str, dict[str, list[dict]]], repeats: int) -> list[str]:
    rows, ratios = [], []
    for label, by_tree in runs.items():
        for name, summaries in by_tree.items():
            itl = [s["itl_ms"]["p50"] for s in summaries]
            rate = [s["output_throughput"] for s in summaries]
            loads = [s["load_average"] for s in summaries]
            rows.append((label, name, f"{min(itl):.2f}", f"{statistics.median(itl):.2f}", f"{max(rate):.0f}",
                         f"{statistics.median(rate):.0f}", f"{min(loads):.1f}-{max(loads):.1f}"))
        pairs = list(zip(by_tree["baseline"], by_tree["current"], strict=True))
        ratios.append((label, f"{statistics.median(b['itl_ms']['p50'] / c['itl_ms']['p50'] for b, c in pairs):.2f}x",
                       f"{statistics.median(c['output_throughput'] / b['output_throughput'] for b, c in pairs):.2f}x"))
    return ["## Over HTTP, both servers up, loaded in turn by the same client", "",
            f"{repeats} runs per tree and load, the two servers' runs back to back, alternating; streamed "
            "completions, 128-token prompts, 128 greedy tokens (ignore_eos), the CLI's defaults (compiled batch-1 "
            "step, one torch thread on 2 cores). Load average: the machine's after each run (its range).", "",
            *report.table(["load", "tree", "ITL p50 ms best", "ITL p50 ms median", "output tok/s best",
                           "output tok/s median", "load avg"], rows),
            "", "Ratios: the median over the back-to-back pairs of runs.", "",
            *report.table(["load", "ITL p50: baseline / current", "tokens/s: current / baseline"], ratios), ""]


def measure_engines(roots: dict[str, Path], repeats: int, steps: int) -> dict[int, dict[str, dict]]:
    engine: dict[int, dict[str, dict]] = {}
    for _ in range(repeats):
        for name, root in roots.items():
            for batch in ENGINE_BATCHES:
                r = run_worker(root, __spec__.name, "engine", str(batch), str(steps))
                print(name, "engine batch", batch, r, flush=True)
                kept = engine.setdefault(batch, {}).get(name)
                if kept is None or r["host"] < kept["host"]:  # other load only ever adds time
                    engine[batch][name] = r
    return engine


def measure_loops(roots: dict[str, Path], repeats: int) -> dict[str, dict]:
    loop: dict[str, dict] = {}
    for _ in range(repeats):
        for name, root in roots.items():
            r = run_worker(root, __spec__.name, "loop", "20000")
            print(name, "event loop", r, flush=True)
            if name not in loop or sum(r.values()) < sum(loop[name].values()):
                loop[name] = r
    return loop


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] == "--worker":
        kind, *rest = argv[1:]
        result = engine_host(int(rest[0]), int(rest[1])) if kind == "engine" else event_loop(int(rest[0]))
        print(json.dumps(result))
        return
    p = argparse.ArgumentParser("python -m benchmarks.server_overhead", description=__doc__.split("\n\n")[0])
    p.add_argument("--baseline", default="08d8478", help="git revision to compare with (default: before issue 19's "
                   "server work)")
    p.add_argument("--repeats", type=int, default=2, help="alternating runs of each measurement; the best is kept")
    p.add_argument("--steps", type=int, default=100, help="timed engine steps per worker")
    p.add_argument("--concurrency", default="1,8,32", help="the HTTP loads: concurrency levels (default %(default)s)")
    p.add_argument("--http-only", action="store_true", help="skip the engine and event-loop parts")
    report.add_out_argument(p)
    args = p.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        roots = {"baseline": import_root(export(args.baseline, work / "baseline-tree"), work / "baseline"),
                 "current": import_root(report.CHECKOUT, work / "current")}
        base = f"`{args.baseline}` (`{report.git('rev-parse', '--short', args.baseline)}`)"
        lines = report.header("The server's work per streamed token on CPU", __spec__.name, argv,
                              f"baseline {base} against this tree; moneta-tiny (random weights as shipped), fp32")
        if not args.http_only:
            lines += engine_section(measure_engines(roots, args.repeats, args.steps))
            lines += loop_section(measure_loops(roots, args.repeats))
        levels = [int(c) for c in args.concurrency.split(",")]
        lines += http_section(http_side_by_side(roots, work, args.repeats, levels), args.repeats)
    print("\n".join(lines))
    report.write(args.out, "server-overhead-cpu.md", lines)


if __name__ == "__main__":
    main()
