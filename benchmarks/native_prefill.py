"""The CPU prefill with the memory's segments on the PyTorch reference and on the native kernel, side by side.

    python -m benchmarks.native_prefill [--model moneta-tiny] [--threads 2] [--rounds 15]

The engine's eager chunked prefill (the last token's logits only, as the engine samples them) of a chat turn
(``--turn`` new tokens continuing a sequence of ``--cached`` tokens, as a state-cache hit prefills it) and of a
fresh ``--prompt``-token prompt, with the MLP memory's segments (and Moneta's boundary map) through
``models.memory.memory_segment`` (``lq_normalise``; ``MIRAS_CPU_NATIVE=0``) and through ``miras_serve::mlp_segment``
(``miras_serve::lq_normalise``; kernels/cpu/). Every round
runs every (prefill, variant) once, so load on a shared machine hits both columns alike. Also checks that the
two variants' logits agree. Writes native-prefill-cpu.md into ``--out`` (default docs/benchmarks/).
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from benchmarks import report
from benchmarks.threads import prefill_call
from miras_serve import models
from miras_serve.models.backend import environment

VARIANTS = (("PyTorch reference", "0"), ("native kernel", "1"))  # (name, MIRAS_CPU_NATIVE)


@torch.inference_mode()
def measure(model: models.MirasLM, cached: int, turn: int, prompt: int, rounds: int) -> list[dict]:
    runs = []
    for what, before, tokens in ((f"chat turn: {turn} tokens after {cached} cached", cached, turn),
                                 (f"a {prompt}-token prompt", 0, prompt)):
        call, restore = prefill_call(model, before, tokens)
        runs.append(dict(what=what, call=call, restore=restore, times={name: [] for name, _ in VARIANTS}, logits={}))
    for round_ in range(rounds + 1):  # the first round warms up (and builds the native kernels)
        for run in runs:
            for name, flag in VARIANTS:
                with environment("MIRAS_CPU_NATIVE", flag):
                    run["restore"]()
                    start = time.perf_counter()
                    logits = run["call"]()
                    elapsed = time.perf_counter() - start
                if round_:
                    run["times"][name].append(elapsed)
                run["logits"][name] = logits
    rows = []
    for run in runs:
        reference, native = (run["logits"][name] for name, _ in VARIANTS)
        medians = {name: statistics.median(times) for name, times in run["times"].items()}
        rows.append(dict(what=run["what"], medians=medians,
                         max_diff=float((native - reference).abs().max() / reference.abs().max())))
        print(f"{run['what']}: " + ", ".join(f"{n} {t * 1e3:.1f} ms" for n, t in medians.items()), flush=True)
    return rows


def report_lines(model_name: str, rows: list[dict], threads: int, rounds: int, argv: list[str] | None) -> list[str]:
    names = [name for name, _ in VARIANTS]
    lines = [
        *report.header(f"The CPU prefill, the memory's segments on the PyTorch reference vs the native kernel: "
                       f"`{model_name}`", __spec__.name, argv, f"torch threads: {threads}"),
        f"Median of {rounds} rounds after one of warm-up; every round runs both variants of every prefill, "
        "interleaved. *PyTorch reference*: `models.memory.memory_segment` and Moneta's boundary map "
        "`lq_normalise` (`MIRAS_CPU_NATIVE=0`); *native kernel*: `miras_serve::mlp_segment` and "
        "`miras_serve::lq_normalise` (kernels/cpu/). The rest of the model is the same "
        "eager PyTorch in both. *logits max diff*: the largest difference of the last token's logits, relative "
        "to their largest magnitude.", "",
        *report.table(["prefill", *(f"{n} ms" for n in names), "speed-up", "logits max diff"],
                      [(r["what"], *(f"{r['medians'][n] * 1e3:.1f}" for n in names),
                        f"{r['medians'][names[0]] / r['medians'][names[1]]:.2f}x", f"{r['max_diff']:.1e}")
                       for r in rows]),
    ]
    return lines


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default="moneta-tiny")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--rounds", type=int, default=15)
    p.add_argument("--cached", type=int, default=1000)
    p.add_argument("--turn", type=int, default=266)
    p.add_argument("--prompt", type=int, default=2048)
    report.add_out_argument(p)
    args = p.parse_args(argv)
    torch.manual_seed(0)
    torch.set_num_threads(args.threads)
    model, _ = models.load_pretrained(args.model)
    if model.config.memory != "mlp":
        raise SystemExit("the native segment serves the mlp memory")
    rows = measure(model.eval(), args.cached, args.turn, args.prompt, args.rounds)
    lines = report_lines(args.model, rows, args.threads, args.rounds, argv)
    print("\n".join(lines))
    report.write(args.out, "native-prefill-cpu.md", lines)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
