"""Memory soak: fill the state cache with the states of distinct prompts, several times over, and compare
the process's resident memory with the cache's byte budget, under several allocators.

Each allocator runs in a fresh process (an allocator is chosen when a process starts): the engine
(moneta-tiny, in process, no HTTP) runs on a thread of its own, as the server's does. First a warm-up
with the cache switched off gives the no-cache RSS; then ``--requests`` distinct random prompts (each
leaves two entries: after its prompt and after its reply) fill the cache and keep evicting from it. The
report gives RSS above the no-cache level against the budget (over-budget: the allocator's share), and
the requests per second, side by side.

    python -m benchmarks.memory_soak [--budget-gb 1] [--requests 320] [--prompt-tokens 128] [--allocators ...]

Writes memory-soak-cpu.md into ``--out`` (default docs/benchmarks/). Bounded:
about a minute per allocator on 2 CPU cores, four by default.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import threading
import time
from pathlib import Path

from benchmarks import report

JEMALLOC = "/usr/lib/x86_64-linux-gnu/libjemalloc.so.2"  # Debian's libjemalloc2
# name -> (environment of the worker process, what it is)
ALLOCATORS = {
    "glibc": ({}, "glibc malloc, defaults"),
    "glibc-mmap-128k": ({"MALLOC_MMAP_THRESHOLD_": "131072"},
                        "glibc, mmap threshold fixed at 128 KiB (blocks above it go back to the OS when freed)"),
    "glibc-trim": ({"MALLOC_TRIM_THRESHOLD_": "0", "MALLOC_ARENA_MAX": "2"},
                   "glibc, trim threshold 0 and at most 2 arenas"),
    "jemalloc": ({"LD_PRELOAD": JEMALLOC}, "jemalloc 5 (Debian libjemalloc2, LD_PRELOAD), defaults"),
    "jemalloc-decay": ({"LD_PRELOAD": JEMALLOC, "MALLOC_CONF": "background_thread:true,dirty_decay_ms:1000,"
                        "muzzy_decay_ms:0"},
                       "jemalloc, background thread, dirty pages returned after 1 s"),
}


def rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def cpu_seconds() -> float:
    """CPU time of this process (all threads): unlike wall time, barely moved by other processes' load."""
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def worker(args: argparse.Namespace) -> dict:
    """One allocator's soak, in this process; returns its measurements."""
    import torch

    from miras_serve.server.engine import EngineConfig, LLMEngine
    from miras_serve.server.loader import load_model
    from miras_serve.server.sampling_params import SamplingParams

    torch.set_num_threads(1)
    budget = int(args.budget_gb * (1 << 30))
    model, tokenizer = load_model(args.model)
    engine = LLMEngine(model, tokenizer, EngineConfig(max_num_seqs=8, max_num_batched_tokens=1024,
                                                      state_cache_bytes=budget))
    params = SamplingParams(temperature=0.0, max_tokens=8, ignore_eos=True)
    generator = torch.Generator().manual_seed(0)
    prompts = [torch.randint(3, tokenizer.vocab_size, (args.prompt_tokens,), generator=generator).tolist()
               for _ in range(args.requests + args.warmup)]
    result: dict = {}

    def run(batch: list[list[int]], tag: str) -> None:
        for i, prompt in enumerate(batch):
            engine.add_request(f"{tag}-{i}", prompt, params)
            if (i + 1) % args.concurrency == 0 or i + 1 == len(batch):
                while engine.has_unfinished():
                    engine.step()

    def soak() -> None:  # on a thread of its own, as the server's engine runs
        cache = engine.state_cache
        cache.capacity_bytes = 0  # warm-up: every transient allocation made once, nothing kept
        run(prompts[: args.warmup], "warmup")
        result["baseline_rss"] = rss_bytes()
        cache.capacity_bytes = budget
        samples, start, cpu_start = [], time.perf_counter(), cpu_seconds()
        for i in range(0, args.requests, args.concurrency):
            run(prompts[args.warmup + i: args.warmup + i + args.concurrency], f"soak{i}")
            samples.append(rss_bytes())
        result["seconds"], result["cpu_seconds"] = time.perf_counter() - start, cpu_seconds() - cpu_start
        result["final_rss"], result["peak_rss"] = samples[-1], max(samples)
        result["cache_bytes"], result["entries"] = cache.nbytes, len(cache.entries)
        result["entry_bytes"] = cache.nbytes // max(len(cache.entries), 1)

    thread = threading.Thread(target=soak, name="miras-engine")
    thread.start()
    thread.join()
    result.update(budget=budget, requests=args.requests)
    return result


