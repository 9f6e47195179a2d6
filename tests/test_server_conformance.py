"""OpenAI/vLLM conformance against a real server: fields never silently ignored, usage's cached tokens,
logprobs as vLLM returns them, the stop-string limit and the metrics endpoint."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path

import httpx
import openai
import pytest
from test_server_support import ServerProcess

from miras_serve import models

transformers = pytest.importorskip("transformers")

MODEL = "tiny"


@pytest.fixture(scope="module")
def url(tiny_checkpoint):
    proc = ServerProcess(tiny_checkpoint, "--served-model-name", MODEL, "--max-num-seqs", "8")
    yield proc.url
    proc.stop()


def post(url: str, path: str, body: dict) -> httpx.Response:
    return httpx.post(f"{url}{path}", json=body, timeout=60)


def greedy(**kw) -> dict:
    return {"model": MODEL, "temperature": 0, "ignore_eos": True, "max_tokens": 3, **kw}


CHAT = [{"role": "user", "content": "Shall I compare thee"}]


@pytest.mark.parametrize("path, extra, param", [
    ("/v1/completions", {"best_of": 3}, "best_of"),
    ("/v1/completions", {"use_beam_search": True}, "use_beam_search"),
    ("/v1/completions", {"prompt_logprobs": 1}, "prompt_logprobs"),
    ("/v1/completions", {"length_penalty": 0.5}, "length_penalty"),
    ("/v1/completions", {"truncate_prompt_tokens": 4}, "truncate_prompt_tokens"),
    ("/v1/completions", {"allowed_token_ids": [5]}, "allowed_token_ids"),
    ("/v1/completions", {"return_token_ids": True}, "return_token_ids"),
    ("/v1/completions", {"max_completion_tokens": 3}, "max_completion_tokens"),
    ("/v1/completions", {"no_such_field": 1}, "no_such_field"),
    ("/v1/chat/completions", {"chat_template": "{{ messages }}"}, "chat_template"),
    ("/v1/chat/completions", {"continue_final_message": True}, "continue_final_message"),
    ("/v1/chat/completions", {"echo": True}, "echo"),
    ("/v1/chat/completions", {"reasoning_effort": "low"}, "reasoning_effort"),
    ("/v1/chat/completions", {"best_of": 2}, "best_of"),
    ("/v1/chat/completions", {"prompt_logprobs": 0}, "prompt_logprobs"),
])
def test_unimplemented_fields_are_a_400_naming_them(url, path, extra, param):
    body = greedy(**({"prompt": "From fairest"} if "chat" not in path else {"messages": CHAT}), **extra)
    response = post(url, path, body)
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert error["param"] == param and error["code"] == "unsupported_field" and param in error["message"]


def test_the_same_through_the_openai_client(url):
    client = openai.OpenAI(base_url=f"{url}/v1", api_key="x", max_retries=0)
    with pytest.raises(openai.BadRequestError, match="use_beam_search"):
        client.completions.create(model=MODEL, prompt="x", max_tokens=1, extra_body={"use_beam_search": True})
    with pytest.raises(openai.BadRequestError, match="best_of"):
        client.completions.create(model=MODEL, prompt="x", max_tokens=1, best_of=2)
    # what clients send routinely, and values that ask for what the server does anyway, keep working
    ok = client.completions.create(model=MODEL, prompt="x", max_tokens=1, n=2, best_of=2, user="u",
                                   extra_body={"use_beam_search": False, "length_penalty": 1.0, "priority": 0,
                                               "request_id": "r1", "prompt_logprobs": None})
    assert len(ok.choices) == 2
    chat = client.chat.completions.create(model=MODEL, messages=CHAT, max_tokens=1, metadata={"a": "b"},
                                          store=False, extra_body={"continue_final_message": False, "echo": False})
    assert chat.choices[0].finish_reason == "length"


def test_more_than_16_stop_strings_is_a_clear_400(url):
    for path, body in (("/v1/completions", {"prompt": "x"}), ("/v1/chat/completions", {"messages": CHAT})):
        response = post(url, path, greedy(**body, stop=[f"s{i}" for i in range(17)]))
        error = response.json()["error"]
        assert response.status_code == 400 and error["param"] == "stop"
        assert error["message"] == "stop: at most 16 stop strings are allowed, got 17"
    ids = post(url, "/v1/completions", greedy(prompt="x", stop_token_ids=list(range(17))))
    assert ids.status_code == 400 and "at most 16 stop token ids" in ids.json()["error"]["message"]


def stream_events(url: str, path: str, body: dict) -> list[dict]:
    response = post(url, path, {**body, "stream": True, "stream_options": {"include_usage": True}})
    assert response.status_code == 200, response.text
    events = [e.removeprefix("data: ") for e in response.text.split("\n\n") if e.startswith("data: ")]
    assert events[-1] == "[DONE]"
    return [json.loads(e) for e in events[:-1]]


@pytest.mark.parametrize("path, body", [("/v1/completions", {"prompt": "Thou art more lovely and more"}),
                                        ("/v1/chat/completions", {"messages": [{"role": "user",
                                                                                "content": "his tender heir"}]})])
def test_usage_reports_cached_tokens(url, path, body):
    first = post(url, path, greedy(**body)).json()["usage"]
    assert first["prompt_tokens_details"] == {"cached_tokens": 0}
    again = post(url, path, greedy(**body)).json()["usage"]  # the prompt's state is in the state cache now
    cached = again["prompt_tokens_details"]["cached_tokens"]
    assert 0 < cached <= again["prompt_tokens"]
    final = stream_events(url, path, greedy(**body))[-1]
    assert final["choices"] == [] and final["usage"] == again


def test_completion_logprobs_always_list_the_chosen_token(url):
    # sampled at temperature 2 with top_k 1 off: the chosen token is often outside the top 1
    body = {"model": MODEL, "prompt": "From fairest", "max_tokens": 16, "temperature": 2.0, "seed": 7,
            "ignore_eos": True}
    for k in (0, 1):
        lp = post(url, "/v1/completions", {**body, "logprobs": k}).json()["choices"][0]["logprobs"]
        for token, logprob, top in zip(lp["tokens"], lp["token_logprobs"], lp["top_logprobs"], strict=True):
            assert top[token] == logprob and len(top) <= k + 1
        if k == 0:
            assert all(len(top) == 1 for top in lp["top_logprobs"])
        else:
            assert any(len(top) == 2 for top in lp["top_logprobs"])  # some sampled token was not the top one


@pytest.mark.parametrize("max_tokens", [0, 1, 4])
def test_echo_with_logprobs_streams_what_the_full_response_holds(url, max_tokens):
    # max_tokens 1 is how lm-eval scores a loglikelihood: the request ends in the step that prefills it
    body = greedy(prompt=["From fairest creatures", "Shall I"], n=2, echo=True, logprobs=2, max_tokens=max_tokens)
    full = post(url, "/v1/completions", body).json()["choices"]
    prompt_tokens = post(url, "/tokenize", {"prompt": "From fairest creatures"}).json()["count"]
    assert len(full[0]["logprobs"]["tokens"]) == prompt_tokens + max_tokens
    events = stream_events(url, "/v1/completions", body)
    text: dict[int, str] = {}
    logprobs: dict[int, dict[str, list]] = {}
    for event in events[:-1]:
        for choice in event["choices"]:
            text[choice["index"]] = text.get(choice["index"], "") + choice["text"]
            merged = logprobs.setdefault(choice["index"], {k: [] for k in choice["logprobs"]})
            for key, values in choice["logprobs"].items():
                merged[key] += values
    assert [text[c["index"]] for c in full] == [c["text"] for c in full]
    assert [logprobs[c["index"]] for c in full] == [c["logprobs"] for c in full]
    assert full[0]["logprobs"]["token_logprobs"][0] is None  # the echoed prompt's first token


def test_tokenizer_info_serves_what_lm_evals_remote_tokenizer_reads(url, tiny_checkpoint):
    info = httpx.get(f"{url}/tokenizer_info").json()
    config = json.loads((tiny_checkpoint / "tokenizer_config.json").read_text())
    assert {k: v for k, v in info.items() if k not in ("model_max_length", "vocab_size")} == \
        {k: v for k, v in config.items() if k != "model_max_length"}
    # lm-eval reads each special token's id by tokenizing its text without special tokens
    for name, token_id in (("eos_token", 2), ("bos_token", 1), ("pad_token", 0)):
        tokens = post(url, "/tokenize", {"prompt": info[name], "add_special_tokens": False}).json()["tokens"]
        assert tokens == [token_id]
    # text prompts get exactly the BOS the tokenizer file's post-processor adds
    from tokenizers import Tokenizer
    raw = Tokenizer.from_file(str(tiny_checkpoint / "tokenizer.json"))
    text = "Shall I compare thee"
    assert post(url, "/tokenize", {"prompt": text}).json()["tokens"] == raw.encode(text).ids
    assert post(url, "/v1/completions", greedy(prompt=text)).json()["usage"]["prompt_tokens"] == \
        len(raw.encode(text).ids)


# vLLM's names, kept so that its dashboards port with a rename of the prefix: the "miras:" prefix (promtool
# reserves colons for recording rules) and a histogram whose vLLM name ends in "_total"
VLLM_NAMING = ("metric names should not contain ':'", 'miras:iteration_tokens_total non-counter metrics should not '
               'have "_total" suffix')


def test_metrics_answer_head_and_follow_prometheus_naming(url):
    post(url, "/v1/completions", greedy(prompt="x", n=2, max_tokens=5))
    head = httpx.head(f"{url}/metrics")
    assert head.status_code == 200 and head.content == b"" and head.headers["content-type"].startswith("text/plain")
    text = httpx.get(f"{url}/metrics").text
    from prometheus_client.parser import text_string_to_metric_families
    families = {f.name: f for f in text_string_to_metric_families(text)}
    for name, family in families.items():
        assert family.documentation, name
        if family.type == "counter":
            assert all(s.name in (f"{name}_total", f"{name}_created") for s in family.samples), name
        elif name != "miras:iteration_tokens_total":
            assert not name.endswith("_total"), f"{family.type} {name} ends in _total"
    assert families["miras:kv_cache_usage_perc"].type == "gauge"
    assert families["miras:num_preemptions"].type == "counter"
    samples = {(s.name, tuple(sorted(s.labels.items()))): s.value for f in families.values() for s in f.samples}
    capacity = samples[("miras:state_slots_capacity", (("model_name", MODEL),))]
    used = samples[("miras:state_slots_used", (("model_name", MODEL),))]
    assert samples[("miras:kv_cache_usage_perc", (("model_name", MODEL),))] == used / capacity
    n_sum = next(v for (name, _), v in samples.items() if name == "miras:request_params_n_sum")
    max_tokens_sum = next(v for (name, _), v in samples.items() if name == "miras:request_params_max_tokens_sum")
    assert n_sum >= 2 and max_tokens_sum >= 5
    (info,) = [s for s in families["miras:cache_config_info"].samples]
    assert info.value == 1 and info.labels["num_gpu_blocks"] == "8" and info.labels["enable_prefix_caching"] == "True"
    assert any(s.value > 0 for s in families["miras:time_per_output_token_seconds"].samples
               if s.name.endswith("_count"))
    promtool = shutil.which("promtool")
    if promtool is None:
        pytest.skip("promtool not installed (Debian: apt-get install prometheus); the naming rules above ran")
    checked = subprocess.run([promtool, "check", "metrics"], input=text, capture_output=True, text=True)
    problems = [line for line in (checked.stdout + checked.stderr).splitlines()
                if line.strip() and not any(accepted in line for accepted in VLLM_NAMING)]
    assert problems == []


def documented_fields(column: str) -> dict[str, list[str]]:
    """docs/serving.md's table of request fields: for ``column`` ("completions" or "chat"), the fields of
    each verdict ("rejected", "accepted", ...)."""
    lines = (Path(__file__).parent.parent / "docs" / "serving.md").read_text().split("### Request fields")[1]
    rows = [line for line in lines.splitlines() if line.startswith("| `")]
    index = {"completions": 2, "chat": 3}[column]
    verdicts: dict[str, list[str]] = {}
    for row in rows:
        cells = [c.strip() for c in row.split("|")]
        verdicts.setdefault(cells[index], []).extend(re.findall(r"`([a-z_]+)`", cells[1]))
    return verdicts


@pytest.mark.parametrize("column, path", [("completions", "/v1/completions"), ("chat", "/v1/chat/completions")])
def test_the_documented_field_table_is_what_the_server_does(url, column, path):
    base = greedy(**({"prompt": "x"} if column == "completions" else {"messages": CHAT}))
    verdicts = documented_fields(column)
    assert len(verdicts["rejected"]) >= 15 and "prompt_logprobs" in verdicts["rejected"]
    for field in verdicts["rejected"]:
        response = post(url, path, {**base, field: "x" if field == "suffix" else 1})
        assert response.status_code == 400 and response.json()["error"]["param"] == field, (field, response.text)
    for field in verdicts["accepted"]:
        assert post(url, path, {**base, field: "r1" if field != "metadata" else {"k": "v"}}).status_code == 200, field


@pytest.mark.parametrize("tokenized", [True, False])
def test_lm_eval_style_loglikelihood_equals_the_models_own(url, tiny_checkpoint, tokenized):
    """What lm-eval's local-completions sends with add_bos_token=True (benchmarks/clients.py runs lm-eval
    itself): BOS-first token ids, or those ids decoded back to text (BOS's text included); max_tokens 1, echo,
    logprobs 1; the continuation's logprobs are token_logprobs[ctxlen:-1]."""
    from benchmarks.clients import model_loglikelihood
    model, tokenizer = models.load_pretrained(tiny_checkpoint)
    hf = transformers.AutoTokenizer.from_pretrained(str(tiny_checkpoint))
    for context, continuation in (("Shall I compare thee to a", " summer's day"), ("From fairest ", "creatures")):
        spaces = len(context) - len(context.rstrip())
        ctx, cont = (context[:-spaces], context[-spaces:] + continuation) if spaces else (context, continuation)
        context_ids = hf(ctx)["input_ids"]
        whole = hf(ctx + cont)["input_ids"]
        prompt = whole if tokenized else hf.decode(whole)
        choice = post(url, "/v1/completions", {"model": MODEL, "prompt": prompt, "max_tokens": 1, "echo": True,
                                               "logprobs": 1, "temperature": 0}).json()["choices"][0]
        served = sum(choice["logprobs"]["token_logprobs"][len(context_ids):-1])
        assert served == pytest.approx(model_loglikelihood(model, tokenizer, context, continuation), abs=1e-4)
