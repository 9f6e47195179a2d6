"""Batched sampling: a whole batch of next-token logits becomes tokens in a fixed number of tensor ops.

Each sequence's parameters live in per-slot tables on the logits' device, written once when the sequence
starts; a step gathers them by slot and transforms every row at once: logit bias, banned ids (eos and
stop ids before ``min_tokens``), repetition / presence / frequency penalties, temperature, top-k, top-p,
min-p, then one draw per row. A stage runs only while some live sequence uses it; the other rows get
neutral values (bias 0, penalty 1, top-p off, ...) that leave them bit for bit unchanged. Rows are never
mixed, so a row's result does not depend on what else is in the batch. (A per-row allowed-token mask,
e.g. for structured outputs, would be one more ``masked_fill`` next to the banned ids.)

Randomness: each row draws one uniform number per step, a hash of the sequence's key and its step
(the number of tokens it has generated), and picks the token where that number falls in the cumulative
distribution of the filtered probabilities, in vocabulary order (inverse CDF). A seeded request's key is
``seed + i`` for its sample ``i`` (vLLM's convention), so the same seed and prompt give the same tokens
alone or in any batch; an unseeded sequence gets a key from the engine's generator.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .outputs import TokenLogprob
from .sampling_params import SamplingParams

_MASK32 = 0xFFFFFFFF


def _mix32(x: Tensor) -> Tensor:
    """A 32-bit integer hash (two xorshift-multiply rounds) on int64 tensors holding values < 2**32.
    Both multipliers are below 2**31, so no product overflows int64: exact on every device."""
    x = x ^ (x >> 16)
    x = (x * 0x21F0AAAD) & _MASK32
    x = x ^ (x >> 15)
    x = (x * 0x735A2D97) & _MASK32
    return x ^ (x >> 15)


def row_uniforms(key: Tensor, step: Tensor) -> Tensor:
    """One uniform number in (0, 1) per row, a pure function of (key, step) (int64 tensors; key taken
    modulo 2**64, step modulo 2**32). float64, so ``u * total`` stays below ``total``."""
    h = _mix32(step & _MASK32)
    h = _mix32(h ^ ((key >> 32) & _MASK32))
    h = _mix32(h ^ (key & _MASK32))
    return (h.double() + 0.5) / 2.0**32


def _finite(logits: Tensor) -> Tensor:
    """Extreme parameters can overflow a row; NaN never wins and +inf becomes the largest float."""
    return torch.nan_to_num(logits, nan=float("-inf"), posinf=torch.finfo(logits.dtype).max)


def _int64(value: int) -> int:
    """A Python int as the int64 with the same low 64 bits."""
    value &= (1 << 64) - 1
    return value - (1 << 64) if value >= 1 << 63 else value


class Sampler:
    """Sampling parameters and token counts of up to ``num_slots`` sequences, indexed by state slot."""

    def __init__(self, num_slots: int, vocab_size: int, eos_token_id: int, device: torch.device,
                 generator: torch.Generator):
        self.num_slots, self.vocab_size, self.eos_token_id = num_slots, vocab_size, eos_token_id
        self.device = device
        self.generator = generator  # keys of unseeded sequences
        ones, zeros = torch.ones(num_slots, device=device), torch.zeros(num_slots, device=device)
        self.temperature = ones.clone()  # 1 for greedy rows (they take the argmax)
        self.greedy = torch.ones(num_slots, dtype=torch.bool, device=device)
        self.top_k = torch.full((num_slots,), vocab_size, dtype=torch.long, device=device)
        self.top_p = ones.clone()
        self.min_p = zeros.clone()
        self.repetition = ones.clone()
        self.presence = zeros.clone()
        self.frequency = zeros.clone()
        self.key = torch.zeros(num_slots, dtype=torch.long, device=device)
        self.step = torch.zeros(num_slots, dtype=torch.long, device=device)  # tokens generated so far
        self.min_tokens = torch.zeros(num_slots, dtype=torch.long, device=device)
        # [num_slots, vocab] tables, allocated when a sequence first needs one
        self.bias: Tensor | None = None
        self.banned: Tensor | None = None  # ids banned while step < min_tokens
        self.seen: Tensor | None = None  # ids in the prompt or the output (repetition penalty)
        self.generated: Tensor | None = None  # output counts (presence / frequency penalties)
        # live slots using each optional stage: a stage runs while its set is non-empty
        self.users: dict[str, set[int]] = {name: set() for name in
                                           ("bias", "banned", "penalties", "top_k", "top_p", "min_p", "random")}
        self.num_logprobs: list[int | None] = [None] * num_slots

    def _table(self, name: str, dtype: torch.dtype) -> Tensor:
        if getattr(self, name) is None:
            setattr(self, name, torch.zeros(self.num_slots, self.vocab_size, dtype=dtype, device=self.device))
        return getattr(self, name)

    def add(self, slot: int, params: SamplingParams, index: int, prompt_token_ids: list[int]) -> None:
        """Sequence ``index`` of a request starts in ``slot``: write its parameters (once per sequence)."""
        self.remove(slot)
        greedy = params.greedy
        self.greedy[slot] = greedy
        self.temperature[slot] = 1.0 if greedy else params.temperature
        self.top_k[slot] = params.top_k if 0 < params.top_k < self.vocab_size else self.vocab_size
        self.top_p[slot] = params.top_p if params.top_p < 1.0 else 2.0  # 2: the cumulative mass never reaches it
        self.min_p[slot] = params.min_p
        self.repetition[slot] = params.repetition_penalty
        self.presence[slot] = params.presence_penalty
        self.frequency[slot] = params.frequency_penalty
        self.step[slot] = 0
        self.min_tokens[slot] = params.min_tokens
        if params.seed is not None:
            self.key[slot] = _int64(params.seed + index)
        else:  # drawn on the device: no host sync
            self.key[slot: slot + 1] = torch.randint(-(1 << 63), (1 << 63) - 1, (1,), generator=self.generator,
                                                     device=self.generator.device)
        self.num_logprobs[slot] = params.logprobs
        uses = {"random": not greedy,
                "top_k": not greedy and 0 < params.top_k < self.vocab_size,
                "top_p": not greedy and params.top_p < 1.0,
                "min_p": not greedy and params.min_p > 0.0,
                "bias": bool(params.logit_bias),
                "banned": params.min_tokens > 0,
                "penalties": params.repetition_penalty != 1.0 or bool(params.presence_penalty)
                or bool(params.frequency_penalty)}
        for name, used in uses.items():
            if used:
                self.users[name].add(slot)
        # Once a table exists every starting sequence clears its row, so a sequence that does not use the
        # stage meets it with neutral values (bias 0, nothing banned; its penalties are 1 and 0 whatever
        # its counts).
        for name, stage, dtype in (("bias", "bias", torch.float32), ("banned", "banned", torch.bool),
                                   ("seen", "penalties", torch.bool), ("generated", "penalties", torch.float32)):
            if getattr(self, name) is not None or uses[stage]:
                self._table(name, dtype)[slot].zero_()
        if uses["bias"]:
            ids = torch.tensor(list(params.logit_bias), dtype=torch.long, device=self.device)
            self.bias[slot, ids] = torch.tensor(list(params.logit_bias.values()), device=self.device)
        if uses["banned"]:
            banned = list(params.stop_token_ids) + ([] if params.ignore_eos else [self.eos_token_id])
            self.banned[slot, torch.tensor(banned, dtype=torch.long, device=self.device)] = True
        if uses["penalties"]:
            self.seen[slot, torch.tensor(prompt_token_ids, dtype=torch.long, device=self.device)] = True

    def remove(self, slot: int) -> None:
        """The sequence in ``slot`` ended."""
        for users in self.users.values():
            users.discard(slot)
        self.num_logprobs[slot] = None

    def sample(self, logits: Tensor, slots: list[int]) -> tuple[list[int], list[TokenLogprob | None]]:
        """logits [B, V] (V the tokenizer's vocabulary), row b for the sequence in ``slots[b]`` -> one
        token per row, and its logprobs where the sequence asked for them. Advances each row's step."""
        index = torch.tensor(slots, dtype=torch.long, device=self.device)
        x = self._process(logits.float(), index)
        tokens = torch.argmax(x, dim=-1)
        if self.users["random"]:
            tokens = torch.where(self.greedy[index], tokens, self._draw(x, index, tokens))
        self.step[index] += 1
        if self.seen is not None:
            self.seen[index, tokens] = True
            self.generated[index, tokens] += 1.0
        return self._results(logits, slots, tokens)

    def _process(self, x: Tensor, index: Tensor) -> Tensor:
        """Bias, bans and penalties on the raw logits (what greedy rows take the argmax of)."""
        users = self.users
        if users["bias"]:
            x = x + self.bias[index]
        if users["banned"]:
            active = (self.step[index] < self.min_tokens[index]).unsqueeze(1)
            x = x.masked_fill(self.banned[index] & active, float("-inf"))
        if users["penalties"]:
            repetition = self.repetition[index].unsqueeze(1)
            penalised = torch.where(x > 0, x / repetition, x * repetition)
            x = torch.where(self.seen[index], penalised, x)
            generated = self.generated[index]
            x = x - (self.frequency[index].unsqueeze(1) * generated
                     + self.presence[index].unsqueeze(1) * (generated > 0).float())
        return _finite(x)

    def _filter(self, x: Tensor, index: Tensor) -> Tensor:
        """Temperature, top-k, top-p and min-p: the rows' sampling probabilities (not normalised)."""
        users = self.users
        x = _finite(x / self.temperature[index].unsqueeze(1))
        if users["top_k"] or users["top_p"]:
            ordered, order = torch.sort(x, dim=-1, descending=True, stable=True)
            if users["top_k"]:
                kth = ordered.gather(1, (self.top_k[index] - 1).unsqueeze(1))
                x = x.masked_fill(x < kth, float("-inf"))
        probs = torch.softmax(x, dim=-1)
        if users["top_p"]:
            # drop a token when the mass before it already reaches top_p (the top token always stays)
            ordered_probs = probs.gather(1, order)
            drop = (ordered_probs.cumsum(-1) - ordered_probs) >= self.top_p[index].unsqueeze(1)
            probs = probs.scatter(1, order, ordered_probs.masked_fill(drop, 0.0))
        if users["min_p"]:
            probs = probs.masked_fill(probs < self.min_p[index].unsqueeze(1) * probs.amax(-1, keepdim=True), 0.0)
        return probs

    def _draw(self, x: Tensor, index: Tensor, fallback: Tensor) -> Tensor:
        """One inverse-CDF draw per row from the filtered probabilities; a row with nothing left to sample
        (every logit -inf) keeps ``fallback`` (its argmax)."""
        cdf = self._filter(x, index).cumsum(-1, dtype=torch.float64)
        total = cdf[:, -1]
        target = row_uniforms(self.key[index], self.step[index]) * total
        drawn = torch.searchsorted(cdf, target.unsqueeze(1)).squeeze(1).clamp_(max=x.shape[1] - 1)
        return torch.where(torch.isfinite(total) & (total > 0), drawn, fallback)

    def _results(self, logits: Tensor, slots: list[int], tokens: Tensor) -> tuple[list[int], list[TokenLogprob | None]]:
        """Tokens and the logprobs (raw model distribution) of the rows that asked, with one device->host
        copy of each."""
        wanted = [self.num_logprobs[s] for s in slots]
        k = max((n for n in wanted if n is not None), default=None)
        if k is None:
            return tokens.tolist(), [None] * len(slots)
        logprobs = torch.log_softmax(logits.float(), dim=-1)
        chosen = logprobs.gather(1, tokens.unsqueeze(1)).squeeze(1)
        top_values, top_ids = torch.topk(logprobs, k)  # k = 0 gives empty rows
        token_list = tokens.tolist()
        chosen_list, values, ids = chosen.tolist(), top_values.tolist(), top_ids.tolist()
        out: list[TokenLogprob | None] = [
            None if n is None else TokenLogprob(token_list[b], chosen_list[b],
                                                list(zip(ids[b][:n], values[b][:n], strict=True)))
            for b, n in enumerate(wanted)]
        return token_list, out


def token_logprob(row_logprobs: Tensor, token_id: int, k: int) -> TokenLogprob:
    """One position's logprob and top-k from a row of logprobs (the prompt's, which are not sampled)."""
    top = []
    if k > 0:
        values, ids = torch.topk(row_logprobs, k)
        top = list(zip(ids.tolist(), values.tolist(), strict=True))
    return TokenLogprob(token_id, float(row_logprobs[token_id]), top)