def run_allocator(name: str, args: argparse.Namespace) -> dict | None:
    env_extra, _ = ALLOCATORS[name]
    if "LD_PRELOAD" in env_extra and not Path(env_extra["LD_PRELOAD"]).exists():
        print(f"{name}: {env_extra['LD_PRELOAD']} not installed, skipped (apt-get install libjemalloc2)")
        return None
    env = {**os.environ, "OMP_NUM_THREADS": "1", **env_extra}
    cmd = [sys.executable, "-m", "benchmarks.memory_soak", "--worker", "--model", args.model, "--budget-gb",
           str(args.budget_gb), "--requests", str(args.requests), "--prompt-tokens", str(args.prompt_tokens),
           "--concurrency", str(args.concurrency), "--warmup", str(args.warmup)]
    out = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600,
                         cwd=report.CHECKOUT)
    if out.returncode != 0:
        raise RuntimeError(f"{name} failed: {out.stderr[-2000:]}")
    result = json.loads(out.stdout.strip().splitlines()[-1])
    over = (result["final_rss"] - result["baseline_rss"]) / result["budget"] - 1
    print(f"{name:>16}: RSS above no-cache {(result['final_rss'] - result['baseline_rss']) / 2**20:8.0f} MiB "
          f"(peak {(result['peak_rss'] - result['baseline_rss']) / 2**20:.0f}) vs budget "
          f"{result['budget'] / 2**20:.0f} MiB: {over:+.1%}; {result['requests'] / result['seconds']:.2f} req/s, "
          f"{result['cpu_seconds'] / result['requests'] * 1e3:.0f} CPU ms/request",
          flush=True)
    return result


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="moneta-tiny")
    p.add_argument("--budget-gb", type=float, default=1.0, help="state-cache budget (--state-cache-gb)")
    p.add_argument("--requests", type=int, default=320, help="distinct prompts sent (each leaves two entries)")
    p.add_argument("--prompt-tokens", type=int, default=128)
    p.add_argument("--concurrency", type=int, default=4, help="requests in flight together")
    p.add_argument("--warmup", type=int, default=8)
    p.add_argument("--allocators", nargs="+", default=["glibc", "glibc-mmap-128k", "glibc-trim", "jemalloc"],
                   choices=list(ALLOCATORS))
    report.add_out_argument(p)
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.worker:
        print(json.dumps(worker(args)))
        return
    results = {name: r for name in args.allocators if (r := run_allocator(name, args)) is not None}
    write_report(args, argv, results)


def write_report(args: argparse.Namespace, argv: list[str] | None, results: dict[str, dict]) -> None:
    any_result = next(iter(results.values()))
    cpu_ms = {name: r["cpu_seconds"] / r["requests"] * 1e3 for name, r in results.items()}
    lines = [
        *report.header(
            "Memory soak: resident memory against the state-cache budget (CPU, in process)", __spec__.name, argv,
            f"1 torch thread; glibc {platform.libc_ver()[1]}",
            f"model `{args.model}`; budget {args.budget_gb:g} GiB (`--state-cache-gb {args.budget_gb:g}`); "
            f"{args.requests} distinct random {args.prompt_tokens}-token prompts, {args.concurrency} at a time, 8 "
            f"tokens each; an entry is {any_result['entry_bytes'] / 2**20:.2f} MiB, so the cache fills and is evicted "
            f"{2 * args.requests * any_result['entry_bytes'] / any_result['budget']:.1f} times over",
            "RSS above no-cache: RSS at the end minus RSS after a warm-up with the cache off; over budget: that "
            "against the budget (the cache's own accounting holds at most the budget). Each allocator in a fresh "
            "process, one after the other. Speed: CPU time per request of the soak process (all threads), which "
            "other processes on a shared machine move far less than wall time (given too)."),
        "| allocator | RSS above no-cache (end) | peak | cache holds | over budget | CPU ms / request "
        "| CPU vs glibc | requests/s (wall) |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for name, r in results.items():
        relative = f"{cpu_ms[name] / cpu_ms['glibc']:.2f}x" if "glibc" in cpu_ms else "n/a"
        lines.append(
            f"| {ALLOCATORS[name][1]} | {(r['final_rss'] - r['baseline_rss']) / 2**20:,.0f} MiB "
            f"| {(r['peak_rss'] - r['baseline_rss']) / 2**20:,.0f} MiB | {r['cache_bytes'] / 2**20:,.0f} MiB "
            f"| {(r['final_rss'] - r['baseline_rss']) / r['budget'] - 1:+.1%} | {cpu_ms[name]:.0f} | {relative} "
            f"| {r['requests'] / r['seconds']:.2f} |")
    within = [name for name, r in results.items() if (r["final_rss"] - r["baseline_rss"]) / r["budget"] <= 1.05]
    if within:
        best = min(within, key=cpu_ms.get)
        lines += ["", f"Within 5% of the budget: {', '.join(within)}; the least CPU per request among them: "
                  f"**{best}** ({cpu_ms[best]:.0f} ms)."]
    else:
        lines += ["", "No allocator kept RSS within 5% of the budget."]
    report.write(args.out, "memory-soak-cpu.md", lines)


if __name__ == "__main__":
    main()
