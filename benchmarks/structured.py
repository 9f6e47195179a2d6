"""Structured outputs on CPU: (1) grammar engines compared on our tokenizer, (2) the grammar mask's cost per
decode step in the engine.

(1) For each installed engine (llguidance, xgrammar, outlines-core), on the shipped tokenizer (vocabulary 4,096)
and one JSON schema (nested object, bounded integers, an enum array, bounded strings): compile time, then random
walks through the grammar (each step: compute the allowed-token mask, turn it into a [vocab] boolean mask, pick a
random allowed token): mask time per token, and whether every walk ended in JSON that validates against the
schema, and whether a special token (<|pad|>, <|bos|>) was ever allowed. (2) The engine with moneta-tiny, batch
1 and 32, 48 sampled tokens per sequence: tokens/s unconstrained vs under a JSON schema, run alternately in one
process (best of --repeats).

    python -m benchmarks.structured [--walks 20] [--repeats 3]

Writes structured-cpu.md into ``--out``. Needs the `structured` extra; xgrammar and outlines-core are measured
when installed (pip install xgrammar outlines-core).
"""

from __future__ import annotations

import argparse
import contextlib
import itertools
import json
import random
import statistics
import time
from collections.abc import Callable

import jsonschema
import numpy as np
import torch

from benchmarks import report
from miras_serve.models import MirasTokenizer
from miras_serve.server.engine import EngineConfig, LLMEngine
from miras_serve.server.loader import load_model
from miras_serve.server.sampler import Sampler
from miras_serve.server.sampling_params import GuidedDecoding, SamplingParams
from miras_serve.server.structured import GrammarCompiler, allowed_mask

SCHEMA = {"type": "object", "properties": {
    "name": {"type": "string", "maxLength": 16},
    "age": {"type": "integer", "minimum": 18, "maximum": 99},
    "tags": {"type": "array", "items": {"enum": ["red", "green", "blue"]}, "maxItems": 4},
    "address": {"type": "object", "properties": {"city": {"type": "string", "maxLength": 12},
                                                 "zip": {"type": "integer", "minimum": 10000, "maximum": 99999}},
                "required": ["city", "zip"], "additionalProperties": False}},
    "required": ["name", "age", "tags", "address"], "additionalProperties": False}
# for the engine: a constraint that stays open (1,000 records at least) for the measured tokens
RECORDS = {"type": "array", "minItems": 1000, "items": {
    "type": "object", "properties": {"name": {"type": "string", "maxLength": 8},
                                     "n": {"type": "integer", "minimum": 0, "maximum": 999}, "ok": {"type": "boolean"}},
    "required": ["name", "n", "ok"], "additionalProperties": False}}
REQUEST_IDS = itertools.count()


class Walker:
    """One engine's matcher behind three calls: the allowed mask ([vocab] bool), accept a token, done."""

    def __init__(self, allowed: Callable[[], torch.Tensor], accept: Callable[[int], None], done: Callable[[], bool]):
        self.allowed, self.accept, self.done = allowed, accept, done


