"""A long conversation through the Responses API vs chat completions resending its history, over HTTP
against real ``miras-serve`` processes on this machine; and the restore latency of a saved state from
memory and from disk (after a restart).

A greedy conversation (a ~25-token question, a ``--reply-tokens`` reply per turn) is built through the
Responses API and, on the same server, as chat completions (the same text every turn). Then the next turn
after k turns is sent three ways, interleaved so that load on the machine hits them alike: by reference
(``previous_response_id``: the client sends only the question), as a chat completion resending the whole
history to the same server (its state cache restores the history's prefix, but the request, its
rendering and its lookup grow with it), and to a server without state cache (everything prefilled
again). Measured: time to the first streamed text (median). Then the server is restarted on the same
``--state-disk-dir`` and the stored conversation continued after k turns: the state comes from disk.
Last, the server's own work for a turn (render, tokenize, keys, store; no model) is timed in process over
a synthetic conversation of 10,000 turns.

    python -m benchmarks.responses [--model moneta-tiny] [--marks 1 10 50] [--repeats 5]

Writes responses-cpu.md into ``--out`` (default docs/benchmarks/).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import tempfile
import time

import httpx
from prometheus_client.parser import text_string_to_metric_families

from benchmarks import report
from deploy.local.launch import miras_serve
from miras_serve.server.async_engine import AsyncEngine
from miras_serve.server.engine import EngineConfig, LLMEngine
from miras_serve.server.limits import TextLimits
from miras_serve.server.loader import load_model
from miras_serve.server.response_store import ResponseStore, StoredResponse
from miras_serve.server.serving_responses import OpenAIServingResponses

TOPICS = ["the king", "the sea", "a rose", "the night", "a letter", "the war", "a song", "the moon", "a friend",
          "the storm", "a crown", "the garden"]


def question(turn: int) -> str:
    return f"Now tell me, good friend, what thou knowest of {TOPICS[turn % len(TOPICS)]} (turn {turn})."


def stream(client: httpx.Client, path: str, body: dict) -> tuple[float, str, dict]:
    """POST a streaming request; seconds to the first text, the whole text, and the final event's data."""
    start, first, text, last = time.perf_counter(), None, "", {}
    with client.stream("POST", path, json={**body, "stream": True}) as response:
        response.raise_for_status()
        for line in response.iter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            data = json.loads(line[6:])
            piece = data.get("delta") if data.get("type") == "response.output_text.delta" else \
                (data.get("choices") or [{}])[0].get("delta", {}).get("content")
            if piece:
                first = first or time.perf_counter() - start
                text += piece
            last = data
    return first if first is not None else time.perf_counter() - start, text, last


