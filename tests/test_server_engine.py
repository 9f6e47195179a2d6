"""The serving engine without HTTP: scheduler, sampling, detokenizer and the offline LLM API."""

from __future__ import annotations

import pytest
import torch

from miras_serve import models
from miras_serve.server import LLM, ParamError, SamplingParams
from miras_serve.server.detokenizer import IncrementalDetokenizer
from miras_serve.server.request import Request
from miras_serve.server.scheduler import Scheduler
from miras_serve.server.state_cache import CachedState

PROMPTS = ["Shall I compare thee to a summer's day?", "From fairest", "Thou art more lovely and more temperate. " * 3,
           "x", "But as the riper should by time decease, his tender heir", "beauty's rose"]


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    # the CI box has 2 shared cores: one intra-op thread avoids spin-wait contention and is faster here
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def llm(tiny_checkpoint) -> LLM:
    # 4 slots and a 12-token step budget: queueing, chunked prefill (chunk_size 4) and mixed batches
    return LLM(tiny_checkpoint, max_num_seqs=4, max_num_batched_tokens=12)


@pytest.fixture(scope="module")
def solo(tiny_checkpoint) -> LLM:
    return LLM(tiny_checkpoint, max_num_seqs=8, max_num_batched_tokens=1024)


def greedy(max_tokens: int = 12, **kw) -> SamplingParams:
    return SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True, **kw)


def tokens(outputs) -> list[list[int]]:
    return [o.outputs[0].token_ids for o in outputs]


def test_greedy_equals_repeated_full_forward(llm):
    prompt = llm.tokenizer.encode(PROMPTS[2], add_bos=True)
    (out,) = llm.generate([prompt], greedy(10))
    model, ids, expected = llm.engine.model, list(prompt), []
    with torch.inference_mode():
        for _ in range(10):
            logits, _ = model(torch.tensor([ids]))
            expected.append(int(logits[0, -1, : llm.engine.vocab_size].argmax()))
            ids.append(expected[-1])
    assert out.outputs[0].token_ids == expected
    assert out.outputs[0].text == llm.tokenizer.decode(expected)
    assert out.outputs[0].finish_reason == "length"


def test_batching_never_changes_greedy_results(llm, solo):
    together = tokens(llm.generate(PROMPTS, greedy()))
    alone = [tokens(solo.generate([p], greedy()))[0] for p in PROMPTS]
    assert together == alone
    assert llm.engine.scheduler.num_slots_used == 0


def test_seeded_sampling_is_independent_of_the_batch(llm, solo):
    params = SamplingParams(temperature=1.0, top_p=0.9, max_tokens=12, seed=1234, ignore_eos=True)
    (alone,) = solo.generate([PROMPTS[0]], params)
    others = [SamplingParams(temperature=1.2, max_tokens=9, ignore_eos=True, seed=None)] * 3
    batch = llm.generate([PROMPTS[1], PROMPTS[0], PROMPTS[2], PROMPTS[3]], [others[0], params, *others[1:]])
    assert batch[1].outputs[0].token_ids == alone.outputs[0].token_ids
    (other_seed,) = solo.generate([PROMPTS[0]], SamplingParams(temperature=1.0, max_tokens=12, seed=99,
                                                               ignore_eos=True))
    assert other_seed.outputs[0].token_ids != alone.outputs[0].token_ids


def test_n_forks_one_prefill(llm, solo):
    (three,) = llm.generate([PROMPTS[2]], greedy(8, n=3))
    (one,) = solo.generate([PROMPTS[2]], greedy(8))
    assert [o.index for o in three.outputs] == [0, 1, 2]
    assert all(o.token_ids == one.outputs[0].token_ids for o in three.outputs)
    # sample i of a seeded request uses seed + i, so a forked state must equal a fresh prefill
    sampled = dict(temperature=1.0, max_tokens=8, ignore_eos=True)
    (pair,) = llm.generate([PROMPTS[0]], SamplingParams(n=2, seed=7, **sampled))
    (second,) = solo.generate([PROMPTS[0]], SamplingParams(n=1, seed=8, **sampled))
    assert pair.outputs[1].token_ids == second.outputs[0].token_ids
    assert pair.outputs[0].token_ids != pair.outputs[1].token_ids


def test_truncation_to_one_token_is_greedy(solo):
    (reference,) = tokens(solo.generate([PROMPTS[4]], greedy()))
    for kw in (dict(top_k=1), dict(top_p=1e-6), dict(min_p=1.0)):
        (got,) = tokens(solo.generate([PROMPTS[4]], SamplingParams(temperature=1.0, max_tokens=12, ignore_eos=True,
                                                                   seed=3, **kw)))
        assert got == reference, kw


