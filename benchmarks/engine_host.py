"""Host work per engine step: the time of a decode step spent outside the model forward (scheduling,
sampling, detokenizing, output assembly), at batch 1 / 64 / 256, for this tree and a baseline revision
side by side in one run, and the engine's decode tokens/s. Writes engine-host-cpu.md into ``--out``.

    python -m benchmarks.engine_host [--baseline REV] [--steps 30] [--preset linear --size tiny]
                                     [--compile-backend inductor|aot_eager] [--batches 1 32] [--kinds greedy]

``--compile-backend``: the engine's compiled CPU decode step (server/decode_graphs.py, warmed up at start-up; its
call is the forward), at batch sizes it compiles (up to 32), into engine-host-cpu-compiled.md; both trees need it.

Each tree runs from an import root of its own (benchmarks/trees.py), with this benchmarks/ package, so both trees are
measured by the same code (it only uses the engine API both have). Each measurement is its own process, with one
torch thread; baseline and current runs alternate, and each is repeated (``--repeats``), keeping the run
with the least host time: other load on a shared machine only ever adds time.
"""

from __future__ import annotations

import argparse
import itertools
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

import miras_serve.server.engine as engine_module
from benchmarks import report
from benchmarks.trees import export, import_root, run_worker
from miras_serve import models
from miras_serve.server.engine import EngineConfig, LLMEngine
from miras_serve.server.request import RequestStatus
from miras_serve.server.sampling_params import SamplingParams

BATCHES = (1, 64, 256)
COMPILED_BATCHES = (1, 32)  # the engine compiles batches up to 32 (server/decode_graphs.py)


def workload(kind: str, batch: int) -> list[SamplingParams]:
    """``greedy``: every row greedy. ``mixed``: every sampling feature somewhere in the batch."""
    long = dict(max_tokens=100_000, ignore_eos=True)
    if kind == "greedy":
        return [SamplingParams(temperature=0.0, **long)] * batch
    mixed = itertools.cycle([
        lambda i: SamplingParams(temperature=0.8, top_p=0.95, seed=i, **long),
        lambda i: SamplingParams(temperature=1.0, top_k=50, **long),
        lambda i: SamplingParams(temperature=0.0, **long),
        lambda i: SamplingParams(temperature=0.7, repetition_penalty=1.1, presence_penalty=0.3,
                                 frequency_penalty=0.2, **long),
        lambda i: SamplingParams(temperature=1.0, min_p=0.05, logprobs=5, **long),
        lambda i: SamplingParams(temperature=0.9, logit_bias={10: 2.0}, min_tokens=8, stop=["\n\n"], **long),
    ])
    return [next(mixed)(i) for i in range(batch)]


class Stopwatch:
    """Wraps a callable and adds up the seconds spent in it."""

    def __init__(self, fn):
        self.fn, self.seconds = fn, 0.0

    def __call__(self, *args, **kwargs):
        start = time.perf_counter()
        try:
            return self.fn(*args, **kwargs)
        finally:
            self.seconds += time.perf_counter() - start


