"""CPU benchmark of the PyTorch runtime: chunked prefill vs a token loop, and decode cost vs context.

    python -m models.bench [--preset moneta] [--contexts 128 1024 8192 32768] [--out docs/benchmarks/...]

Decode steps are interleaved round-robin across the context lengths, so machine noise hits every
context alike and the ratios stay meaningful on a shared machine.
"""

from __future__ import annotations

import argparse
import datetime
import platform
import statistics
import subprocess
import time
from pathlib import Path

import torch

from .config import preset_config
from .model import MirasLM
from .train import SIZES


def git_commit() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                              check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


@torch.inference_mode()
def prefill_throughput(model: MirasLM, tokens: int, repeats: int) -> tuple[float, float]:
    """(chunked parallel prefill tok/s, token-by-token tok/s) over the same prompt, alternating runs."""
    ids = torch.randint(0, model.config.vocab_size, (1, tokens))
    parallel, loop = [], []
    for _ in range(repeats):
        t0 = time.perf_counter()
        model(ids)
        parallel.append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        state = None
        for t in range(tokens):
            _, state = model(ids[:, t:t + 1], state)
        loop.append(time.perf_counter() - t0)
    return tokens / statistics.median(parallel), tokens / statistics.median(loop)


@torch.inference_mode()
def decode_vs_context(model: MirasLM, contexts: list[int], steps: int) -> list[dict]:
    rows = []
    states = []
    for n in contexts:
        t0 = time.perf_counter()
        _, state = model(torch.randint(0, model.config.vocab_size, (1, n)))
        states.append(state)
        rows.append({"context": n, "prefill_s": time.perf_counter() - t0, "state_bytes": state.nbytes(), "times": []})
    token = torch.randint(0, model.config.vocab_size, (1, 1))
    for _ in range(steps):  # round-robin: one step of each context per round
        for i, row in enumerate(rows):
            t0 = time.perf_counter()
            _, states[i] = model(token, states[i])
            row["times"].append(time.perf_counter() - t0)
    for row in rows:
        row["ms_per_token"] = 1e3 * statistics.median(row.pop("times"))
        row["state_bytes_after"] = states[rows.index(row)].nbytes()
    return rows


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--preset", default="moneta")
    p.add_argument("--size", default="tiny", choices=sorted(SIZES))
    p.add_argument("--contexts", type=int, nargs="+", default=[128, 1024, 8192, 32768])
    p.add_argument("--prefill-tokens", type=int, default=512)
    p.add_argument("--steps", type=int, default=40)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--out", default="docs/benchmarks/models-cpu.md")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    model = MirasLM(preset_config(args.preset, **SIZES[args.size])).eval()
    parallel, loop = prefill_throughput(model, args.prefill_tokens, repeats=3)
    rows = decode_vs_context(model, args.contexts, args.steps)
    base = rows[0]["ms_per_token"]
    lines = [
        f"# PyTorch runtime on CPU: `{args.preset}` ({args.size}, {model.num_parameters():,} parameters, "
        f"chunk {model.config.chunk_size})",
        "",
        f"Machine: {platform.machine()}, {args.threads} threads, torch {torch.__version__}; "
        f"date {datetime.date.today()}; commit {git_commit()}. Command: `python -m models.bench "
        f"--preset {args.preset} --size {args.size}`.",
        "",
        f"## Prefill, {args.prefill_tokens}-token prompt (median of 3, alternating)",
        "",
        "| path | tokens/s |",
        "|---|---|",
        f"| chunked parallel pass | {parallel:,.0f} |",
        f"| token by token | {loop:,.0f} |",
        f"| ratio | {parallel / loop:.1f}x |",
        "",
        f"## Decode after a context of N tokens (median of {args.steps} steps, interleaved across contexts)",
        "",
        "| context | ms / token | ratio to first | state bytes before | after decode |",
        "|---|---|---|---|---|",
    ]
    for row in rows:
        lines.append(f"| {row['context']:,} | {row['ms_per_token']:.2f} | {row['ms_per_token'] / base:.2f} | "
                     f"{row['state_bytes']:,} | {row['state_bytes_after']:,} |")
    ratio = rows[-1]["ms_per_token"] / base
    same_size = len({r["state_bytes"] for r in rows} | {r["state_bytes_after"] for r in rows}) == 1
    lines += ["", f"Decode cost {rows[-1]['context']:,} vs {rows[0]['context']:,}: {ratio:.2f}x "
                  f"(target within 1.1x); state size constant: {'yes' if same_size else 'NO'}."]
    text = "\n".join(lines) + "\n"
    print(text)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