def test_penalties_change_repetitive_output(solo):
    (plain,) = tokens(solo.generate([PROMPTS[0]], greedy(16)))
    (penalised,) = tokens(solo.generate([PROMPTS[0]], greedy(16, frequency_penalty=2.0, presence_penalty=2.0)))
    (repetition,) = tokens(solo.generate([PROMPTS[0]], greedy(16, repetition_penalty=2.0)))
    assert len(set(plain)) < len(set(penalised))
    assert repetition != plain


def test_stop_strings_cut_the_text_and_are_never_emitted(solo):
    (full,) = solo.generate([PROMPTS[0]], greedy(16, skip_special_tokens=True))
    text = full.outputs[0].text
    assert len(text) > 6
    stop = text[3:5]
    (cut,) = solo.generate([PROMPTS[0]], greedy(16, stop=[stop, "never-seen"]))
    assert cut.outputs[0].text == text[: text.index(stop)]
    assert (cut.outputs[0].finish_reason, cut.outputs[0].stop_reason) == ("stop", stop)
    (kept,) = solo.generate([PROMPTS[0]], greedy(16, stop=stop, include_stop_str_in_output=True))
    assert kept.outputs[0].text == text[: text.index(stop) + len(stop)]


def test_stop_token_ids_eos_min_tokens_and_ignore_eos(solo):
    (full,) = tokens(solo.generate([PROMPTS[1]], greedy(12)))
    stop_id = full[4]
    (cut,) = solo.generate([PROMPTS[1]], greedy(12, stop_token_ids=[stop_id]))
    assert cut.outputs[0].token_ids == full[: full.index(stop_id) + 1]
    assert cut.outputs[0].stop_reason == stop_id
    eos = solo.tokenizer.eos_token_id
    likely_eos = dict(temperature=0.0, max_tokens=10, logit_bias={eos: 100.0})
    (stops,) = solo.generate([PROMPTS[1]], SamplingParams(**likely_eos))
    assert stops.outputs[0].token_ids == [eos] and stops.outputs[0].finish_reason == "stop"
    (late,) = solo.generate([PROMPTS[1]], SamplingParams(min_tokens=4, **likely_eos))
    assert len(late.outputs[0].token_ids) == 5 and late.outputs[0].token_ids[-1] == eos
    (ignored,) = solo.generate([PROMPTS[1]], SamplingParams(ignore_eos=True, **likely_eos))
    assert ignored.outputs[0].finish_reason == "length" and len(ignored.outputs[0].token_ids) == 10


def test_logprobs_match_the_model(solo):
    prompt = solo.tokenizer.encode(PROMPTS[0], add_bos=True)
    (out,) = solo.generate([prompt], greedy(3, logprobs=3, prompt_logprobs=2))
    with torch.inference_mode():
        logits, _ = solo.engine.model(torch.tensor([prompt + out.outputs[0].token_ids]))
    ref = torch.log_softmax(logits[0, :, : solo.engine.vocab_size], dim=-1)
    first = out.outputs[0].logprobs[0]
    assert first.token_id == out.outputs[0].token_ids[0]
    assert first.logprob == pytest.approx(float(ref[len(prompt) - 1].max()), abs=1e-4)
    assert [t for t, _ in first.top] == ref[len(prompt) - 1].topk(3).indices.tolist()
    assert out.prompt_logprobs[0] is None and len(out.prompt_logprobs) == len(prompt)
    assert out.prompt_logprobs[5].logprob == pytest.approx(float(ref[4, prompt[5]]), abs=1e-4)


def test_incremental_detokenizer_never_splits_characters(tokenizer):
    text = "héllo wörld ✓ — naïve café"
    ids = tokenizer.encode(text)
    assert len(ids) > len(text.split())
    detok = IncrementalDetokenizer(tokenizer, stop=[])
    pieces = []
    for token in ids:
        detok.add(token)
        pieces.append(detok.take())
    detok.finish(matched_stop=False)
    pieces.append(detok.take())
    assert "".join(pieces) == text and all("\ufffd" not in p for p in pieces)
    lone = IncrementalDetokenizer(tokenizer, stop=[])
    lone.add(tokenizer.encode("é")[0])  # half a character, then the sequence ends
    assert lone.take() == ""
    lone.finish(matched_stop=False)
    assert lone.take() == "\ufffd"


def test_stop_string_prefix_is_held_back(tokenizer):
    detok = IncrementalDetokenizer(tokenizer, stop=["rose might"])
    emitted = ""
    for token in tokenizer.encode("beauty's rose might never die"):
        matched = detok.add(token)
        emitted += detok.take()
        assert "r" not in emitted.removeprefix("beauty"), "a possible stop-string start was streamed"
        if matched:
            break
    assert matched == "rose might" and emitted == "beauty's "


