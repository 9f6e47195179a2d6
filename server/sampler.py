"""Turns a batch of next-token logits into tokens, row by row with each request's own parameters.

Every transformation is per row, so a row's result does not depend on what else is in the batch; a
seeded request draws from its own generator, so its samples do not either.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor

from .outputs import TokenLogprob
from .sampling_params import SamplingParams


class TokenCounts:
    """The penalties' view of one sequence, on the logits' device: which ids occurred (prompt or output)
    and how often each id was generated. Built from the prompt on first use, then extended by the tokens
    generated since the previous step, so a step costs O(new tokens) however long the prompt."""

    def __init__(self) -> None:
        self.seen: Tensor | None = None
        self.generated: Tensor | None = None
        self.synced = 0  # output tokens already counted

    def update(self, prompt_token_ids: list[int], output_token_ids: list[int], vocab_size: int,
               device: torch.device) -> None:
        if self.seen is None:
            self.seen = torch.zeros(vocab_size, dtype=torch.bool, device=device)
            self.seen[torch.tensor(prompt_token_ids, dtype=torch.long, device=device)] = True
            self.generated = torch.zeros(vocab_size, dtype=torch.float32, device=device)
        new = output_token_ids[self.synced:]
        if new:
            ids = torch.tensor(new, dtype=torch.long, device=device)
            self.seen[ids] = True
            self.generated.index_add_(0, ids, torch.ones(len(new), device=device))
            self.synced = len(output_token_ids)


@dataclass
class SampleRow:
    """What the sampler needs to know about one sequence."""

    params: SamplingParams
    prompt_token_ids: list[int]
    output_token_ids: list[int]
    generator: torch.Generator | None
    banned: list[int]  # ids that must not be sampled now (eos/stop ids before min_tokens)
    counts: TokenCounts = field(default_factory=TokenCounts)  # kept by the sequence from step to step


def _apply_penalties(logits: Tensor, row: SampleRow) -> Tensor:
    p = row.params
    if p.repetition_penalty == 1.0 and not p.presence_penalty and not p.frequency_penalty:
        return logits
    counts = row.counts
    counts.update(row.prompt_token_ids, row.output_token_ids, logits.shape[0], logits.device)
    if p.repetition_penalty != 1.0:
        penalised = torch.where(logits > 0, logits / p.repetition_penalty, logits * p.repetition_penalty)
        logits = torch.where(counts.seen, penalised, logits)
    if p.presence_penalty or p.frequency_penalty:
        generated = counts.generated.to(logits.dtype)
        logits = logits - (p.frequency_penalty * generated + p.presence_penalty * (generated > 0).to(logits.dtype))
    return logits


def _finite(logits: Tensor) -> Tensor:
    """Extreme parameters can overflow a row; NaN never wins and +inf becomes the largest float."""
    return torch.nan_to_num(logits, nan=float("-inf"), posinf=torch.finfo(logits.dtype).max)


def _truncate(logits: Tensor, p: SamplingParams) -> Tensor:
    """Temperature, top-k, top-p, min-p on one row of logits; returns the probabilities."""
    logits = _finite(logits / p.temperature)
    if 0 < p.top_k < logits.shape[0]:
        kth = torch.topk(logits, p.top_k).values[-1]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    probs = torch.softmax(logits, dim=-1)
    if p.top_p < 1.0:
        sorted_probs, order = torch.sort(probs, descending=True)
        # drop a token when the mass before it already reaches top_p (the top token always stays)
        drop = (torch.cumsum(sorted_probs, 0) - sorted_probs) >= p.top_p
        probs = probs.scatter(0, order, sorted_probs.masked_fill(drop, 0.0))
    if p.min_p > 0.0:
        probs = probs.masked_fill(probs < p.min_p * probs.max(), 0.0)
    probs = probs / probs.sum()
    # a row with nothing left to sample (e.g. every logit -inf) falls back to its argmax, without a host sync
    fallback = torch.zeros_like(probs).scatter_(0, torch.argmax(logits).view(1), 1.0)
    return torch.where(torch.isfinite(probs).all() & (probs.sum() > 0), probs, fallback)


def sample(logits: Tensor, rows: list[SampleRow], generator: torch.Generator | None = None
           ) -> tuple[list[int], list[TokenLogprob | None]]:
    """logits [B, V] (fp32; V already limited to the tokenizer's vocabulary) -> one token per row."""
    raw = logits
    logprobs_needed = any(r.params.logprobs is not None for r in rows)
    raw_logprobs = torch.log_softmax(raw, dim=-1) if logprobs_needed else None
    picks: list[Tensor] = []  # 0-d tensors: one device->host copy for the whole batch at the end
    for b, row in enumerate(rows):
        p = row.params
        x = raw[b].clone()
        for token_id, bias in p.logit_bias.items():
            x[token_id] += bias
        if row.banned:
            x[row.banned] = float("-inf")
        x = _finite(_apply_penalties(x, row))
        if p.greedy:
            picks.append(torch.argmax(x))
        else:
            picks.append(torch.multinomial(_truncate(x, p), 1, generator=row.generator or generator)[0])
    tokens: list[int] = torch.stack(picks).tolist()
    logprobs: list[TokenLogprob | None] = []
    for b, row in enumerate(rows):
        k = row.params.logprobs
        logprobs.append(None if k is None else token_logprob(raw_logprobs[b], tokens[b], k))
    return tokens, logprobs


def token_logprob(row_logprobs: Tensor, token_id: int, k: int) -> TokenLogprob:
    top = []
    if k > 0:
        values, ids = torch.topk(row_logprobs, k)
        top = list(zip(ids.tolist(), values.tolist(), strict=True))
    return TokenLogprob(token_id, float(row_logprobs[token_id]), top)