def restore_seconds(url: str) -> dict[str, tuple[float, int]]:
    """Per tier: mean restore latency and count, from the server's histogram."""
    totals: dict[tuple[str, str], float] = {}
    for family in text_string_to_metric_families(httpx.get(f"{url}/metrics", timeout=10).text):
        for s in family.samples:
            if s.name.startswith("miras:state_restore_seconds_") and s.name[-4:] in ("_sum", "ount"):
                totals[(s.labels["tier"], s.name.rsplit("_", 1)[1])] = s.value
    return {tier: (totals[(tier, "sum")] / totals[(tier, "count")], int(totals[(tier, "count")]))
            for tier in ("memory", "disk") if totals.get((tier, "count"))}


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="moneta-tiny")
    p.add_argument("--marks", type=int, nargs="+", default=[1, 10, 50], help="turns before the measured one")
    p.add_argument("--repeats", type=int, default=5, help="measurements per mark and way (interleaved)")
    p.add_argument("--reply-tokens", type=int, default=16)
    p.add_argument("--bookkeeping-marks", type=int, nargs="+", default=[100, 1000, 10000])
    p.add_argument("--threads", type=int, default=1, help="torch threads per server (OMP_NUM_THREADS)")
    report.add_out_argument(p)
    args = p.parse_args(argv)
    disk = tempfile.mkdtemp(prefix="miras-bench-states-")
    cached_flags = ("--served-model-name", "m", "--state-disk-dir", disk)
    servers = {"cached": miras_serve(args.model, "--max-num-seqs", "4", *cached_flags, threads=args.threads),
               "plain": miras_serve(args.model, "--max-num-seqs", "4", "--served-model-name", "m",
                                     "--state-cache-gb", "0")}
    urls = {name: server.url for name, server in servers.items()}
    cached, plain = (httpx.Client(base_url=urls[name], timeout=600) for name in ("cached", "plain"))
    ttft: dict[tuple[str, int], list[float]] = {}
    agree = {"chat, state cache on": 0, "chat, no state cache": 0}
    try:
        ids, histories, history_tokens = build_conversation(cached, max(args.marks), args.reply_tokens)
        ways = {"Responses": lambda k, q: respond(cached, ids[k], q),
                "chat, state cache on": lambda k, q: chat(cached, histories[k], q),
                "chat, no state cache": lambda k, q: chat(plain, histories[k], q)}
        for rep in range(args.repeats):  # interleaved, so load drift on the machine hits every column alike
            for k in args.marks:
                q = question(k + 1) + f" (take {rep})"
                texts = {}
                for way, send in ways.items():
                    seconds, texts[way] = send(k, q)
                    ttft.setdefault((way, k), []).append(seconds)
                for way in agree:
                    agree[way] += texts[way] == texts["Responses"]
            print(f"repeat {rep + 1}/{args.repeats} done", flush=True)
        memory = restore_seconds(urls["cached"])
        servers["cached"].restart(60)  # SIGTERM first: drain, flush the disk tier
        stream(cached, "/v1/responses", {"model": "m", "input": "warm up", "max_output_tokens": 1, "store": False})
        for k in args.marks:  # the restarted server's memory is empty: each state comes from disk
            ttft[("restarted", k)] = [respond(cached, ids[k], question(k + 1))[0]]
        restored = restore_seconds(urls["cached"])
    finally:
        for server in servers.values():
            server.kill()
    total = args.repeats * len(args.marks)
    per_turn = bookkeeping(args.model, args.bookkeeping_marks)
    write_report(args, argv, ttft, history_tokens, {way: f"{n}/{total}" for way, n in agree.items()}, memory,
                 restored, per_turn)


def bookkeeping(model: str, marks: list[int]) -> dict[int, float]:
    """The server's own work for a turn by reference, without the model: render and tokenize the
    continuation, derive the state keys, store the response. Timed in process over a synthetic conversation
    of ``max(marks)`` turns; mean of the 100 turns ending at each mark."""
    net, tokenizer = load_model(model)
    serving = OpenAIServingResponses(AsyncEngine(LLMEngine(net, tokenizer, EngineConfig(max_num_seqs=1))),
                                     "m", 30.0, TextLimits(tokenizer, 1 << 30),
                                     store=ResponseStore(max(marks) + 1, 1 << 40, 0))
    reply = "I know not, my lord, but I shall learn it of the sea."
    generated = tokenizer.encode(" " + reply)
    previous, times = None, {}
    for turn in range(1, max(marks) + 1):
        start = time.perf_counter()
        step = asyncio.run(serving._turn([{"role": "user", "content": question(turn)}], previous, "bench"))
        previous = StoredResponse(f"r{turn}", "", "bench", {"id": f"r{turn}"}, step.conversation, step.length,
                                  generated, reply, step.key(step.prompt), step.key(step.prompt + generated[:-1]))
        serving.store.put(previous)
        times[turn] = time.perf_counter() - start
    return {mark: statistics.mean(times[t] for t in range(max(1, mark - 99), mark + 1)) for mark in marks}


def build_conversation(client: httpx.Client, turns: int, reply_tokens: int
                       ) -> tuple[dict[int, str], dict[int, list[dict[str, str]]], dict[int, int]]:
    """A greedy conversation of ``turns`` turns by reference, and the same as chat turns resending their
    history to the same server (so its state cache holds what a real chat client's turns leave there). Per
    turn k: the response id, the chat history, and the conversation's length in tokens."""
    ids, histories, lengths, previous, messages = {}, {}, {}, None, []
    for turn in range(1, turns + 1):
        body = {"model": "m", "temperature": 0, "input": question(turn), "max_output_tokens": reply_tokens,
                **({"previous_response_id": previous} if previous else {})}
        _, reply, done = stream(client, "/v1/responses", body)
        previous = ids[turn] = done["response"]["id"]
        messages.append({"role": "user", "content": question(turn)})
        _, chat_reply, _ = stream(client, "/v1/chat/completions", {"model": "m", "temperature": 0,
                                                                  "messages": messages, "max_tokens": reply_tokens})
        assert chat_reply == reply, f"turn {turn}: Responses and chat disagree"
        messages.append({"role": "assistant", "content": reply})
        histories[turn], lengths[turn] = list(messages), done["response"]["usage"]["input_tokens"]
    print(f"built a {turns}-turn conversation ({lengths[turns]:,} tokens)", flush=True)
    return ids, histories, lengths


