"""The torch thread count of the CPU server, measured at the server: one ``miras-serve`` per setting, all up at
once, driven in turn (A B C A B C ...) by the same client, so that load on a shared machine hits every column
alike. Not run in CI.

    python -m benchmarks.server_threads [--model moneta-tiny] [--rounds 6] [--setting NAME=VAR=VALUE,...]

Each round measures, on every server: the TTFT of chat turns 2-8 (a fresh conversation each round, so that no
earlier round's saved states answer it: 8 turns of +256 user tokens, the history resent, as in
benchmarks/llamacpp.py), the decode ITL at concurrency 1 after a 128-token prompt, and with ``--c32`` the
output tokens/s at concurrency 32. Settings are environment variables of the server process (the default ones:
torch's threads through ``OMP_NUM_THREADS`` at 1 and 2, and 2 with OpenMP's passive wait policy). The server
compiles its decode steps for, and runs them on, the engine thread's threads (server/decode_graphs.py).
Writes server-threads-cpu.md into ``--out`` (default docs/benchmarks/).
"""

from __future__ import annotations

import argparse
import contextlib
import os
import statistics
import tempfile
from pathlib import Path

from benchmarks import report
from benchmarks.llamacpp import CHAT_TURNS, CHAT_USER_TOKENS, WARM_UP_SEED, load, measure_chat
from deploy.local.launch import STARTUP_TIMEOUT, serve_command
from miras_serve.loadtest.process import ServerProcess, free_port
from miras_serve.loadtest.workload import LengthDist, Workload, load_tokenizer, synthetic_corpus
from miras_serve.models.checkpoint import resolve

DEFAULT_SETTINGS = ("1 thread=OMP_NUM_THREADS=1", "2 threads=OMP_NUM_THREADS=2",
                    "2 threads, passive wait=OMP_NUM_THREADS=2,OMP_WAIT_POLICY=PASSIVE")
CHAT = f"chat turns 2-{CHAT_TURNS} TTFT (ms, median)"
ITL = "decode ITL at concurrency 1 after 128 tokens (ms, p50)"
C32 = "output tokens/s at concurrency 32 (128 in, 128 out)"


def parse_setting(text: str) -> tuple[str, dict[str, str]]:
    """``NAME=VAR=VALUE,VAR=VALUE`` -> (NAME, {VAR: VALUE})."""
    name, _, assignments = text.partition("=")
    env = dict(item.split("=", 1) for item in assignments.split(",") if item)
    if not name or not env:
        raise argparse.ArgumentTypeError(f"a setting is NAME=VAR=VALUE[,VAR=VALUE...], got {text!r}")
    return name, env


def chat_messages(tokenizer_dir: str, seed: int) -> list[str]:
    chat = Workload(synthetic_corpus(), load_tokenizer(tokenizer_dir), LengthDist.parse(f"fixed:{CHAT_USER_TOKENS}"),
                    LengthDist.parse("fixed:32"), seed=seed)
    return [chat.request(i).prompt for i in range(CHAT_TURNS)]


def measure(model: str, settings: dict[str, dict[str, str]], rounds: int, c32: bool) -> dict[str, dict[str, list]]:
    tokenizer_dir = str(resolve(model))
    results = {name: {CHAT: [], ITL: [], C32: []} for name in settings}
    with tempfile.TemporaryDirectory() as tmp, contextlib.ExitStack() as stack:
        work, servers = Path(tmp), {}
        for name, env in settings.items():
            port = free_port()
            servers[name] = stack.enter_context(ServerProcess(
                serve_command(model, port), url=f"http://127.0.0.1:{port}", env={**os.environ, **env}, cwd=tmp,
                log=work / f"server-{port}.log", timeout=STARTUP_TIMEOUT))
            # every step size runs; prompts of their own (a repeat would come from the prompt cache)
            load(servers[name].url, tokenizer_dir, work / f"warm-up-{port}", 4, 128, 32, 4, seed=WARM_UP_SEED)
        for r in range(rounds):
            messages = chat_messages(tokenizer_dir, seed=100 + r)  # new to every server's state cache
            for index, (name, server) in enumerate(servers.items()):
                out = work / f"round-{r}-setting-{index}"
                results[name][CHAT].append(measure_chat(server.url, model, messages)[CHAT])
                results[name][ITL].append(load(server.url, tokenizer_dir, out / "itl", 1, 128, 128, 2,
                                                seed=100 * r + 1)["itl_ms"]["p50"])
                if c32:
                    results[name][C32].append(load(server.url, tokenizer_dir, out / "c32", 32, 128, 128, 64,
                                                   seed=100 * r + 2)["output_throughput"])
            print(f"round {r + 1}/{rounds}: " + "; ".join(
                f"{name}: " + ", ".join(f"{v[-1]:.1f}" for v in values.values() if v)
                for name, values in results.items()), flush=True)
    return results


def report_lines(model: str, results: dict[str, dict[str, list]], settings: dict[str, dict[str, str]],
                 argv: list[str] | None) -> list[str]:
    base = next(iter(results))
    measures = [m for m in (CHAT, ITL, C32) if results[base][m]]
    lines = [*report.header(f"Torch threads of the CPU server, side by side: `{model}`", __spec__.name, argv),
             f"Medians of {len(results[base][CHAT])} rounds; in each round every server runs every measure in turn. "
             f"*vs {base}*: the ratio to the first setting, > 1 when this one is better.", ""]
    rows = []
    for name, values in results.items():
        env = ", ".join(f"{k}={v}" for k, v in settings[name].items())
        for m in measures:
            mine, theirs = statistics.median(values[m]), statistics.median(results[base][m])
            ratio = mine / theirs if m == C32 else theirs / mine
            rows.append((name, env, m, f"{mine:,.1f}", f"{min(values[m]):,.1f} - {max(values[m]):,.1f}",
                         f"{ratio:.2f}x"))
    return lines + report.table(("setting", "environment", "measure", "median", "range", f"vs {base}"), rows)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default="moneta-tiny")
    p.add_argument("--rounds", type=int, default=6)
    p.add_argument("--setting", type=parse_setting, action="append",
                   help="NAME=VAR=VALUE[,VAR=VALUE...] (repeat; default: 1 and 2 threads, 2 with passive wait)")
    p.add_argument("--c32", action="store_true", help="also output tokens/s at concurrency 32 (~30 s a server)")
    report.add_out_argument(p)
    args = p.parse_args(argv)
    settings = dict(args.setting or [parse_setting(s) for s in DEFAULT_SETTINGS])
    results = measure(args.model, settings, args.rounds, args.c32)
    lines = report_lines(args.model, results, settings, argv)
    print("\n".join(lines))
    report.write(args.out, "server-threads-cpu.md", lines)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