def test_scheduler_splits_prompts_at_chunk_multiples():
    sched = Scheduler(max_num_seqs=2, max_num_batched_tokens=14, chunk_size=4)
    long = Request("a", list(range(3, 42)), SamplingParams())
    sched.add(long)
    ends = []
    while long.num_prefilled < long.num_prompt_tokens:
        (chunk,) = sched.schedule().prefills
        ends.append(chunk.end)
        long.num_prefilled = chunk.end
    assert ends == [12, 24, 36, 39]
    with pytest.raises(ValueError, match="max_num_batched_tokens"):
        Scheduler(max_num_seqs=8, max_num_batched_tokens=10, chunk_size=4)


def test_scheduler_admits_only_with_enough_free_slots():
    sched = Scheduler(max_num_seqs=3, max_num_batched_tokens=64, chunk_size=4)
    sched.add(Request("a", [5] * 4, SamplingParams(n=2)))
    sched.add(Request("b", [5] * 4, SamplingParams(n=2)))
    plan = sched.schedule()
    assert [r.request_id for r in plan.admitted] == ["a"] and sched.num_waiting == 1
    assert sched.num_slots_used == 2


def test_scheduler_returns_the_saved_states_it_restores():
    """A state-cache hit is part of the scheduler's decision: the admitted request, the state it starts from,
    and a prefill from where that state ends (or none when it covers the whole prompt)."""
    saved = {"part": CachedState(8, None, None), "whole": CachedState(6, None, torch.zeros(3))}
    sched = Scheduler(max_num_seqs=3, max_num_batched_tokens=64, chunk_size=4,
                      cached_prefix=lambda r: (saved.get(r.request_id), saved[r.request_id].length
                                               if r.request_id in saved else 0))
    for request_id, length in (("part", 10), ("whole", 6), ("fresh", 5)):
        sched.add(Request(request_id, [5] * length, SamplingParams()))
    plan = sched.schedule()
    assert [r.request_id for r in plan.admitted] == ["part", "whole", "fresh"]
    assert plan.restored == {"part": saved["part"], "whole": saved["whole"]}
    assert [(c.request.request_id, c.start, c.end) for c in plan.prefills] == [("part", 8, 10), ("fresh", 0, 5)]
    assert sched.schedule().restored == {}  # decided once, at admission


def test_abort_frees_slots_and_reports_abort(llm):
    engine = llm.engine
    engine.add_request("abort-me", llm.tokenizer.encode(PROMPTS[2]), greedy(100))
    for _ in range(6):
        engine.step()
    assert engine.scheduler.num_slots_used == 1
    final = engine.abort_request("abort-me")
    assert final.finished and final.outputs[0].finish_reason == "abort"
    assert engine.scheduler.num_slots_used == 0 and not engine.has_unfinished()


@pytest.mark.parametrize(("prompt", "params", "param"), [
    ([], SamplingParams(), "prompt"),
    ([5, 10_000], SamplingParams(), "prompt"),
    ([5, -1], SamplingParams(), "prompt"),
    ([5] * 201, SamplingParams(), "prompt"),
    ([5], SamplingParams(n=9), "n"),
    ([5], SamplingParams(stop_token_ids=[99999]), "stop_token_ids"),
])
def test_engine_rejects_bad_requests_naming_the_field(tiny_checkpoint, prompt, params, param):
    llm = LLM(tiny_checkpoint, max_num_seqs=8, max_num_batched_tokens=64, max_prompt_tokens=200)
    with pytest.raises(ParamError) as info:
        llm.engine.add_request("r", prompt, params)
    assert info.value.param == param


@pytest.mark.parametrize(("kw", "param"), [
    (dict(temperature=-0.1), "temperature"), (dict(top_p=0.0), "top_p"), (dict(top_p=1.5), "top_p"),
    (dict(max_tokens=-1), "max_tokens"), (dict(max_tokens=10**9), "max_tokens"), (dict(n=0), "n"),
    (dict(stop=["a"] * 17), "stop"), (dict(stop=[""]), "stop"), (dict(logprobs=21), "logprobs"),
    (dict(min_tokens=20, max_tokens=10), "min_tokens"),
])
def test_sampling_params_reject_bad_values(kw, param):
    with pytest.raises(ParamError) as info:
        SamplingParams(**kw)
    assert info.value.param == param


def test_default_model_is_shipped_and_a_missing_one_has_a_clear_error():
    assert "moneta-tiny" in models.shipped_models()
    assert LLM().generate(["KING.\n"], greedy(4))[0].outputs[0].token_ids
    with pytest.raises(models.CheckpointError, match="no-such-model"):
        LLM(model="no-such-model")


def test_bfloat16_weights_serve(tiny_checkpoint):
    llm = LLM(tiny_checkpoint, dtype="bfloat16", max_num_seqs=4, max_num_batched_tokens=64)
    assert llm.engine.model.lm_head.weight.dtype == torch.bfloat16
    (out,) = llm.generate([PROMPTS[0]], greedy(5))
    assert len(out.outputs[0].token_ids) == 5 and out.outputs[0].finish_reason == "length"
