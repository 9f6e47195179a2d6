"""The batched sampler against its per-row definition.

``reference_token`` is the definition, one row at a time (the sampler the engine used before it was
batched, drawing with the row's uniform number by inverse CDF instead of its own generator). The batched
sampler must give the same tokens for every parameter and their mixtures in one batch, over several steps
(penalty counts and min_tokens change from step to step); draws must follow the filtered distribution;
seeded rows must not depend on the batch.
"""

from __future__ import annotations

import math

import pytest
import torch

from miras_serve.server import SamplingParams
from miras_serve.server.sampler import Sampler, row_uniforms

VOCAB, EOS = 64, 2


def finite(x: torch.Tensor) -> torch.Tensor:
    return torch.nan_to_num(x, nan=float("-inf"), posinf=torch.finfo(x.dtype).max)


def reference_probs(logits: torch.Tensor, p: SamplingParams, prompt: list[int], output: list[int]
                    ) -> tuple[torch.Tensor, torch.Tensor]:
    """One row: (logits after bias, bans and penalties; sampling probabilities, unnormalised)."""
    x = logits.clone()
    for token_id, bias in p.logit_bias.items():
        x[token_id] += bias
    if len(output) < p.min_tokens:
        x[list(p.stop_token_ids) + ([] if p.ignore_eos else [EOS])] = float("-inf")
    if p.repetition_penalty != 1.0:
        seen = sorted(set(prompt) | set(output))
        x[seen] = torch.where(x[seen] > 0, x[seen] / p.repetition_penalty, x[seen] * p.repetition_penalty)
    generated = torch.bincount(torch.tensor(output, dtype=torch.long), minlength=len(x)).float()
    x = finite(x - (p.frequency_penalty * generated + p.presence_penalty * (generated > 0).float()))
    if p.greedy:
        return x, torch.zeros_like(x)
    y = finite(x / p.temperature)
    if 0 < p.top_k < len(y):
        y = y.masked_fill(y < torch.topk(y, p.top_k).values[-1], float("-inf"))
    probs = torch.softmax(y, dim=-1)
    if p.top_p < 1.0:
        ordered, order = torch.sort(probs, descending=True, stable=True)
        drop = (torch.cumsum(ordered, 0) - ordered) >= p.top_p
        probs = probs.scatter(0, order, ordered.masked_fill(drop, 0.0))
    if p.min_p > 0.0:
        probs = probs.masked_fill(probs < p.min_p * probs.max(), 0.0)
    return x, probs


def reference_token(logits: torch.Tensor, p: SamplingParams, prompt: list[int], output: list[int], u: float) -> int:
    x, probs = reference_probs(logits, p, prompt, output)
    cdf = torch.cumsum(probs, 0)
    if p.greedy or not (math.isfinite(cdf[-1]) and cdf[-1] > 0):
        return int(torch.argmax(x))
    return int((cdf < torch.tensor(u * float(cdf[-1]), dtype=torch.float32)).sum())


MIXED = [
    SamplingParams(temperature=0.0),
    SamplingParams(temperature=0.8, seed=5),
    SamplingParams(temperature=1.3, top_k=5),
    SamplingParams(temperature=1.0, top_p=0.7, seed=-3),
    SamplingParams(temperature=1.0, min_p=0.2),
    SamplingParams(temperature=0.7, top_k=10, top_p=0.9, min_p=0.05, seed=1 << 62),
    SamplingParams(temperature=1.0, repetition_penalty=1.8),
    SamplingParams(temperature=0.0, presence_penalty=1.5, frequency_penalty=0.7),
    SamplingParams(temperature=1.1, repetition_penalty=0.6, frequency_penalty=-0.5, seed=17),
    SamplingParams(temperature=1.0, logit_bias={7: 5.0, 9: -100.0, 11: 2.5}),
    SamplingParams(temperature=0.0, logit_bias={4: 100.0}),
    SamplingParams(temperature=1.0, min_tokens=3, stop_token_ids=[5, 6]),
    SamplingParams(temperature=0.0, min_tokens=2, ignore_eos=True, stop_token_ids=[8]),
    SamplingParams(temperature=0.9, top_p=0.5, presence_penalty=-1.0, logit_bias={3: 3.0}, min_tokens=1, seed=2),
]


def new_sampler(num_slots: int, seed: int = 0) -> Sampler:
    return Sampler(num_slots, VOCAB, EOS, torch.device("cpu"), torch.Generator().manual_seed(seed))


