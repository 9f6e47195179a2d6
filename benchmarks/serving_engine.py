"""Serving benchmark on this machine: a real ``miras-serve`` process driven over HTTP with streaming.

Measures aggregate output tokens/s at concurrency 1, 8 and 32 (continuous batching), TTFT and ITL
percentiles, and the decode ITL after a short vs a long prompt (a recurrent state does not grow with
context, so it should be flat). Writes serving-engine-cpu.md into ``--out`` (default docs/benchmarks/).

    python -m benchmarks.serving_engine [--model DIR_OR_NAME] [--threads 1] [--long-prompt 8192]
"""

from __future__ import annotations

import argparse
import asyncio
import math
import random
import statistics
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import httpx
import torch

from benchmarks import report
from deploy.local.launch import miras_serve
from miras_serve import models
from miras_serve.loadtest.client import ApiConfig, send_request
from miras_serve.loadtest.stats import RequestResult, percentile
from miras_serve.loadtest.workload import RequestSpec
from miras_serve.server.engine import EngineConfig, LLMEngine
from miras_serve.server.request import RequestStatus
from miras_serve.server.sampling_params import SamplingParams

SERVED_NAME = "bench"
SAMPLE_TEXT = ("From fairest creatures we desire increase, that thereby beauty's rose might never die. "
               "Shall I compare thee to a summer's day? Thou art more lovely and more temperate. ") * 50


@dataclass
class ModelReport:
    model: str
    config: models.MirasConfig
    state_bytes: int
    rows: list[tuple]  # (concurrency, requests, tok/s, TTFT p50, TTFT p99, ITL p50, ITL p99)
    long_rows: list[tuple]  # (prompt tokens, ITL p50, ITL p99, TTFT p50)
    engine_rates: dict[int, float]  # batch -> decode tok/s, in process


def random_model(directory: Path, preset: str) -> Path:
    """A randomly initialised model of the preset's default size, with a small trained tokenizer."""
    torch.manual_seed(0)
    model = models.from_preset(preset).eval()
    tokenizer = models.train_tokenizer([SAMPLE_TEXT], vocab_size=model.config.vocab_size)
    return models.save_pretrained(model, tokenizer, directory / f"{preset}-random")


async def request(client: httpx.AsyncClient, api: ApiConfig, index: int, prompt: list[int], max_tokens: int,
                  t0: float) -> RequestResult:
    """One request streamed and timed by the load generator's client; a failed one stops the benchmark."""
    result = await send_request(client, api, RequestSpec(index, prompt, len(prompt), max_tokens), 0.0, t0)
    if not result.ok:
        raise RuntimeError(f"request {index} failed: {result.error} {result.error_detail}")
    return result


async def run_load(url: str, concurrency: int, num_requests: int, prompt_len: int, max_tokens: int,
                   vocab: int, text: list[int] | None = None) -> tuple[float, list[RequestResult]]:
    """Random token-id prompts, or windows of ``text`` (cycled) when it is given."""
    rng = random.Random(concurrency)
    if text:
        starts = [rng.randrange(len(text)) for _ in range(num_requests)]
        prompts = [[text[(s + i) % len(text)] for i in range(prompt_len)] for s in starts]
    else:
        prompts = [[rng.randrange(3, vocab) for _ in range(prompt_len)] for _ in range(num_requests)]
    gate = asyncio.Semaphore(concurrency)
    api = ApiConfig(url, SERVED_NAME, ignore_eos=True)  # greedy

    async def limited(client: httpx.AsyncClient, index: int, prompt: list[int]) -> RequestResult:
        async with gate:
            return await request(client, api, index, prompt, max_tokens, start)

    limits = httpx.Limits(max_connections=concurrency + 4)
    async with httpx.AsyncClient(timeout=600, limits=limits) as client:
        start = time.perf_counter()
        await request(client, api, -1, prompts[0][:8], 2, start)  # warm-up
        start = time.perf_counter()
        results = await asyncio.gather(*[limited(client, i, p) for i, p in enumerate(prompts)])
        return time.perf_counter() - start, results