def respond(client: httpx.Client, previous: str, text: str) -> tuple[float, str]:
    body = {"model": "m", "temperature": 0, "input": text, "max_output_tokens": 1, "store": False,
            "previous_response_id": previous}
    seconds, reply, _ = stream(client, "/v1/responses", body)
    return seconds, reply


def chat(client: httpx.Client, history: list[dict[str, str]], text: str) -> tuple[float, str]:
    body = {"model": "m", "temperature": 0, "max_tokens": 1,
            "messages": [*history, {"role": "user", "content": text}]}
    seconds, reply, _ = stream(client, "/v1/chat/completions", body)
    return seconds, reply


def write_report(args: argparse.Namespace, argv: list[str] | None, ttft: dict, history: dict, agree: dict,
                 memory: dict, restored: dict, per_turn: dict[int, float]) -> None:

    def ms(values: list[float] | None) -> str:
        return "-" if not values else f"{statistics.median(values) * 1e3:,.1f} ms"

    lines = [
        *report.header(
            "Responses API: time to first token of a turn after 1, 10, 50 turns (CPU, over HTTP)", __spec__.name, argv,
            f"{args.threads} torch thread(s) per server",
            f"model `{args.model}`; a greedy conversation of {max(args.marks)} turns (a ~25-token question, a "
            f"{args.reply_tokens}-token reply) is built through the Responses API and, on the same server, as chat "
            "completions (same text every turn). Then the next turn after k turns (a new question) is sent three "
            f"ways, interleaved, {args.repeats} times each: by reference (`previous_response_id`, `store: false`), "
            "as a chat completion resending the history to that server (state cache on), and to a server with "
            "`--state-cache-gb 0`. Last column: the first continuation after a restart on the same "
            "`--state-disk-dir` (one sample; the state comes from disk).",
            "TTFT: request sent -> first streamed text, median; client and servers share the cores."),
        "| after k turns | conversation (tokens) | Responses, `previous_response_id` | chat, history resent, "
        "state cache on | chat, history resent, no state cache | Responses after a restart (from disk) |",
        "|---|---|---|---|---|---|",
    ]
    for k in args.marks:
        lines.append(f"| {k} | {history[k]:,} | {ms(ttft[('Responses', k)])} | "
                     f"{ms(ttft[('chat, state cache on', k)])} | {ms(ttft[('chat, no state cache', k)])} | "
                     f"{ms(ttft.get(('restarted', k)))} |")
    first, last = (statistics.median(ttft[("Responses", k)]) for k in (args.marks[0], args.marks[-1]))
    plain = statistics.median(ttft[("chat, no state cache", args.marks[-1])])
    lines += ["", f"Responses TTFT after {args.marks[-1]} turns / after {args.marks[0]}: {last / first:.2f}x; "
              f"chat without state cache after {args.marks[-1]} turns: {plain / last:.1f}x the Responses turn. "
              f"First tokens equal to the Responses ones: {', '.join(f'{w} {n}' for w, n in agree.items())} "
              "(fp32 sums in another order can flip a near-tie over a long prefill).", "",
              "## Restoring a saved state into a slot", "",
              "From the server's `miras:state_restore_seconds` histogram (read and checked from the tier, then "
              "copied into the slot); the disk row is the restarted server, whose memory tier starts empty.", "",
              "| tier | restores | mean |", "|---|---|---|"]
    for tier, (mean, count) in [("memory", memory.get("memory", (0.0, 0))), ("disk", restored.get("disk", (0.0, 0)))]:
        lines.append(f"| {tier} | {count} | {mean * 1e3:,.2f} ms |")
    lines += ["", "## The server's own work per turn, up to 10,000 turns", "",
              "Rendering and tokenizing the continuation, deriving the state keys and storing the response (no "
              "model), in process over one synthetic conversation; mean of the 100 turns ending at the mark. "
              "The engine's part restores the state by its key and prefills the turn's own tokens: neither "
              "depends on the history either.", "",
              "| after k turns | " + " | ".join(f"{k:,}" for k in per_turn) + " |",
              "|---|" + "---|" * len(per_turn),
              "| per turn | " + " | ".join(f"{t * 1e3:.3f} ms" for t in per_turn.values()) + " |"]
    report.write(args.out, "responses-cpu.md", lines)


if __name__ == "__main__":
    main()
