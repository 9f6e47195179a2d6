"""A long conversation through the Responses API vs chat completions resending its history, over HTTP
against real ``miras-serve`` processes on this machine; and the restore latency of a saved state from
memory and from disk (after a restart).

One greedy conversation of ``--turns`` turns (a ~20-token question, a ``--reply-tokens`` reply) is held
three ways side by side, turn by turn: by reference (``previous_response_id``, the client sends only the
question), as chat completions resending the whole history to the same server (its state cache restores
the history's prefix, but the request, its rendering and the lookup grow with it), and as chat
completions to a server without state cache (everything prefilled again). All three produce the same
text. Measured: time to the first streamed text of a turn (median over the turns ending at the mark).
Then the server is restarted on the same ``--state-disk-dir`` and the stored conversation continued at
the same turns: the state comes from disk.

    python -m server.bench_responses [--model moneta-tiny] [--turns 50] [--marks 1 10 50]

Writes docs/benchmarks/responses-cpu.md.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import socket
import statistics
import subprocess
import tempfile
import time
from pathlib import Path

import httpx
from prometheus_client.parser import text_string_to_metric_families

from .bench import start_server

REPORT = Path(__file__).resolve().parent.parent / "docs" / "benchmarks" / "responses-cpu.md"
WINDOW = 3  # turns per measurement, ending at the mark
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


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


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
    p.add_argument("--turns", type=int, default=50)
    p.add_argument("--marks", type=int, nargs="+", default=[1, 10, 50])
    p.add_argument("--reply-tokens", type=int, default=16)
    p.add_argument("--threads", type=int, default=1, help="torch threads per server (OMP_NUM_THREADS)")
    p.add_argument("--out", type=Path, default=REPORT)
    args = p.parse_args(argv)
    measured = {t for mark in args.marks for t in range(max(1, mark - WINDOW + 1), mark + 1)}
    disk = tempfile.mkdtemp(prefix="miras-bench-states-")
    cached_flags = ("--served-model-name", "m", "--state-disk-dir", disk)
    ports = {"cached": free_port(), "plain": free_port()}
    servers = {"cached": start_server(args.model, ports["cached"], args.threads, 4, *cached_flags),
               "plain": start_server(args.model, ports["plain"], args.threads, 4, "--served-model-name", "m",
                                     "--state-cache-gb", "0")}
    urls = {name: f"http://127.0.0.1:{port}" for name, port in ports.items()}
    cached, plain = (httpx.Client(base_url=urls[name], timeout=600) for name in ("cached", "plain"))
    sampling = {"model": "m", "temperature": 0}
    ttft: dict[str, dict[int, float]] = {k: {} for k in ("responses", "chat cached", "chat plain", "restarted")}
    history_tokens, previous, messages, ids = {}, None, [], {}
    try:
        for turn in range(1, args.turns + 1):
            body = {**sampling, "input": question(turn), "max_output_tokens": args.reply_tokens}
            if previous:
                body["previous_response_id"] = previous
            ttft["responses"][turn], reply, done = stream(cached, "/v1/responses", body)
            previous = ids[turn] = done["response"]["id"]
            history_tokens[turn] = done["response"]["usage"]["input_tokens"]
            messages.append({"role": "user", "content": question(turn)})
            chat = {**sampling, "messages": messages, "max_tokens": args.reply_tokens}
            ttft["chat cached"][turn], chat_reply, _ = stream(cached, "/v1/chat/completions", chat)
            if turn in measured:
                ttft["chat plain"][turn], plain_reply, _ = stream(plain, "/v1/chat/completions", chat)
                assert plain_reply == chat_reply, f"turn {turn}: the servers disagree"
            assert chat_reply == reply, f"turn {turn}: Responses and chat disagree"
            messages.append({"role": "assistant", "content": reply})
            print(f"turn {turn:>3}: history {history_tokens[turn]:>6} tokens, TTFT responses "
                  f"{ttft['responses'][turn] * 1e3:7.1f} ms, chat (cached) {ttft['chat cached'][turn] * 1e3:7.1f} ms"
                  + (f", chat (no cache) {ttft['chat plain'][turn] * 1e3:7.1f} ms" if turn in ttft["chat plain"]
                     else ""), flush=True)
        memory = restore_seconds(urls["cached"])
        servers["cached"].terminate()  # SIGTERM: drain, flush the disk tier
        servers["cached"].wait(60)
        servers["cached"] = start_server(args.model, ports["cached"], args.threads, 4, *cached_flags)
        for turn in sorted(measured):  # continue the stored conversation after ``turn``: its state is on disk
            body = {**sampling, "input": question(turn + 1), "max_output_tokens": args.reply_tokens,
                    "previous_response_id": ids[turn], "store": False}
            ttft["restarted"][turn + 1], _, _ = stream(cached, "/v1/responses", body)
        restored = restore_seconds(urls["cached"])
    finally:
        for proc in servers.values():
            proc.kill()
            proc.wait()
    write_report(args, ttft, history_tokens, memory, restored)


def at(series: dict[int, float], mark: int) -> float | None:
    values = [series[t] for t in range(max(1, mark - WINDOW + 1), mark + 1) if t in series]
    return statistics.median(values) if values else None


def write_report(args: argparse.Namespace, ttft: dict, history: dict, memory: dict, restored: dict) -> None:
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                            cwd=Path(__file__).parent).stdout.strip() or "unknown"

    def ms(value: float | None) -> str:
        return "-" if value is None else f"{value * 1e3:,.1f} ms"

    lines = [
        "# Responses API: time to first token of a turn after 1, 10, 50 turns (CPU, over HTTP)", "",
        f"- machine: {platform.machine()} CPU, {os.cpu_count()} cores, {args.threads} torch thread(s) per server; "
        f"date {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC; commit {commit}",
        f"- model `{args.model}`; one greedy conversation of {args.turns} turns (a ~20-token question, a "
        f"{args.reply_tokens}-token reply), held three ways side by side, with the same text at every turn; "
        "command: `python -m server.bench_responses`",
        f"- TTFT: request sent -> first streamed text, median of the {WINDOW} turns ending at the mark "
        "(one sample at turn 1); client and servers share the machine's cores.", "",
        "| turn | history (tokens) | Responses, `previous_response_id` | chat, history resent, state cache on "
        "| chat, history resent, no state cache | Responses after a restart (state from disk) |",
        "|---|---|---|---|---|---|",
    ]
    for mark in args.marks:
        restarted = at(ttft["restarted"], mark + 1)
        lines.append(f"| {mark} | {history[mark]:,} | {ms(at(ttft['responses'], mark))} | "
                     f"{ms(at(ttft['chat cached'], mark))} | {ms(at(ttft['chat plain'], mark))} | {ms(restarted)} |")
    first, last = at(ttft["responses"], args.marks[0]), at(ttft["responses"], args.marks[-1])
    plain = at(ttft["chat plain"], args.marks[-1])
    lines += ["", f"Responses TTFT at turn {args.marks[-1]} / turn {args.marks[0]}: {last / first:.2f}x; "
              f"chat without state cache at turn {args.marks[-1]}: {plain / last:.1f}x the Responses turn.", "",
              "## Restoring a saved state into a slot", "",
              "From the server's `miras:state_restore_seconds` histogram (read from the tier and copied into "
              "the slot); the disk row is the restarted server, whose memory tier starts empty.", "",
              "| tier | restores | mean |", "|---|---|---|"]
    for tier, (mean, count) in [("memory", memory.get("memory", (0.0, 0))), ("disk", restored.get("disk", (0.0, 0)))]:
        lines.append(f"| {tier} | {count} | {mean * 1e3:,.2f} ms |")
    lines.append("")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text("\n".join(lines))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