def check_against_reference(sampler: Sampler, slots: list[int], params: list[SamplingParams], steps: int,
                            seed: int) -> None:
    gen = torch.Generator().manual_seed(seed)
    prompts = [torch.randint(0, VOCAB, (int(torch.randint(1, 20, (1,), generator=gen)),), generator=gen).tolist()
               for _ in params]
    for i, (slot, p, prompt) in enumerate(zip(slots, params, prompts, strict=True)):
        sampler.add(slot, p, i % 3, prompt)
    outputs: list[list[int]] = [[] for _ in params]
    for step in range(steps):
        logits = 3 * torch.randn(len(params), VOCAB, generator=gen)
        keys = sampler.key[torch.tensor(slots)]
        u = row_uniforms(keys, torch.full_like(keys, step)).tolist()
        expected = [reference_token(logits[b], p, prompts[b], outputs[b], u[b]) for b, p in enumerate(params)]
        # the intermediate rows too: a token equality alone rarely sees a small change in the tail
        index = torch.tensor(slots)
        processed = sampler._process(logits.clone(), slots, index)  # written in place
        probs = sampler._filter(processed, slots, index)
        for b, p in enumerate(params):
            x, row_probs = reference_probs(logits[b], p, prompts[b], outputs[b])
            torch.testing.assert_close(processed[b], x, rtol=1e-6, atol=1e-6)
            if not p.greedy:
                torch.testing.assert_close(probs[b], row_probs, rtol=1e-5, atol=1e-7)
        tokens, _ = sampler.sample(logits, slots)
        assert tokens == expected, f"step {step}"
        for out, token in zip(outputs, tokens, strict=True):
            out.append(token)


def test_every_parameter_mixed_in_one_batch_matches_the_definition():
    check_against_reference(new_sampler(20), list(range(3, 3 + len(MIXED))), MIXED, steps=6, seed=0)


@pytest.mark.parametrize("index", range(len(MIXED)))
def test_each_parameter_alone_matches_the_definition(index):
    check_against_reference(new_sampler(4), [2], [MIXED[index]], steps=4, seed=index + 1)