def measure(model_dir: str, batch: int, kind: str, steps: int, backend: str | None = None) -> dict[str, float]:
    """Seconds per decode step (medians over the steps): total, model forward (the compiled step's call with a
    ``backend``), host (total - forward) and parts of the host work: scheduling, sampler, appending tokens
    (detokenizing, stop checks, metrics) and output assembly."""
    torch.set_num_threads(1)
    net, tokenizer = models.load_pretrained(model_dir)
    compiled = {} if backend is None else {"compiled_steps": True, "compile_backend": backend}
    config = EngineConfig(max_num_seqs=batch, max_num_batched_tokens=max(2048, batch + net.config.chunk_size),
                          state_cache_bytes=0, **compiled)
    engine = LLMEngine(net, tokenizer, config)
    if backend is None:
        forward = Stopwatch(net.forward)
        net.forward = forward
    else:  # the compiled step (a wrapped net.forward would be traced into it)
        forward = Stopwatch(engine.decode_graphs.compiled)
        engine.decode_graphs.compiled = forward
    if hasattr(engine, "sampler"):  # batched sampler
        sampler = Stopwatch(engine.sampler.sample)
        engine.sampler.sample = sampler
    else:  # the per-row sampler of earlier revisions
        sampler = Stopwatch(engine_module.sample)
        engine_module.sample = sampler
    parts = {"schedule": Stopwatch(engine.scheduler.schedule), "append": Stopwatch(engine._append),
             "outputs": Stopwatch(engine._deltas)}
    engine.scheduler.schedule, engine._append, engine._deltas = parts["schedule"], parts["append"], parts["outputs"]
    if backend is not None:  # the compiled step's shape, read on the host before each call
        parts["known_step"] = engine.decode_graphs.known_step = Stopwatch(engine.decode_graphs.known_step)
    gen = torch.Generator().manual_seed(0)
    for i, params in enumerate(workload(kind, batch)):
        engine.add_request(str(i), torch.randint(3, engine.vocab_size, (16,), generator=gen).tolist(), params)
    while any(r.status is not RequestStatus.DECODING for r in engine.requests.values()):
        engine.step()
    for _ in range(3):
        engine.step()
    watches = {"forward": forward, "sampler": sampler, **parts}
    per_step: dict[str, list[float]] = {name: [] for name in ["total", *watches]}
    for _ in range(steps):
        before = {name: watch.seconds for name, watch in watches.items()}
        start = time.perf_counter()
        engine.step()
        per_step["total"].append(time.perf_counter() - start)
        for name, watch in watches.items():
            per_step[name].append(watch.seconds - before[name])
    per_step["host"] = [t - f for t, f in zip(per_step["total"], per_step["forward"], strict=True)]
    # medians over the steps: a burst of other load on a shared machine moves a mean, not a median
    return {name: statistics.median(values) for name, values in per_step.items()}


def host_time(run: dict[str, float]) -> float:
    return run["host"]


