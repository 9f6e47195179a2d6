"""How many torch threads the CPU engine's steps should use: each step the engine runs, at each thread count,
side by side.

    python -m benchmarks.threads [--model moneta-tiny] [--threads 1 2] [--batches 1 32]

The steps are the engine's own: the compiled decode step with the native memory kernel
(server/decode_graphs.py, through ``DecodeGraphs.run`` as the engine calls it) at each ``--batches`` size,
and the eager chunked prefill of a chat turn (``--turn`` new tokens continuing a sequence of ``--cached``
tokens, as a state-cache hit prefills it) and of a fresh ``--prompt``-token prompt. Every round runs every
(step, thread count) once, so load on a shared machine hits every column alike; the first chunk of decode
rounds compiles and warms up. The decode medians cover one whole chunk (every count of factor rows, one
fold per sequence). Writes threads-cpu.md into ``--out`` (default docs/benchmarks/).

On a machine of few cores the server's event loop shares them with the engine's threads: this measures the
engine alone; the server-level effect is the side by side of benchmarks/llamacpp.py.
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import torch
from torch import Tensor

from benchmarks import report
from benchmarks.compiled import spread_pool
from miras_serve import models
from miras_serve.server.decode_graphs import DecodeGraphs, use_project_compile_cache


def decode_call(model: models.MirasLM, batch: int) -> Callable[[], None]:
    """One compiled decode step of ``batch`` sequences whose phases are spread over the chunk."""
    pool, slots = spread_pool(model, batch)
    graphs = DecodeGraphs(model, pool, scratch_slot=batch, max_batch=batch, use_graphs=False,
                          compile_backend="inductor")

    def call() -> None:
        graphs.run(torch.randint(3, model.config.vocab_size, (batch, 1)), slots)
        if graphs.compiled is None:
            raise RuntimeError("the compiled step fell back to eager")

    return call


def prefill_call(model: models.MirasLM, cached: int, tokens: int) -> tuple[Callable[[], Tensor], Callable[[], None]]:
    """The eager prefill of ``tokens`` new tokens continuing a sequence of ``cached`` tokens in a pool slot (it
    returns the last token's logits, all the engine samples from), and what puts the slot's state back
    (untimed, before every call, so each call prefills the same turn)."""
    pool, slots = model.init_state(2), torch.tensor([0])
    vocab = model.config.vocab_size
    if cached:
        model(torch.randint(3, vocab, (1, cached)), pool, slots=slots)
    saved = pool.clone()
    ids = torch.randint(3, vocab, (1, tokens))

    def call() -> Tensor:
        return model(ids, pool, slots=slots, last_only=True)[0]

    def restore() -> None:
        for dst, src in zip(pool.tensors(), saved.tensors(), strict=True):
            dst.copy_(src)

    return call, restore


@torch.inference_mode()
def measure(model: models.MirasLM, threads: list[int], batches: list[int], cached: int, turn: int,
            prompt: int, rounds: int) -> list[dict]:
    runs = []
    for n in threads:
        torch.set_num_threads(n)
        for batch in batches:
            runs.append(dict(what=f"decode step, batch {batch}", tokens=batch, threads=n,
                             call=decode_call(model, batch), restore=None, times=[], warmup_s=0.0))
        for what, before, tokens in ((f"prefill {turn} tokens after {cached} cached", cached, turn),
                                     (f"prefill a {prompt}-token prompt", 0, prompt)):
            call, restore = prefill_call(model, before, tokens)
            runs.append(dict(what=what, tokens=tokens, threads=n, call=call, restore=restore, times=[], warmup_s=0.0))
    chunk = model.config.chunk_size
    for step in range(2 * chunk):
        for run in runs:
            if run["restore"] is not None:  # a prefill: ``rounds`` times, spread over the measured decode chunk
                if step < chunk or (step - chunk) % max(1, chunk // rounds):
                    continue
                run["restore"]()
            torch.set_num_threads(run["threads"])
            t0 = time.perf_counter()
            run["call"]()
            elapsed = time.perf_counter() - t0
            if step < chunk:
                run["warmup_s"] += elapsed
            else:
                run["times"].append(elapsed)
        if step == 0:
            print("first round done (the compiles)", flush=True)
    rows = []
    for run in runs:
        ms = statistics.median(run["times"]) * 1e3
        rows.append(dict(what=run["what"], threads=run["threads"], ms=ms, tok_s=run["tokens"] / ms * 1e3,
                         samples=len(run["times"]), warmup_s=run["warmup_s"]))
        print(f"{run['what']}, {run['threads']} threads: {ms:.2f} ms ({len(run['times'])} samples)", flush=True)
    return rows


def report_lines(model_name: str, rows: list[dict], threads: list[int], argv: list[str] | None) -> list[str]:
    base = threads[0]
    lines = [*report.header(f"Torch threads for the CPU engine's steps: `{model_name}`", __spec__.name, argv),
             "Medians; every round runs every step at every thread count (side by side). Decode: the compiled "
             "step with the native memory kernel, as the engine runs it, over one chunk after a warm-up chunk "
             "(the compiles). Prefill: eager, as the engine runs it, the slot's state put back before each call. "
             f"*vs {base} thread(s)*: the same step's time at {base} over this one's.", ""]
    table = []
    for row in rows:
        ref = next(r for r in rows if r["what"] == row["what"] and r["threads"] == base)
        table.append((row["what"], row["threads"], f"{row['ms']:.2f}", f"{row['tok_s']:,.0f}",
                      f"{ref['ms'] / row['ms']:.2f}x", row["samples"], f"{row['warmup_s']:.1f}"))
    return lines + report.table(("step", "threads", "ms", "tok/s", f"vs {base} thread(s)", "samples",
                                 "warm-up s"), table)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default="moneta-tiny")
    p.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    p.add_argument("--batches", type=int, nargs="+", default=[1, 32])
    p.add_argument("--cached", type=int, default=1000, help="tokens already in the state of the chat turn")
    p.add_argument("--turn", type=int, default=266, help="new tokens of the chat turn")
    p.add_argument("--prompt", type=int, default=2048, help="tokens of the fresh prompt")
    p.add_argument("--rounds", type=int, default=8, help="timed prefills of each kind and thread count")
    report.add_out_argument(p)
    args = p.parse_args(argv)
    torch.manual_seed(0)
    use_project_compile_cache()
    model, _ = models.load_pretrained(args.model)
    rows = measure(model.eval(), args.threads, args.batches, args.cached, args.turn, args.prompt, args.rounds)
    lines = report_lines(args.model, rows, args.threads, argv)
    print("\n".join(lines))
    report.write(args.out, "threads-cpu.md", lines)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