def test_slots_reused_after_a_sequence_ends_start_clean():
    """A slot's tables (bias, bans, counts) from an earlier sequence never leak into the next one."""
    sampler = new_sampler(len(MIXED))
    slots = list(range(len(MIXED)))
    check_against_reference(sampler, slots, MIXED, steps=3, seed=10)
    for slot in slots:
        sampler.remove(slot)
    check_against_reference(sampler, slots, [MIXED[0], MIXED[1]] * (len(MIXED) // 2), steps=3, seed=11)
    assert not sampler.users["bias"] and not sampler.users["penalties"]


def test_seeded_rows_do_not_depend_on_the_batch():
    params = SamplingParams(temperature=1.0, top_p=0.95, seed=1234)
    gen = torch.Generator().manual_seed(0)
    logits = [torch.randn(VOCAB, generator=gen) for _ in range(8)]
    alone = new_sampler(1)
    alone.add(0, params, 0, [1])
    expected = [alone.sample(row.unsqueeze(0), [0])[0][0] for row in logits]
    crowded = new_sampler(10, seed=7)
    batch_slots = [0, 1, 2, 3, 5, 4, 6, 7, 8]  # the seeded sequence sits in slot 5, row 4
    for slot, other in zip([0, 1, 2, 3, 4, 6, 7, 8], MIXED, strict=False):
        crowded.add(slot, other, 0, [1, 2, 3])
    crowded.add(5, params, 0, [1])
    got = []
    for row in logits:
        batch = torch.randn(len(batch_slots), VOCAB, generator=gen)
        batch[4] = row
        tokens, _ = crowded.sample(batch, batch_slots)
        got.append(tokens[4])
    assert got == expected
    assert len(set(expected)) > 1  # actually random


def test_draws_follow_the_filtered_distribution():
    """Frequencies of many draws (one per step) against the definition's probabilities: a chi-square test
    per parameter set, which also checks that the per-row uniforms are uniform and independent."""
    gen = torch.Generator().manual_seed(3)
    logits = torch.randn(VOCAB, generator=gen)
    draws = 4000
    for params in (SamplingParams(temperature=1.0), SamplingParams(temperature=0.8, top_k=6),
                   SamplingParams(temperature=1.2, top_p=0.8, min_p=0.02)):
        sampler = new_sampler(1)
        _, probs = reference_probs(logits, params, [], [])
        probs = probs / probs.sum()
        counts = torch.zeros(VOCAB)
        sampler.add(0, params, 0, [0])
        for _ in range(draws):
            (token,), _ = sampler.sample(logits.unsqueeze(0), [0])
            counts[token] += 1
        assert counts[probs == 0].sum() == 0, params
        kept = probs > 0
        expected = probs[kept] * draws
        chi2 = float(((counts[kept] - expected) ** 2 / expected).sum())
        dof = int(kept.sum()) - 1
        assert chi2 < dof + 5 * math.sqrt(2 * dof) + 10, (params, chi2, dof)


def test_row_uniforms_are_uniform_and_differ_by_key_and_step():
    keys = torch.arange(-500, 500, dtype=torch.long) * 7919
    u = torch.stack([row_uniforms(keys, torch.full_like(keys, step)) for step in range(20)])
    assert u.min() > 0 and u.max() < 1
    histogram = torch.histc(u.float(), bins=10, min=0, max=1)
    assert (histogram - u.numel() / 10).abs().max() < 5 * math.sqrt(u.numel() / 10)
    assert abs(torch.corrcoef(torch.stack([u[0], u[1]]))[0, 1]) < 0.15
    assert torch.equal(u[3], row_uniforms(keys, torch.full_like(keys, 3)))


def test_degenerate_rows_fall_back_to_their_argmax():
    # found by schemathesis: extreme penalties overflowed a row to inf/NaN and killed the engine
    logits = torch.randn(4, VOCAB)
    logits[1] = float("-inf")
    logits[2, 3], logits[2, 4] = float("inf"), float("nan")
    sampler = new_sampler(4)
    for slot, t in enumerate((1e-4, 1.0, 0.7, 0.0)):
        sampler.add(slot, SamplingParams(temperature=t, top_p=0.5, repetition_penalty=0.01), 0, [1, 2])
    tokens, _ = sampler.sample(logits, [0, 1, 2, 3])
    assert all(0 <= t < VOCAB for t in tokens) and tokens[2] == 3


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_plain_greedy_batches_take_the_path_of_a_staged_batch(dtype):
    """A batch of greedy rows with no other stage takes the argmax alone (the fast path); the same rows
    beside a row that uses a stage (the general path) give the same tokens and logprobs, NaN and inf
    included, and the raw logits stay untouched."""
    gen = torch.Generator().manual_seed(5)
    plain = [SamplingParams(temperature=0.0), SamplingParams(temperature=0.0, logprobs=3),
             SamplingParams(temperature=0.0, max_tokens=5, stop=["x"]), SamplingParams(temperature=0.0)]
    for _ in range(20):
        logits = (3 * torch.randn(len(plain) + 1, VOCAB, generator=gen)).to(dtype)
        logits[0, 5], logits[2, 7], logits[2, 9], logits[2, 3] = float("nan"), float("inf"), float("inf"), float("nan")
        logits[3] = float("-inf")
        raw = logits.clone()
        fast, general = new_sampler(8), new_sampler(8)
        for slot, p in enumerate(plain):
            fast.add(slot, p, 0, [1])
            general.add(slot, p, 0, [1])
        general.add(len(plain), SamplingParams(temperature=0.9, top_k=5, seed=3), 0, [1])
        assert fast.staged.isdisjoint(range(len(plain))) and general.staged == {len(plain)}
        tokens, logprobs = fast.sample(logits[: len(plain)], list(range(len(plain))))
        expected, expected_logprobs = general.sample(logits, list(range(len(plain) + 1)))
        assert tokens == expected[: len(plain)] and tokens[0] != 5 and tokens[2] == 7
        assert logprobs == expected_logprobs[: len(plain)] and logprobs[1] is not None
        assert torch.equal(logits.isnan(), raw.isnan()) and torch.equal(logits.nan_to_num(), raw.nan_to_num())


def test_logprobs_are_batched_per_row_k():
    sampler = new_sampler(3)
    for slot, k in enumerate((None, 0, 4)):
        sampler.add(slot, SamplingParams(temperature=0.0, logprobs=k), 0, [1])
    logits = torch.randn(3, VOCAB)
    tokens, logprobs = sampler.sample(logits, [0, 1, 2])
    reference = torch.log_softmax(logits, dim=-1)
    assert logprobs[0] is None
    assert logprobs[1].top == [] and logprobs[1].token_id == tokens[1]
    assert logprobs[1].logprob == pytest.approx(float(reference[1, tokens[1]]))
    values, ids = torch.topk(reference[2], 4)
    assert [i for i, _ in logprobs[2].top] == ids.tolist()
    assert [v for _, v in logprobs[2].top] == pytest.approx(values.tolist())


def test_every_request_of_a_mixed_batch_gets_the_tokens_it_gets_alone(tiny_checkpoint):
    """End to end through the engine: seeded requests with every parameter, prefilled and decoded together
    (4 slots for 8 requests, so slots are reused), each give the tokens they give alone."""
    from miras_serve.server import LLM

    llm = LLM(tiny_checkpoint, max_num_seqs=4, max_num_batched_tokens=64)
    prompts = ["Shall I compare thee", "From fairest creatures we desire", "x", "Thou art more lovely"] * 2
    params = [SamplingParams(**{**vars(p), "seed": 100 + i, "max_tokens": 10, "ignore_eos": True,
                                "logit_bias": {k: v for k, v in p.logit_bias.items() if k < 300},
                                "min_tokens": min(p.min_tokens, 10)})
              for i, p in enumerate(MIXED[1:9])]
    together = [o.outputs[0].token_ids for o in llm.generate(prompts, params)]
    alone = [llm.generate([prompt], p)[0].outputs[0].token_ids for prompt, p in zip(prompts, params, strict=True)]
    assert together == alone
    assert all(len(t) == 10 for t in together)
