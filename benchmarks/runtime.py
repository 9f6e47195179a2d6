"""CPU benchmark of the PyTorch runtime: chunked prefill vs a token loop, decode cost vs context, and
batched decode through a state pool in both state layouts against the bytes a step must move.

    python -m benchmarks.runtime [--preset moneta] [--contexts 128 1024 8192 32768] [--batches 1 8 32 64]
                                 [--out DIR]

Writes models-cpu.md into ``--out`` (default docs/benchmarks/).

Decode steps are interleaved round-robin (across the context lengths; across the layouts and a copy of
the step's bytes), so machine noise hits every column alike and the ratios stay meaningful on a shared
machine.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from benchmarks import report
from benchmarks.cost import decode_step_cost
from miras_serve.models.config import preset_config
from miras_serve.models.model import MirasLM
from miras_serve.models.train import SIZES

LAYOUTS = ("running", "factored")  # today's layout first: the "before" column


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


def step_cost(model: MirasLM, layout: str, batch: int):
    """The byte / FLOP model of one decode step of ``model`` (benchmarks.cost), averaged over a chunk."""
    cfg = model.config
    weight_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    return decode_step_cost(layout, cfg.memory, head_dim=cfg.head_dim, hidden=cfg.memory_hidden,
                            chunk_size=cfg.chunk_size, n_heads=cfg.n_heads,
                            n_miras_layers=cfg.layer_kinds.count("M"), batch=batch, weight_bytes=weight_bytes)


@torch.inference_mode()
def decode_batches(model: MirasLM, batches: list[int], prompt: int) -> list[dict]:
    """Decode steps through a state pool (the engine's path) at each batch size, in both layouts, over one
    whole chunk (every phase, one fold per sequence; the sequences' phases are spread over the chunk),
    each step followed by a copy of the bytes the byte model says it must move (weights + state read and
    written). Every round steps every (batch size, layout) once, so load on a shared machine hits all of
    them alike and the ratios between batch sizes and layouts stay meaningful. Medians per step."""
    b = model.config.chunk_size
    runs = []
    for batch in batches:
        lengths = prompt + (torch.arange(batch) * b) // batch  # phases spread over the chunk
        ids = torch.randint(3, model.config.vocab_size, (batch, int(lengths.max())))
        for layout in LAYOUTS:
            pool, slots, cost = model.init_state(batch, layout=layout), torch.arange(batch), step_cost(model, layout,
                                                                                                        batch)
            model(ids, pool, lengths, slots=slots)
            runs.append(dict(batch=batch, layout=layout, pool=pool, slots=slots, cost=cost, steps=[], copies=[],
                             token=torch.randint(3, model.config.vocab_size, (batch, 1)),
                             buffers=(torch.empty(int(cost.total_bytes) // 4), torch.ones(int(cost.total_bytes) // 4))))
    for step in range(b + 1):
        for run in runs:
            t0 = time.perf_counter()
            model(run["token"], run["pool"], slots=run["slots"])
            elapsed = time.perf_counter() - t0
            dst, src = run["buffers"]
            t0 = time.perf_counter()
            dst.copy_(src)
            if step:  # the first round warms up
                run["copies"].append(time.perf_counter() - t0)
                run["steps"].append(elapsed)
    rows = []
    for batch in batches:
        row = {"batch": batch}
        for run in (r for r in runs if r["batch"] == batch):
            layout = run["layout"]
            row[layout] = statistics.median(run["steps"])
            row[f"copy {layout}"] = statistics.median(run["copies"])
            row[f"cost {layout}"] = run["cost"]
        rows.append(row)
        print(f"batch {batch}: " + ", ".join(f"{k} {v * 1e3:.2f} ms" for k, v in row.items()
                                             if isinstance(v, float)), flush=True)
    return rows


def decode_batch_lines(rows: list[dict], threads: int, prompt: int) -> list[str]:
    base = {layout: rows[0]["batch"] / rows[0][layout] for layout in LAYOUTS}
    lines = [
        f"## Batched decode through a state pool, before (`running`) and after (`factored`) ({threads} thread)",
        "",
        "One step = one token for each of `batch` sequences through `model(ids, pool, slots=...)` (the engine's "
        f"call), over a whole chunk after prompts of {prompt} to {prompt} + chunk tokens (phases spread over the "
        "chunk, so every step mixes sequences that read few and many factor rows, and each sequence folds once); "
        "median step. *Copy* is the time, in the same run, to copy a buffer of the bytes the byte model "
        "(`benchmarks/cost.py`, averaged over a chunk) says the step must move: the weights once, plus every "
        "sequence's state bytes read and written. Each round runs one step of every batch size and layout "
        "(and its copy), so machine load hits them alike.",
        "",
        "| batch | running ms / step | tok/s | vs batch 1 | step / copy | factored ms / step | tok/s | vs batch 1 | "
        "step / copy | factored speed-up |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for row in rows:
        cells = [str(row["batch"])]
        for layout in LAYOUTS:
            rate = row["batch"] / row[layout]
            cells += [f"{row[layout] * 1e3:.1f}", f"{rate:,.0f}", f"{rate / base[layout]:.1f}x",
                      f"{row[layout] / row[f'copy {layout}']:.2f}x"]
        cells.append(f"{row['running'] / row['factored']:.2f}x")
        lines.append("| " + " | ".join(cells) + " |")
    lines += ["", "Byte model of one step (per step, the whole batch; state fp32):", "",
              "| batch | layout | weights MB | state read MB | state written MB | total MB | memory GFLOP | "
              "copy ms | state per sequence MiB |", "|---:|---|---:|---:|---:|---:|---:|---:|---:|"]
    for row in rows:
        for layout in LAYOUTS:
            c = row[f"cost {layout}"]
            lines.append(f"| {row['batch']} | {layout} | {c.weight_bytes / 1e6:.1f} | {c.state_bytes_read / 1e6:.1f} | "
                         f"{c.state_bytes_written / 1e6:.1f} | {c.total_bytes / 1e6:.1f} | {c.flops / 1e9:.3f} | "
                         f"{row[f'copy {layout}'] * 1e3:.2f} | {c.state_bytes_per_sequence / 2**20:.2f} |")
        ratio = row["cost running"].total_bytes / row["cost factored"].total_bytes
        lines.append(f"| {row['batch']} | running / factored | | | | {ratio:.2f}x | | | |")
    return lines


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--preset", default="moneta")
    p.add_argument("--size", default="tiny", choices=sorted(SIZES))
    p.add_argument("--contexts", type=int, nargs="+", default=[128, 1024, 8192, 32768])
    p.add_argument("--prefill-tokens", type=int, default=512)
    p.add_argument("--steps", type=int, default=40)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--batches", type=int, nargs="+", default=[1, 8, 32, 64])
    p.add_argument("--batch-threads", type=int, default=1, help="torch threads of the batched decode section "
                   "(1: as the served engine in benchmarks.serving_engine)")
    p.add_argument("--batch-prompt", type=int, default=128)
    report.add_out_argument(p)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    model = MirasLM(preset_config(args.preset, **SIZES[args.size])).eval()
    parallel, loop = prefill_throughput(model, args.prefill_tokens, repeats=3)
    rows = decode_vs_context(model, args.contexts, args.steps)
    torch.set_num_threads(args.batch_threads)
    batch_rows = decode_batches(model, args.batches, args.batch_prompt)
    base = rows[0]["ms_per_token"]
    lines = [
        *report.header(f"PyTorch runtime on CPU: `{args.preset}` ({args.size}, {model.num_parameters():,} "
                       f"parameters, chunk {model.config.chunk_size})", __spec__.name, argv,
                       f"{args.threads} torch threads"),
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
                  f"(target within 1.1x); state size constant: {'yes' if same_size else 'NO'}.", ""]
    lines += decode_batch_lines(batch_rows, args.batch_threads, args.batch_prompt)
    print("\n".join(lines))
    report.write(args.out, "models-cpu.md", lines)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
