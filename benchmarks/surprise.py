"""What return_surprise costs: decode tokens/s of the engine, in process, with surprise on vs off.

For each batch size B, B requests (a 64-token random prompt, 48 greedy tokens, EOS ignored) run to the end on
each of two engines over the same model: on "off" no request asks for surprise, so none is computed (the model
gets no surprise buffer); on "on" every request asks, so every decode step also computes each token's memory
loss and copies it to the host. The two engines take their steps in turn, alternating which goes first (same
positions, same load); only decode steps are timed (after every request has its first token). ``--repeats``
runs; the report gives the medians and their ratio.

    python -m benchmarks.surprise [--model moneta-tiny] [--batches 1 32] [--repeats 3]

Writes surprise-cpu.md into ``--out`` (default docs/benchmarks/).
"""

from __future__ import annotations

import argparse
import itertools
import statistics
import time

import torch

from benchmarks import report
from miras_serve.server.engine import EngineConfig, LLMEngine
from miras_serve.server.loader import load_model
from miras_serve.server.sampling_params import SamplingParams

PROMPT_TOKENS, DECODE_TOKENS = 64, 48
REQUEST_IDS = itertools.count()


def decode_tokens_per_second(engines: dict[bool, LLMEngine], prompts: list[list[int]]) -> dict[bool, float]:
    """Run the prompts on both engines (off: no surprise, on: every request asks), stepping them in turn so
    that both see the same load; generated tokens per second of the steps where all of an engine's requests
    decode."""
    tokens = {surprise: 0 for surprise in engines}
    seconds = {surprise: 0.0 for surprise in engines}
    started: dict[bool, set[str]] = {surprise: set() for surprise in engines}
    for surprise, engine in engines.items():
        params = SamplingParams(temperature=0.0, max_tokens=DECODE_TOKENS, ignore_eos=True,
                                return_surprise=surprise)
        for prompt in prompts:
            engine.add_request(f"bench-{next(REQUEST_IDS)}", prompt, params)
    order = list(engines)
    while any(engine.has_unfinished() for engine in engines.values()):
        order.reverse()  # who steps first alternates: neither always follows the other's step
        for surprise in order:
            engine = engines[surprise]
            if not engine.has_unfinished():
                continue
            decoding = len(started[surprise]) == len(prompts)
            start = time.perf_counter()
            outputs = engine.step()
            elapsed = time.perf_counter() - start
            if decoding:
                tokens[surprise] += sum(len(o.token_ids) for out in outputs for o in out.outputs)
                seconds[surprise] += elapsed
            started[surprise].update(out.request_id for out in outputs if out.outputs)
    return {surprise: tokens[surprise] / seconds[surprise] for surprise in engines}


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="moneta-tiny")
    p.add_argument("--batches", type=int, nargs="+", default=[1, 32])
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--threads", type=int, default=1)
    report.add_out_argument(p)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    model, tokenizer = load_model(args.model)
    config = EngineConfig(max_num_seqs=max(args.batches), state_cache_bytes=0)
    engines = {surprise: LLMEngine(model, tokenizer, config) for surprise in (False, True)}
    generator = torch.Generator().manual_seed(0)
    rows = []
    for batch in args.batches:
        prompts = [torch.randint(3, tokenizer.vocab_size, (PROMPT_TOKENS,), generator=generator).tolist()
                   for _ in range(batch)]
        decode_tokens_per_second(engines, prompts)  # warm-up
        runs: dict[bool, list[float]] = {False: [], True: []}
        for _ in range(args.repeats):
            for surprise, rate in decode_tokens_per_second(engines, prompts).items():
                runs[surprise].append(rate)
        off, on = statistics.median(runs[False]), statistics.median(runs[True])
        rows.append((batch, off, on, runs))
        print(f"batch {batch:>3}: off {off:8.1f} tok/s, on {on:8.1f} tok/s, on/off {on / off:.3f}", flush=True)
    write_report(args, argv, rows, len(model.miras_layers))


def write_report(args: argparse.Namespace, argv: list[str] | None, rows: list, n_miras: int) -> None:
    lines = [
        *report.header(
            "return_surprise: decode tokens/s with surprise on vs off (CPU, engine in process)", __spec__.name, argv,
            f"{torch.get_num_threads()} torch thread(s)",
            f"model: `{args.model}` ({n_miras} Miras layers), torch backend",
            f"B requests of a {PROMPT_TOKENS}-token random prompt and {DECODE_TOKENS} greedy tokens on each of two "
            "engines (off: no request asks for surprise; on: all do), which take their steps in turn, alternating "
            f"which goes first; only the steps where all B decode are timed. {args.repeats} runs; medians (all runs "
            "in the last column)."),
        "| batch | off: tokens/s | on: tokens/s | on / off | runs off / on |",
        "|---|---|---|---|---|",
    ]
    for batch, off, on, runs in rows:
        shown = " / ".join(", ".join(f"{x:.0f}" for x in runs[s]) for s in (False, True))
        lines.append(f"| {batch} | {off:,.1f} | {on:,.1f} | {on / off:.3f} | {shown} |")
    lines += ["", "Off, the model gets no surprise buffer and computes nothing extra (a few `is None` checks; on a "
              "GPU the same captured CUDA graphs as before). On, each Miras layer also reduces the "
              "error it already computes for the gradient to one loss per head and token, and the engine copies "
              "B x layers floats to the host after the step (which already waits for the sampled tokens).", ""]
    report.write(args.out, "surprise-cpu.md", lines)


if __name__ == "__main__":
    main()
