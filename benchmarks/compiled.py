"""The CPU decode step, eager vs compiled, PyTorch memory update vs the native kernel, against the time to copy
the bytes it must read.

    python -m benchmarks.compiled [--model moneta-tiny] [--batches 1 32] [--threads 1 2]

One engine decode step (server/decode_graphs.py: the step the engine runs) of each variant, eager and
compiled with each torch thread count, with the memory's decode step on the PyTorch path
(``MIRAS_CPU_NATIVE=0``) and on the native kernel (kernels.cpu_native), at each batch size, and the memory
update alone (one Miras layer's ``models.backend.factored_scan_pool``: PyTorch eager and compiled, the native
kernel, on the first thread count), each interleaved
round-robin with a copy of its bytes (weights + state read and written for the step, the state of one
layer for the memory update, from ``benchmarks/cost.py``; single-threaded), so load on a shared machine hits
every column alike. The sequences' phases are spread over the chunk and the measured steps cover one whole
chunk (every count of factor rows, one fold per sequence). A first chunk of steps compiles and warms up;
its time is reported. Writes compiled-cpu.md into ``--out`` (default docs/benchmarks/).
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import torch

from benchmarks import report
from benchmarks.runtime import step_cost
from miras_serve import models
from miras_serve.models.backend import environment, factored_scan_pool
from miras_serve.models.memory import FactoredMemory
from miras_serve.server.decode_graphs import DecodeGraphs, use_project_compile_cache


def spread_pool(model: models.MirasLM, batch: int) -> tuple[models.ModelState, torch.Tensor]:
    """A pool of ``batch`` sequences after prompts of 2 chunks + 1 to 3 chunks, phases spread over the chunk."""
    b = model.config.chunk_size
    lengths = 2 * b + 1 + (torch.arange(batch) * b) // batch
    pool, slots = model.init_state(batch + 1), torch.arange(batch)  # + the scratch slot of padded batches
    model(torch.randint(3, model.config.vocab_size, (batch, int(lengths.max()))), pool, lengths, slots=slots)
    return pool, slots


def memory_update(model: models.MirasLM, pool: models.ModelState, graphs: DecodeGraphs) -> Callable:
    """One step of the first Miras layer's memory update on ``pool`` (its inputs drawn once)."""
    cfg, mixer = model.config, model.blocks[model.miras_layers[0]].mixer
    layer = pool.layers[model.miras_layers[0]]
    state = FactoredMemory((layer["anchor_w_in"], layer["anchor_w_out"]), layer["rows"], layer["row_coef"],
                           layer["row_decay"])
    ln_weight, ln_bias = mixer.ln_params()

    def update(slots: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, eta: torch.Tensor,
               log_alpha: torch.Tensor, first: torch.Tensor | None, filled: int | None) -> torch.Tensor:
        known = None if filled is None else models.memory.KnownStep(first, filled)
        out = factored_scan_pool(cfg, state, slots, pool.pos.index_select(0, slots), q, k, v, eta,
                                 log_alpha, None, torch.ones_like(slots), ln_weight, ln_bias, None, known)
        pool.pos.index_add_(0, slots, torch.ones_like(slots))
        return out

    return update