def llguidance_engine(tokenizer: MirasTokenizer, vocab: int, eos: int):
    import llguidance
    import llguidance.numpy as llg_numpy

    tok = llguidance.LLTokenizer(tokenizer.tokenizer.to_str(), n_vocab=vocab, eos_token=eos)

    def compile_(schema: dict) -> Callable[[], Walker]:
        grammar = llguidance.LLMatcher.grammar_from_json_schema(schema, defaults={"whitespace_flexible": False})
        template = llguidance.LLMatcher(tok, grammar, log_level=0)

        def new() -> Walker:  # as the server makes them: copies share the compiled grammar
            m = template.deep_copy()
            bitmask = np.zeros((1, (vocab + 31) // 32), dtype=np.int32)

            def allowed() -> torch.Tensor:
                llg_numpy.fill_next_token_bitmask(m, bitmask, 0)
                return allowed_mask(bitmask, vocab, torch.device("cpu"))[0]

            return Walker(allowed, m.consume_token, m.is_stopped)
        return new
    return compile_


def xgrammar_engine(tokenizer: MirasTokenizer, vocab: int, eos: int):
    import xgrammar as xgr
    from transformers import PreTrainedTokenizerFast

    hf = PreTrainedTokenizerFast(tokenizer_object=tokenizer.tokenizer)
    compiler = xgr.GrammarCompiler(xgr.TokenizerInfo.from_huggingface(hf, vocab_size=vocab, stop_token_ids=[eos]))

    def compile_(schema: dict) -> Callable[[], Walker]:
        compiled = compiler.compile_json_schema(json.dumps(schema), any_whitespace=False)

        def new() -> Walker:
            m = xgr.GrammarMatcher(compiled)
            bitmask = xgr.allocate_token_bitmask(1, vocab)

            def allowed() -> torch.Tensor:
                m.fill_next_token_bitmask(bitmask)
                return allowed_mask(bitmask.numpy(), vocab, torch.device("cpu"))[0]

            return Walker(allowed, m.accept_token, m.is_terminated)
        return new
    return compile_


def outlines_core_engine(tokenizer: MirasTokenizer, vocab: int, eos: int):
    from outlines_core import Guide, Index, Vocabulary
    from outlines_core.json_schema import build_regex_from_schema

    # no loader for a local tokenizer: a hand-built vocabulary of the tokens whose bytes are whole UTF-8 text
    tokens: dict[str, list[int]] = {}
    for i in range(vocab):
        if i == eos or i in tokenizer.special_ids:
            continue
        with contextlib.suppress(UnicodeDecodeError):
            tokens.setdefault(tokenizer.token_bytes(i).decode("utf-8"), []).append(i)
    vocabulary = Vocabulary(eos, tokens)

    def compile_(schema: dict) -> Callable[[], Walker]:
        index = Index(build_regex_from_schema(json.dumps(schema)), vocabulary)

        def new() -> Walker:
            guide = Guide(index)

            def allowed() -> torch.Tensor:
                mask = torch.zeros(vocab, dtype=torch.bool)
                mask[torch.tensor(guide.get_tokens(), dtype=torch.long)] = True
                return mask

            return Walker(allowed, guide.advance, guide.is_finished)
        return new
    return compile_


ENGINES = {"llguidance": llguidance_engine, "xgrammar": xgrammar_engine, "outlines-core": outlines_core_engine}


def walk(new: Callable[[], Walker], tokenizer: MirasTokenizer, eos: int, rng: random.Random
         ) -> tuple[list[float], bool, bool]:
    """One random walk: mask seconds per step, whether a special token was ever allowed, and whether the text
    is JSON that validates."""
    walker, ids, times, special = new(), [], [], False
    for _ in range(400):
        start = time.perf_counter()
        mask = walker.allowed()
        times.append(time.perf_counter() - start)
        special |= bool(mask[[i for i in tokenizer.special_ids if i != eos]].any())
        choices = mask.nonzero().flatten().tolist()
        if not choices:
            break
        token = eos if eos in choices and (len(choices) == 1 or rng.random() < 0.5) else rng.choice(
            [c for c in choices if c != eos] or choices)
        if token == eos:
            break
        walker.accept(token)
        ids.append(token)
        if walker.done():
            break
    try:
        jsonschema.validate(json.loads(tokenizer.decode(ids)), SCHEMA)
        valid = True
    except (ValueError, jsonschema.ValidationError):
        valid = False
    return times, special, valid


def compare_engines(tokenizer: MirasTokenizer, vocab: int, eos: int, walks: int) -> list[tuple]:
    rows = []
    for name, make in ENGINES.items():
        try:
            compile_ = make(tokenizer, vocab, eos)
        except ImportError as exc:
            print(f"{name}: not installed ({exc})")
            continue
        start = time.perf_counter()
        new = compile_(SCHEMA)
        compile_ms = (time.perf_counter() - start) * 1e3
        rng = random.Random(0)
        times, specials, valid = [], 0, 0
        for _ in range(walks):
            t, special, ok = walk(new, tokenizer, eos, rng)
            times += t
            specials += special
            valid += ok
        rows.append((name, compile_ms, statistics.median(times) * 1e6, statistics.mean(times) * 1e6, valid, walks,
                     specials))
        print(f"{name}: compile {compile_ms:.1f} ms, mask median {rows[-1][2]:.0f} us mean {rows[-1][3]:.0f} us, "
              f"valid {valid}/{walks}, special tokens allowed in {specials} walks", flush=True)
    return rows


def tokens_per_second(engine: LLMEngine, batch: int, params: SamplingParams) -> float:
    for i in range(batch):
        engine.add_request(f"b{next(REQUEST_IDS)}", [1, 40 + i, 50, 60], params)
    generated, start = 0, time.perf_counter()
    while engine.has_unfinished():
        for out in engine.step():
            generated += sum(len(o.token_ids) for o in out.outputs)
    return generated / (time.perf_counter() - start)


def engine_overhead(model_name: str, batches: list[int], repeats: int) -> list[tuple]:
    model, tokenizer = load_model(model_name)
    engine = LLMEngine(model, tokenizer, EngineConfig(max_num_seqs=max(batches), state_cache_bytes=0))
    plain = SamplingParams(temperature=1.0, seed=0, max_tokens=48, ignore_eos=True)
    guided = SamplingParams(temperature=1.0, seed=0, max_tokens=48, ignore_eos=True,
                            guided=GuidedDecoding("json", json.dumps(RECORDS), "guided_json"))
    tokens_per_second(engine, 2, guided)  # warm-up
    rows = []
    for batch in batches:
        best = {"plain": 0.0, "guided": 0.0}
        for _ in range(repeats):
            for name, params in (("plain", plain), ("guided", guided)):
                best[name] = max(best[name], tokens_per_second(engine, batch, params))
        rows.append((batch, best["plain"], best["guided"]))
        print(f"batch {batch}: {best['plain']:.0f} tokens/s unconstrained, {best['guided']:.0f} constrained "
              f"({best['guided'] / best['plain']:.2f}x)", flush=True)
    return rows


def sampler_step_ms(tokenizer: MirasTokenizer, batch: int, guided: bool, steps: int = 48) -> float:
    """Median milliseconds of one sampling step (the mask stage included, and advancing the matchers) for a batch
    of rows sampling random logits: the host cost the grammar adds, without the model's noise."""
    vocab, eos = tokenizer.vocab_size, tokenizer.eos_token_id
    sampler = Sampler(batch, vocab, eos, torch.device("cpu"), torch.Generator().manual_seed(0))
    compiler = GrammarCompiler(tokenizer.tokenizer.to_str(), vocab, eos)
    spec = GuidedDecoding("json", json.dumps(RECORDS), "guided_json")
    matchers = [compiler.matcher(spec) if guided else None for _ in range(batch)]
    for slot, matcher in enumerate(matchers):
        sampler.add(slot, SamplingParams(temperature=1.0, seed=slot), 0, [1], matcher)
    logits = torch.randn(batch, vocab, generator=torch.Generator().manual_seed(1))
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        tokens, _ = sampler.sample(logits, list(range(batch)))
        for matcher, token in zip(matchers, tokens, strict=True):
            if matcher is not None:
                matcher.accept(token)
        times.append(time.perf_counter() - start)
    return statistics.median(times) * 1e3


def sampler_overhead(tokenizer: MirasTokenizer, batches: list[int]) -> list[tuple]:
    rows = []
    for batch in batches:
        plain, guided = sampler_step_ms(tokenizer, batch, False), sampler_step_ms(tokenizer, batch, True)
        rows.append((batch, plain, guided))
        print(f"batch {batch}: sampling step {plain:.2f} ms unconstrained, {guided:.2f} ms constrained", flush=True)
    return rows


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="moneta-tiny")
    p.add_argument("--walks", type=int, default=20)
    p.add_argument("--batches", type=int, nargs="+", default=[1, 32])
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--threads", type=int, default=1)
    report.add_out_argument(p)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    _, tokenizer = load_model(args.model)
    vocab, eos = tokenizer.vocab_size, tokenizer.eos_token_id
    engines = compare_engines(tokenizer, vocab, eos, args.walks)
    sampling = sampler_overhead(tokenizer, args.batches)
    overhead = engine_overhead(args.model, args.batches, args.repeats)
    write_report(args, argv, vocab, engines, sampling, overhead)


def write_report(args: argparse.Namespace, argv: list[str] | None, vocab: int, engines: list[tuple],
                 sampling: list[tuple], overhead: list[tuple]) -> None:
    versions = []
    for package in ("llguidance", "xgrammar", "outlines_core"):
        with contextlib.suppress(ImportError, AttributeError):
            versions.append(f"{package} {__import__(package).__version__}")
    lines = [
        *report.header("Structured outputs: grammar engines and the mask's cost per decode step (CPU)",
                       __spec__.name, argv, f"{torch.get_num_threads()} torch thread(s); {', '.join(versions)}"),
        f"## Engines on the `{args.model}` tokenizer (byte-level BPE, vocabulary {vocab:,})", "",
        f"One JSON schema (nested object, bounded integers, an enum array, bounded strings); {args.walks} random "
        "walks each (a random allowed token per step, EOS taken half the time it is allowed). Mask time: computing "
        "the allowed tokens and turning them into a [vocab] boolean mask, per token.", "",
        "| engine | compile | mask per token (median) | mean | walks ending in valid JSON | walks where a special "
        "token was allowed |", "|---|---|---|---|---|---|"]
    for name, compile_ms, median, mean, valid, walks, specials in engines:
        lines.append(f"| {name} | {compile_ms:.1f} ms | {median:.0f} µs | {mean:.0f} µs | {valid}/{walks} "
                     f"| {specials}/{walks} |")
    lines += ["", "## The sampling step alone (host work the grammar adds)", "",
              "The batched sampler on random logits (temperature 1), every row under the records schema below or "
              "none, the matchers advanced with each token as the engine does; median of 48 steps.", "",
              "| batch | unconstrained step | constrained step | added per step | added per row |",
              "|---|---|---|---|---|"]
    for batch, plain, guided in sampling:
        lines.append(f"| {batch} | {plain:.2f} ms | {guided:.2f} ms | {guided - plain:.2f} ms "
                     f"| {(guided - plain) / batch * 1e3:.0f} µs |")
    lines += ["", f"## Mask overhead in the engine (`{args.model}`, in process, 48 sampled tokens per sequence)", "",
              "Unconstrained vs a JSON schema (an array of records: strings, bounded integers, booleans) on every "
              "row, run alternately in one process, best of "
              f"{args.repeats}. Tokens/s counts every sampled token, prefill included (4-token prompts).", "",
              "| batch | unconstrained tokens/s | constrained tokens/s | ratio |", "|---|---|---|---|"]
    for batch, plain, guided in overhead:
        lines.append(f"| {batch} | {plain:,.0f} | {guided:,.0f} | {guided / plain:.2f}x |")
    report.write(args.out, "structured-cpu.md", lines)


if __name__ == "__main__":
    main()
