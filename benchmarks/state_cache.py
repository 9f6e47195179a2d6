"""Multi-turn chat with and without the state cache, in process (the engine, no HTTP) on this machine.

For each history length H: turn 1 is an H-token prompt and a 16-token greedy reply; turn 2 sends the
whole conversation again (as token ids: prompt, reply, then a 24-token question), as chat clients resend
their history. (Over a chat template the reply comes back as text and may be prefilled again too.)
Measured: time to the first token of turn 2, and of the same request sent twice ("regenerate"), with
the cache (the state after turn 1 is restored, only the new tokens are prefilled) and without
(everything is prefilled again). Both engines run side by side in one process; the report gives their
ratio.

    python -m benchmarks.state_cache [--model moneta-tiny] [--histories 256 1024 4096 16384]

Writes state-cache-cpu.md into ``--out`` (default docs/benchmarks/).
"""

from __future__ import annotations

import argparse
import itertools
import time

import torch

from benchmarks import report
from miras_serve.server.engine import EngineConfig, LLMEngine
from miras_serve.server.loader import load_model
from miras_serve.server.sampling_params import SamplingParams

REPLY = SamplingParams(temperature=0.0, max_tokens=16, ignore_eos=True)
FIRST_TOKEN = SamplingParams(temperature=0.0, max_tokens=1, ignore_eos=True)
REQUEST_IDS = itertools.count()


def complete(engine: LLMEngine, prompt: list[int], params: SamplingParams) -> tuple[list[int], float]:
    """Run one request to the end; its tokens and the seconds to its first token."""
    start = time.perf_counter()
    engine.add_request(f"bench-{next(REQUEST_IDS)}", prompt, params)
    tokens: list[int] = []
    first = None
    while engine.has_unfinished():
        for out in engine.step():
            tokens += out.outputs[0].token_ids if out.outputs else []
            if first is None and tokens:
                first = time.perf_counter() - start
    return tokens, first


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="moneta-tiny")
    p.add_argument("--histories", type=int, nargs="+", default=[256, 1024, 4096, 16384])
    p.add_argument("--threads", type=int, default=1)
    report.add_out_argument(p)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    model, tokenizer = load_model(args.model)
    config = dict(max_num_seqs=4, max_num_batched_tokens=4096)
    cached = LLMEngine(model, tokenizer, EngineConfig(**config))
    plain = LLMEngine(model, tokenizer, EngineConfig(**config, state_cache_bytes=0))
    generator = torch.Generator().manual_seed(0)
    rows = []
    for history in args.histories:
        prompt = torch.randint(3, tokenizer.vocab_size, (history,), generator=generator).tolist()
        question = torch.randint(3, tokenizer.vocab_size, (24,), generator=generator).tolist()
        reply, _ = complete(cached, prompt, REPLY)
        assert complete(plain, prompt, REPLY)[0] == reply, "the engines disagree on turn 1"
        turn2 = prompt + reply + question
        times = {}
        for name, engine in (("cached", cached), ("plain", plain)):
            first, times[f"{name} next turn"] = complete(engine, turn2, FIRST_TOKEN)
            again, times[f"{name} regenerate"] = complete(engine, turn2, FIRST_TOKEN)
            times[f"{name} tokens"] = (first, again)
        assert times["cached tokens"] == times["plain tokens"], "cached and plain first tokens differ"
        rows.append((history, len(turn2), times))
        print(f"history {history:>6}: next turn {times['plain next turn'] * 1e3:8.1f} ms -> "
              f"{times['cached next turn'] * 1e3:7.1f} ms; regenerate {times['plain regenerate'] * 1e3:8.1f} ms -> "
              f"{times['cached regenerate'] * 1e3:7.1f} ms", flush=True)
    write_report(args, argv, rows, model.config.chunk_size, cached.pool.nbytes_per_sequence())


def write_report(args: argparse.Namespace, argv: list[str] | None, rows: list, chunk_size: int,
                 state_bytes: int) -> None:
    lines = [
        *report.header(
            "State cache: time to first token of a follow-up turn (CPU, in process)", __spec__.name, argv,
            f"{torch.get_num_threads()} torch thread(s)",
            f"model: `{args.model}` (chunk {chunk_size}, state {state_bytes / 2**20:.1f} MiB per sequence); engine "
            "with max_num_batched_tokens 4096",
            "turn 1: H random tokens + a 16-token greedy reply; turn 2: the whole conversation as token ids + 24 new "
            "tokens (over a chat template the reply is re-rendered from text; with the shipped models' template it "
            "re-renders as generated and is not prefilled again: see docs/serving.md). "
            "Both engines (state cache on / off) run side by side in one process and produce the same tokens."),
        "| history H | turn-2 prompt | next turn: no cache | with cache | speed-up | regenerate: no cache "
        "| with cache | speed-up |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for history, prompt_len, t in rows:
        lines.append(
            f"| {history:,} | {prompt_len:,} | {t['plain next turn'] * 1e3:,.1f} ms "
            f"| {t['cached next turn'] * 1e3:,.1f} ms "
            f"| {t['plain next turn'] / t['cached next turn']:,.1f}x | {t['plain regenerate'] * 1e3:,.1f} ms "
            f"| {t['cached regenerate'] * 1e3:,.1f} ms | {t['plain regenerate'] / t['cached regenerate']:,.1f}x |")
    lines += ["", "With the cache the next turn prefills only what is new (the last reply token and the question), "
              "so its time to first token stays flat as the history grows; a regenerated request prefills nothing. "
              "Without it, the whole conversation is prefilled again at every turn.", ""]
    report.write(args.out, "state-cache-cpu.md", lines)


if __name__ == "__main__":
    main()