@torch.inference_mode()
def measure(model: models.MirasLM, batches: list[int], threads: list[int]) -> list[dict]:
    b, cfg = model.config.chunk_size, model.config
    runs = []
    for batch in batches:
        cost = step_cost(model, "factored", batch)
        layer_bytes = (cost.state_bytes_read + cost.state_bytes_written) / len(model.miras_layers)
        for what, nbytes in (("step", cost.total_bytes), ("memory update", layer_bytes)):
            copy = (torch.empty(int(nbytes) // 4), torch.ones(int(nbytes) // 4))
            # (mode, memory decode kernel, threads); the memory update on the first thread count only (each
            # compiled variant costs compiles)
            counts = threads if what == "step" else threads[:1]
            variants = [("eager", "torch", threads[0]), ("eager", "native", threads[0])]
            variants += [("compiled", "torch", t) for t in counts]
            variants += [("compiled", "native", t) for t in counts] if what == "step" else []
            for mode, kernel, n in variants:
                pool, slots = spread_pool(model, batch)
                graphs = DecodeGraphs(model, pool, scratch_slot=batch, max_batch=batch, use_graphs=False,
                                      compile_backend="inductor" if mode == "compiled" else None)
                if what == "step":
                    def call(ids: torch.Tensor, graphs: DecodeGraphs = graphs, slots: torch.Tensor = slots) -> None:
                        graphs.run(ids, slots)
                else:
                    update = memory_update(model, pool, graphs)
                    if mode == "compiled":
                        update = torch.compile(update, dynamic=None, fullgraph=True)
                    shape = (batch, cfg.n_heads, 1, cfg.head_dim)
                    inputs = [models.memory.l2_normalise(torch.randn(shape)) for _ in range(2)] + [
                        torch.randn(shape), torch.full(shape[:3], 0.01), torch.full(shape[:3], -0.01)]

                    def call(ids: torch.Tensor, graphs: DecodeGraphs = graphs, slots: torch.Tensor = slots,
                             update: Callable = update, inputs: list = inputs, mode: str = mode) -> None:
                        known = graphs.known_step(slots) if mode == "compiled" else (None, None)
                        update(slots, *inputs, *known)
                runs.append(dict(batch=batch, what=what, mode=mode, kernel=kernel, threads=n, call=call, copy=copy,
                                 graphs=graphs, steps=[], copies=[], compile_s=0.0))
    for step in range(2 * b):
        for run in runs:
            torch.set_num_threads(run["threads"])
            ids = torch.randint(3, model.config.vocab_size, (run["batch"], 1))
            with environment("MIRAS_CPU_NATIVE", "1" if run["kernel"] == "native" else "0"):
                t0 = time.perf_counter()
                run["call"](ids)
                elapsed = time.perf_counter() - t0
            dst, src = run["copy"]
            torch.set_num_threads(1)
            t0 = time.perf_counter()
            dst.copy_(src)
            copied = time.perf_counter() - t0
            if run["mode"] == "compiled" and getattr(run.get("graphs"), "compiled", True) is None:
                raise RuntimeError("the compiled step fell back to eager")
            if step >= b:  # the first chunk compiles and warms up
                run["copies"].append(copied)
                run["steps"].append(elapsed)
            else:
                run["compile_s"] += elapsed
        if step == 0:
            print("first round done", flush=True)
    rows = []
    for run in runs:
        rows.append(dict(batch=run["batch"], what=run["what"], mode=run["mode"], kernel=run["kernel"],
                         threads=run["threads"],
                         step=statistics.median(run["steps"]), copy=statistics.median(run["copies"]),
                         compile_s=run["compile_s"]))
        r = rows[-1]
        print(f"batch {r['batch']} {r['what']} {r['mode']} {r['kernel']} {r['threads']}t: {r['step'] * 1e3:.2f} ms, "
              f"copy {r['copy'] * 1e3:.2f} ms ({r['step'] / r['copy']:.2f}x), warm-up chunk {r['compile_s']:.1f} s",
              flush=True)
    return rows


def report_lines(model_name: str, model: models.MirasLM, rows: list[dict], argv: list[str] | None) -> list[str]:
    b = model.config.chunk_size
    lines = [
        *report.header(f"The CPU decode step, eager vs compiled, PyTorch vs native memory update: `{model_name}` "
                       f"({model.num_parameters():,} parameters)", __spec__.name, argv),
        f"Median over one chunk of {b} steps (every count of factor rows, one fold per sequence; phases spread over "
        "the chunk) after a chunk of warm-up, which includes the compiles. Every round runs every variant once and, "
        "after each, a single-threaded copy of the bytes the byte model (`benchmarks/cost.py`, factored layout) says "
        "it must move: weights + state read and written for the *step* (one engine decode step of the whole "
        "model), the state of one Miras layer for the *memory update* (`models.backend.factored_scan_pool`). "
        "*memory kernel*: the factored memory's one-token step on the PyTorch path (`MIRAS_CPU_NATIVE=0`) or the "
        "native C++ kernel (`kernels/cpu/factored_decode.cpp`); *vs eager*: against the eager step with the "
        "PyTorch path, the same batch.", "",
        "| batch | what | variant | memory kernel | threads | ms | tok/s | copy ms | ms / copy | vs eager | "
        "warm-up chunk s |",
        "|---:|---|---|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for row in rows:
        eager = next(r for r in rows if r["batch"] == row["batch"] and r["what"] == row["what"]
                     and r["mode"] == "eager" and r["kernel"] == "torch")
        rate = f"{row['batch'] / row['step']:,.0f}" if row["what"] == "step" else ""
        lines.append(f"| {row['batch']} | {row['what']} | {row['mode']} | {row['kernel']} | {row['threads']} | "
                     f"{row['step'] * 1e3:.2f} | {rate} | {row['copy'] * 1e3:.2f} | {row['step'] / row['copy']:.2f}x | "
                     f"{eager['step'] / row['step']:.2f}x | {row['compile_s']:.1f} |")
    return lines


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default="moneta-tiny")
    p.add_argument("--batches", type=int, nargs="+", default=[1, 32])
    p.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    report.add_out_argument(p)
    args = p.parse_args(argv)
    torch.manual_seed(0)
    use_project_compile_cache()
    model, _ = models.load_pretrained(args.model)
    if model.config.memory != "mlp":
        raise SystemExit("the memory update is timed on the factored layout of an mlp memory")
    rows = measure(model.eval(), args.batches, args.threads)
    lines = report_lines(args.model, model, rows, argv)
    print("\n".join(lines))
    report.write(args.out, "compiled-cpu.md", lines)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
