"""The engine's start-up warm-up of the compiled CPU decode step: every graph's compile, cold and warm cache.

    python -m benchmarks.warm_up [--model moneta-tiny] [--max-num-seqs 64] [--requests 12]

Starts the engine as ``miras-serve`` does (compiled steps on, inductor; server/decode_graphs.py warms them up in
the engine's constructor) twice, each in a fresh process: with an empty inductor cache (cold: the first start
on a new machine or pod) and again on the cache the first start wrote (warm: a restart). Reports each compile
(batch, rows starting a chunk, factor rows, seconds), the warm-up's total and the whole start, then serves
``--requests`` greedy requests of different prompt lengths (so that batch sizes from 1 up and chunk starts
come up) and reports the compiles they caused (the warm-up's point: none).
Writes warm-up-cpu.md into ``--out`` (default docs/benchmarks/).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

from benchmarks import report


def start_and_serve(model_name: str, max_num_seqs: int, requests: int) -> dict:
    """In this process: the engine's start (its warm-up's compiles) and a workload after it."""
    import torch

    from miras_serve.server import EngineConfig, LLMEngine
    from miras_serve.server.loader import load_model
    from miras_serve.server.sampling_params import SamplingParams

    torch.set_num_threads(1)
    model, tokenizer = load_model(model_name)
    start = time.monotonic()
    engine = LLMEngine(model, tokenizer, EngineConfig(max_num_seqs=max_num_seqs, compiled_steps=True))
    started = time.monotonic() - start
    graphs = engine.decode_graphs
    warm = [(batch, 0 if known.first is None else known.first.numel(), known.filled, seconds)
            for batch, known, seconds in graphs.compiles]
    chunk = model.config.chunk_size
    for i in range(requests):  # prompts of 1 to 3 chunks and a bit: the sequences' phases differ
        prompt = torch.randint(3, engine.vocab_size, (chunk * (1 + i % 3) + 7 * i,), generator=torch.Generator()
                               .manual_seed(i)).tolist()
        engine.add_request(str(i), prompt, SamplingParams(temperature=0.0, max_tokens=chunk + 8 * i, ignore_eos=True))
    steps = 0
    while engine.has_unfinished():
        engine.step()
        steps += 1
    return {"start_s": started, "compiles": warm, "late_compiles": len(graphs.compiles) - len(warm), "steps": steps}


def run_child(args: argparse.Namespace, cache: str) -> dict:
    env = {**os.environ, "TORCHINDUCTOR_CACHE_DIR": cache, "OMP_NUM_THREADS": "1"}
    out = subprocess.run([sys.executable, "-m", "benchmarks.warm_up", "--child", "--model", args.model,
                          "--max-num-seqs", str(args.max_num_seqs), "--requests", str(args.requests)],
                         env=env, check=True, capture_output=True, text=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def report_lines(args: argparse.Namespace, runs: dict[str, dict], argv: list[str] | None) -> list[str]:
    lines = [*report.header(f"Start-up warm-up of the compiled CPU decode step: `{args.model}`", __spec__.name, argv,
                            f"--max-num-seqs {args.max_num_seqs} (compiled batches up to "
                            f"{min(args.max_num_seqs, 32)}); inductor, 1 torch thread"),
             "Each start is a fresh process; *cold*: an empty inductor cache, *warm*: the cache the cold start "
             "wrote (a restart). A compile's seconds include dynamo's tracing, which no cache skips.", ""]
    rows = []
    for name, run in runs.items():
        for batch, starts, filled, seconds in run["compiles"]:
            rows.append([name, f"batch {batch if batch == 1 else '>1'}", starts, filled, f"{seconds:.1f}"])
    lines += report.table(["start", "graph", "chunk starts", "factor rows", "compile s"], rows)
    lines += [""] + report.table(
        ["start", "graphs", "warm-up s", "engine start s", "requests after", "their steps", "compiles in them"],
        [[name, len(run["compiles"]), f"{sum(c[3] for c in run['compiles']):.1f}", f"{run['start_s']:.1f}",
          args.requests, run["steps"], run["late_compiles"]] for name, run in runs.items()])
    return lines


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default="moneta-tiny")
    p.add_argument("--max-num-seqs", type=int, default=64)
    p.add_argument("--requests", type=int, default=12)
    p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)  # one start, printed as JSON
    report.add_out_argument(p)
    args = p.parse_args(argv)
    if args.child:
        print(json.dumps(start_and_serve(args.model, args.max_num_seqs, args.requests)))
        return 0
    with tempfile.TemporaryDirectory(prefix="inductor-") as cache:
        runs = {name: run_child(args, cache) for name in ("cold", "warm")}
    lines = report_lines(args, runs, argv)
    print("\n".join(lines))
    report.write(args.out, "warm-up-cpu.md", lines)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