def report_lines(args: argparse.Namespace, argv: list[str] | None, results: dict, model_dir: str) -> list[str]:
    config = models.load_pretrained(model_dir)[0].config
    names = ("schedule", "sampler", "append", "outputs") + (("known_step",) if args.compile_backend else ())
    ratio_names = ("sampler", "known_step") if args.compile_backend else ("sampler",)
    lines = [
        *report.header(
            "Engine host work per decode step on CPU", __spec__.name, argv,
            f"baseline `{args.baseline}` (`{report.git('rev-parse', '--short', args.baseline)}`); one torch thread",
            f"model: random `{args.preset}` at size `{args.size}` (d_model {config.d_model}, {config.n_layers} layers, "
            f"vocab {config.vocab_size}), fp32; 16-token prompts, then {args.steps} timed decode steps (after 3 "
            "warm-up steps) with every sequence decoding",
            "workloads: `greedy` (every row greedy) and `mixed` (rows cycle through top-p + seed, top-k, greedy, "
            "penalties, min-p + logprobs 5, logit bias + min_tokens + a stop string)",
            f"each row is the run with the least host time of {args.repeats} (other load on the machine only adds "
            "time; forward times stay noisy)",
            f"decode step: compiled ({args.compile_backend}, warmed up at start-up; forward = the compiled step's "
            "call, host includes reading the step's shape, `DecodeGraphs.known_step`)" if args.compile_backend
            else "decode step: eager"),
        "Every time is the median over the timed steps. Host = step time minus model forward. Its parts: "
        "schedule = the scheduler's plan; sampler = the sampling "
        "call; append = appending each row's token (detokenizing, stop checks, metrics); outputs = assembling the "
        "step's deltas" + ("; known_step = reading the compiled step's shape" if args.compile_backend else "") +
        ". The rest of host (building the decode inputs, gauges) is not listed.", "",
        f"| workload | batch | tree | step ms | forward ms | host ms | {' | '.join(names)} | host share | "
        "decode tok/s |",
        "|---|---:|---|---:|---:|---:|" + "---:|" * len(names) + "---:|---:|"]
    for (kind, batch), by_tree in results.items():
        for tree, r in by_tree.items():
            host = r["host"]
            parts = " | ".join(f"{r[name] * 1e3:.3f}" for name in names)
            lines.append(f"| {kind} | {batch} | {tree} | {r['total'] * 1e3:.2f} | {r['forward'] * 1e3:.2f} | "
                         f"{host * 1e3:.2f} | {parts} | {host / r['total']:.0%} | {batch / r['total']:,.0f} |")
    lines += ["", "Ratios (baseline / current, >1: current is faster):", "",
              f"| workload | batch | host time | {' | '.join(f'{name} time' for name in ratio_names)} | "
              "decode tok/s (current / baseline) |",
              "|---|---:|---:|" + "---:|" * len(ratio_names) + "---:|"]
    for (kind, batch), by_tree in results.items():
        base, cur = by_tree["baseline"], by_tree["current"]
        ratios = " | ".join(f"{base[name] / cur[name]:.2f}x" for name in ratio_names)
        lines.append(f"| {kind} | {batch} | {host_time(base) / host_time(cur):.2f}x | {ratios} | "
                     f"{base['total'] / cur['total']:.2f}x |")
    return lines


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] == "--worker":
        model_dir, batch, kind, steps, backend = argv[1:]
        print(json.dumps(measure(model_dir, int(batch), kind, int(steps), None if backend == "eager" else backend)))
        return
    p = argparse.ArgumentParser("python -m benchmarks.engine_host", description=__doc__.split("\n\n")[0])
    p.add_argument("--baseline", default="08d8478", help="git revision to compare with (default: before issue 19's "
                   "server work; revisions before the miras_serve import root cannot be run side by side)")
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--repeats", type=int, default=3, help="runs of each measurement; the least host time is kept")
    p.add_argument("--preset", default="linear")
    p.add_argument("--size", default="tiny")
    p.add_argument("--compile-backend", choices=("inductor", "aot_eager"), help="the compiled CPU decode step "
                   "(default: the eager engine)")
    p.add_argument("--batches", type=int, nargs="+", help=f"default: {BATCHES}; compiled: {COMPILED_BATCHES}")
    p.add_argument("--kinds", nargs="+", choices=("greedy", "mixed"), default=["greedy", "mixed"])
    report.add_out_argument(p)
    args = p.parse_args(argv)
    batches = args.batches or (COMPILED_BATCHES if args.compile_backend else BATCHES)
    from miras_serve.models.random_init import random_pretrained

    with tempfile.TemporaryDirectory() as tmp:
        model_dir = str(random_pretrained(args.preset, Path(tmp) / "model", args.size, dtype=torch.float32))
        trees = {"baseline": import_root(export(args.baseline, Path(tmp) / "baseline-tree"), Path(tmp) / "baseline"),
                 "current": import_root(report.CHECKOUT, Path(tmp) / "current")}
        results: dict[tuple[str, int], dict[str, dict]] = {}
        for _ in range(args.repeats):
            for kind in args.kinds:
                for batch in batches:
                    best = results.setdefault((kind, batch), {})
                    for name, tree in trees.items():
                        run = run_worker(tree, __spec__.name, model_dir, str(batch), kind, str(args.steps),
                                         args.compile_backend or "eager")
                        print(kind, batch, name, run, flush=True)
                        if name not in best or host_time(run) < host_time(best[name]):
                            best[name] = run
        lines = report_lines(args, argv, results, model_dir)
    print("\n".join(lines))
    report.write(args.out, "engine-host-cpu-compiled.md" if args.compile_backend else "engine-host-cpu.md", lines)


if __name__ == "__main__":
    main()