def engine_decode_rates(model: str, threads: int, prompt_len: int, vocab: int,
                        steps: int = 32) -> dict[int, float]:
    """Tokens/s of the engine's decode steps alone (in process, no HTTP) at batch 1, 8, 32 and 64: one
    engine per batch size, their steps interleaved round-robin so that load on a shared machine hits
    every batch size alike; the median step."""
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        net, tokenizer = models.load_pretrained(model)
        rng, engines = random.Random(0), {}
        params = SamplingParams(temperature=0, max_tokens=1_000, ignore_eos=True)
        for batch in (1, 8, 32, 64):
            engine = engines[batch] = LLMEngine(net, tokenizer, EngineConfig(
                max_num_seqs=batch, max_num_batched_tokens=4096, state_cache_bytes=0))
            for i in range(batch):
                engine.add_request(f"{batch}-{i}", [rng.randrange(3, vocab) for _ in range(prompt_len)], params)
            while any(r.status is not RequestStatus.DECODING for r in engine.requests.values()):
                engine.step()
        times: dict[int, list[float]] = {batch: [] for batch in engines}
        for _ in range(steps):
            for batch, engine in engines.items():
                start = time.perf_counter()
                engine.step()
                times[batch].append(time.perf_counter() - start)
        return {batch: batch / statistics.median(t) for batch, t in times.items()}
    finally:
        torch.set_num_threads(before)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser("python -m benchmarks.serving_engine", description=__doc__,
                                formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--model", nargs="+", default=None, help="model directories or shipped names (default: "
                   "moneta-tiny if shipped, else random models of --preset at the default size)")
    p.add_argument("--preset", nargs="+", default=["linear", "moneta"], help="presets of the random models")
    p.add_argument("--threads", type=int, default=1, help="torch threads in the server (OMP_NUM_THREADS)")
    p.add_argument("--prompt-len", type=int, default=128)
    p.add_argument("--max-tokens", type=int, default=64)
    p.add_argument("--long-prompt", type=int, default=8192)
    p.add_argument("--port", type=int, default=None, help="the server's port (default: a free one)")
    report.add_out_argument(p)
    args = p.parse_args(argv)

    with tempfile.TemporaryDirectory() as tmp:
        names = args.model or (["moneta-tiny"] if "moneta-tiny" in models.shipped_models() else
                               [str(random_model(Path(tmp), preset)) for preset in args.preset])
        sections = [bench_model(args, name) for name in names]
    write_report(args, argv, sections)


def bench_model(args: argparse.Namespace, model: str) -> ModelReport:
    net, tokenizer = models.load_pretrained(model)
    config, vocab = net.config, min(tokenizer.vocab_size, net.config.vocab_size)
    # The short/long-prompt comparison uses English text: random ids can make a model emit byte fragments
    # that the server holds back until they form UTF-8, leaving too few chunks to time.
    text = tokenizer.encode(SAMPLE_TEXT)
    state_bytes = net.init_state(1).nbytes_per_sequence()
    del net
    engine_rates = engine_decode_rates(model, args.threads, args.prompt_len, vocab)
    print(f"{Path(model).name} engine decode tok/s: {engine_rates}", flush=True)
    server = miras_serve(model, "--max-num-seqs", "64", "--served-model-name", SERVED_NAME, port=args.port,
                         threads=args.threads)
    url = server.url
    try:
        rows = []
        for concurrency in (1, 8, 32):
            wall, results = asyncio.run(run_load(url, concurrency, max(8, 2 * concurrency), args.prompt_len,
                                                 args.max_tokens, vocab))
            itls = [x for r in results for x in r.itl]
            ttfts = [r.ttft for r in results if r.ttft is not None]
            rows.append((concurrency, len(results), sum(r.output_tokens for r in results) / wall, percentile(ttfts, 50),
                         percentile(ttfts, 99), percentile(itls, 50), percentile(itls, 99)))
            print(f"{Path(model).name} concurrency {concurrency}: {rows[-1][2]:.1f} tok/s", flush=True)
        # short and long prompts alternate, so background load hits both alike
        by_len: dict[int, list[RequestResult]] = {args.prompt_len: [], args.long_prompt: []}
        for _ in range(3):
            for prompt_len in by_len:
                by_len[prompt_len] += asyncio.run(run_load(url, 1, 1, prompt_len, args.max_tokens, vocab,
                                                           text))[1]
        long_rows = []
        for prompt_len, results in by_len.items():
            # Random prompts can make a model emit byte fragments that the server (rightly) holds back
            # until they form UTF-8, so a stream may carry too few chunks to time: then ITL is NaN.
            itls = [x for r in results for x in r.itl] or [math.nan]
            long_rows.append((prompt_len, statistics.median(itls), percentile(itls, 99),
                              percentile([r.ttft for r in results if r.ttft is not None], 50)))
    finally:
        server.stop(60)
    return ModelReport(model, config, state_bytes, rows, long_rows, engine_rates)


def write_report(args: argparse.Namespace, argv: list[str] | None, sections: list[ModelReport]) -> None:
    lines = report.header(
        "Serving engine on CPU: continuous batching and context-independent decode", __spec__.name, argv,
        f"the machine is shared by the server and this load generator (absolute times are a CPU's; compare ratios); "
        f"server threads {args.threads}",
        f"workload: random token-id prompts of {args.prompt_len} tokens, {args.max_tokens} output tokens "
        "(ignore_eos, greedy), streamed over HTTP from a real `miras-serve`; requests = max(8, 2 x concurrency), "
        "all submitted at once behind a concurrency limit.")
    for section in sections:
        model, config, rows, long_rows, engine_rates = (section.model, section.config, section.rows,
                                                        section.long_rows, section.engine_rates)
        base = rows[0][2]
        short, long = long_rows
        lines += [f"## `{Path(model).name}`: {config.preset}, memory {config.memory}, d_model {config.d_model}, "
                  f"{config.n_layers} layers, vocab {config.vocab_size}, chunk {config.chunk_size}", "",
                  f"Recurrent state per sequence: {section.state_bytes / 2**20:.2f} MiB, "
                  "whatever the context length.", "",
                  "| concurrency | requests | output tok/s | vs c=1 | TTFT p50 (ms) | TTFT p99 (ms) | ITL p50 (ms) | "
                  "ITL p99 (ms) |", "|---:|---:|---:|---:|---:|---:|---:|---:|"]
        for c, n, tps, t50, t99, i50, i99 in rows:
            lines.append(f"| {c} | {n} | {tps:.1f} | {tps / base:.2f}x | {t50 * 1e3:.1f} | {t99 * 1e3:.1f} | "
                         f"{i50 * 1e3:.2f} | {i99 * 1e3:.2f} |")
        lines += ["", "The engine alone (in process, no HTTP; decode steps only; one engine per batch size, their "
                  "steps interleaved, median step) on the same model:", "",
                  "| batch | decode tok/s | vs batch 1 |", "|---:|---:|---:|"]
        lines += [f"| {b} | {r:.1f} | {r / engine_rates[1]:.2f}x |" for b, r in engine_rates.items()]
        lines += ["", "Decode after a short and a long prompt cut from an English text (concurrency 1, 3 requests "
                  "each, alternating):", "",
                  "| prompt tokens | ITL p50 (ms) | ITL p99 (ms) | TTFT p50 (ms) |", "|---:|---:|---:|---:|"]
        lines += [f"| {n} | {i50 * 1e3:.2f} | {i99 * 1e3:.2f} | {t * 1e3:.1f} |" for n, i50, i99, t in long_rows]
        lines += ["", f"- Throughput at concurrency 32 vs 1: **{rows[-1][2] / base:.1f}x**",
                  f"- ITL p50 after a {long[0]}-token vs a {short[0]}-token prompt: " + (
                      f"**{long[1] / short[1]:.2f}x**" if math.isfinite(long[1] / short[1]) else
                      "not measured (the streams carried no text chunks to time: the model generated only "
                      "special tokens or byte fragments, which are not streamed as text)"), ""]
    lines += ["## Reading", "",
              "- Decode ITL does not grow with the prompt: the state a sequence carries has a fixed size, so an "
              "8K-token context decodes as fast as a 128-token one (the long prompt only costs prefill time, "
              "TTFT).",
              "- Continuous batching pays when a decode step is bound by the weights (read once per step, shared "
              "by the batch): the engine-alone table shows how much a model can gain; the HTTP table shows how "
              "much of it the server keeps. The MLP memories keep their decode state factored (the chunk anchor "
              "plus one factor row per token of the chunk, models/SPEC.md §7): a step reads the anchor and the "
              "rows and writes one row, instead of reading and writing the whole running memory, so per-sequence "
              "state work grows with the batch about half as fast as before (docs/benchmarks/models-cpu.md "
              "compares the two layouts in one run)."]
    print("\n".join(lines))
    report.write(args.out, "serving-engine-cpu.md", lines)


if __name__ == "__main__":
    main()
