"""The llama.cpp side-by-side's GGUF writer and its restart of a server that died during a row
(benchmarks/llamacpp.py; the run itself is not in CI)."""

from __future__ import annotations

import gguf
import httpx
import jinja2
import numpy as np
import pytest
from test_loadtest_process import tiny_server

from benchmarks.llamacpp import decode_line, llama_cpp_chat_template, on_live_server, prefilled, write_gguf
from miras_serve.models.tokenizer import MirasTokenizer


def test_gguf_llama_has_our_tokenizer_and_every_tensor(tmp_path, tokenizer):
    path = tmp_path / "llama.gguf"
    vocab = tokenizer.vocab_size + 3  # padded like a model whose vocabulary is larger than the tokenizer's
    params = write_gguf(path, tokenizer, hidden=32, layers=2, heads=2, ffn=48, vocab=vocab, context=256, tied=False)
    reader = gguf.GGUFReader(str(path))
    fields = reader.fields

    def scalar(name: str):
        field = fields[name]
        return field.parts[field.data[0]][0]

    assert bytes(fields["general.architecture"].parts[-1]).decode() == "llama"
    assert scalar("llama.block_count") == 2 and scalar("llama.embedding_length") == 32
    assert scalar("llama.attention.head_count") == 2 and scalar("llama.feed_forward_length") == 48
    assert len(fields["tokenizer.ggml.tokens"].data) == vocab
    tokens = [bytes(fields["tokenizer.ggml.tokens"].parts[i]).decode() for i in fields["tokenizer.ggml.tokens"].data]
    assert tokens[tokenizer.eos_token_id] == "<|endoftext|>" and tokens[tokenizer.bos_token_id] == "<|bos|>"
    assert scalar("tokenizer.ggml.eos_token_id") == tokenizer.eos_token_id
    template = bytes(fields["tokenizer.chat_template"].parts[-1]).decode()
    assert "message['content']" in template and tokenizer.generation_prompt in template
    shapes = {t.name: tuple(int(n) for n in reversed(t.shape)) for t in reader.tensors}  # GGUF lists ne reversed
    assert shapes["token_embd.weight"] == (vocab, 32) and shapes["blk.1.ffn_down.weight"] == (32, 48)
    assert len(shapes) == 3 + 2 * 9
    assert sum(int(np.prod(s)) for s in shapes.values()) == params


def test_prefilled_tokens_from_either_servers_last_events():
    ours = {"usage": {"prompt_tokens": 900, "completion_tokens": 32, "prompt_tokens_details": {"cached_tokens": 634}}}
    assert prefilled(ours) == 266
    assert prefilled({"usage": {"prompt_tokens": 900}, "timings": {"prompt_n": 270, "cache_n": 630}}) == 270
    assert prefilled({"usage": {"prompt_tokens": 900}}) is None  # a server that does not say


def test_llama_cpp_template_renders_as_ours_without_raw_blocks(tokenizer):
    tokenizer = MirasTokenizer(tokenizer.tokenizer, "{role}:{content}\n")  # the fixture is shared: a copy
    template = llama_cpp_chat_template(tokenizer)
    assert "raw" not in template
    messages = [{"role": "user", "content": "Hi {{ there }}"}, {"role": "assistant", "content": "Hello."}]
    for prompt in (True, False):
        rendered = jinja2.Environment().from_string(template).render(messages=messages, add_generation_prompt=prompt)
        assert rendered == tokenizer.apply_chat_template(messages, add_generation_prompt=prompt)


def test_a_server_dead_before_or_during_a_row_is_restarted_once(capsys):
    server = tiny_server()
    restarts: list[str] = []
    try:
        server.kill()  # died since the last row: restarted before this one
        assert on_live_server(server, "row 1", lambda: httpx.get(server.url).text, restarts) == "ok"
        assert restarts == ["row 1"]
        tries = []

        def dies_once() -> str:  # the row kills its server the first time, as llama-server did mid-run
            tries.append(1)
            if len(tries) == 1:
                server.kill()
                raise RuntimeError("load generator failed")
            return httpx.get(server.url).text

        assert on_live_server(server, "row 2", dies_once, restarts) == "ok"
        assert restarts == ["row 1", "row 2"] and len(tries) == 2

        def fails_on_a_live_server() -> str:
            raise RuntimeError("a real error")

        with pytest.raises(RuntimeError, match="a real error"):  # not the server's death: no retry
            on_live_server(server, "row 3", fails_on_a_live_server, restarts)
        assert restarts == ["row 1", "row 2"]
        # the log goes with the run's temporary dir: its end is printed with the failure
        printed = capsys.readouterr().err
        assert f"row 3 failed on {server.name}; the end of its log:\n" in printed
        assert server.output()[-100:] in printed
    finally:
        server.stop()


def test_the_report_says_when_miras_serve_decoded_eagerly():
    compiled = decode_line({"miras:decode_graph_compiles_total": 5.0, "miras:decode_compile_failures_total": 0.0})
    assert compiled.startswith("miras-serve's decode: compiled (5 graphs")
    eager = decode_line({"miras:decode_graph_compiles_total": 2.0, "miras:decode_compile_failures_total": 1.0})
    assert eager.startswith("**miras-serve decoded eagerly**: 1 compile(s)")
    assert decode_line(None) == "miras-serve's decode: not recorded."


def test_every_load_generator_run_draws_its_own_prompts(monkeypatch, tmp_path):
    """The same prompts again would be restored from a server's prompt cache instead of prefilled (the long
    prompts' TTFT of rounds after the first once measured a cache hit): every row of every round and every
    warm-up gets its own seed."""
    import benchmarks.llamacpp as side_by_side

    seeds: list[int] = []

    def fake_load(*args, seed: int) -> dict:
        seeds.append(seed)
        return {"itl_ms": {"p50": 1.0}, "ttft_ms": {"p50": 1.0}, "output_throughput": 1.0}

    monkeypatch.setattr(side_by_side, "load", fake_load)
    for round_ in range(3):
        for what, run in side_by_side.measures("url", "m", "tok", tmp_path, "chat-url", [], round_):
            if what != "chat":
                run()
    side_by_side.warm_up(tiny_server_stub(), "tok", tmp_path, [])
    assert len(seeds) == 3 * 7 + 2 and len(set(seeds)) == len(seeds)


def tiny_server_stub():
    class Alive:
        url, name = "url", "stub"

        @staticmethod
        def alive() -> bool:
            return True

    return Alive()
