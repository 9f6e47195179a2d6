"""Batched sampling: a whole batch of next-token logits becomes tokens in a fixed number of tensor ops.

Each sequence's parameters live in per-slot tables on the logits' device, written once when the sequence
starts (logit bias, banned ids and penalty counts as [slots, vocab] tables, allocated on first use); a
step gathers them by slot. Each stage (logit bias, banned ids: eos and stop ids before ``min_tokens``,
repetition / presence / frequency penalties, temperature, top-k, top-p, min-p, the draw) is a fixed
number of tensor ops on the rows whose sequences use it, found from per-slot sets: a stage nobody uses
costs nothing, and the costly ones (the sort of top-p) never run on rows that do not need them; a batch of
greedy rows that use none takes the argmax of its (finite) logits and nothing more. Rows are
never mixed, so a row's result does not depend on what else is in the batch. Structured outputs add one
more stage next to the banned ids: each constrained row's grammar matcher (server/structured.py) writes its
allowed tokens into a bitmask, and every other token gets -inf; the engine advances the matchers.

Randomness: each row draws one uniform number per step, a hash of the sequence's key and its step
(the number of tokens it has generated), and picks the token where that number falls in the cumulative
distribution of the filtered probabilities, in vocabulary order (inverse CDF). A seeded request's key is
``seed + i`` for its sample ``i`` (vLLM's convention), so the same seed and prompt give the same tokens
alone or in any batch; an unseeded sequence gets a key from the engine's generator.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import partial

import torch
from torch import Tensor

from .outputs import TokenLogprob
from .sampling_params import SamplingParams
from .structured import GrammarMatcher, allocate_bitmask, allowed_mask

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
    modulo 2**64, step modulo 2**32); float64, with 32 random bits."""
    h = _mix32(step & _MASK32)
    h = _mix32(h ^ ((key >> 32) & _MASK32))
    h = _mix32(h ^ (key & _MASK32))
    return (h.double() + 0.5) / 2.0**32


def _finite_(logits: Tensor) -> Tensor:
    """Extreme parameters can overflow a row; NaN never wins and +inf becomes the largest float. In place
    (on a CPU many times faster than into a fresh tensor)."""
    return logits.nan_to_num_(nan=float("-inf"), posinf=torch.finfo(logits.dtype).max)


def _finite(logits: Tensor) -> Tensor:
    """:func:`_finite_` into a new tensor (the caller's logits stay raw)."""
    return logits.nan_to_num(nan=float("-inf"), posinf=torch.finfo(logits.dtype).max)


def _int64(value: int) -> int:
    """A Python int as the int64 with the same low 64 bits."""
    value &= (1 << 64) - 1
    return value - (1 << 64) if value >= 1 << 63 else value


@dataclass
class _Rows:
    """The rows of a batch whose sequences use a stage: their positions (``slice(None)``: every row),
    slots, and slots on the device."""

    take: Tensor | slice
    slots: list[int]
    index: Tensor

    def put(self, x: Tensor, rows: Tensor) -> Tensor:
        """Replace these rows of ``x`` (a tensor of the sampler's own, written in place) with ``rows``."""
        return rows if isinstance(self.take, slice) else x.index_copy_(0, self.take, rows)


class Sampler:
    """Sampling parameters and token counts of up to ``num_slots`` sequences, indexed by state slot."""

    def __init__(self, num_slots: int, vocab_size: int, eos_token_id: int, device: torch.device,
                 generator: torch.Generator):
        self.num_slots, self.vocab_size, self.eos_token_id = num_slots, vocab_size, eos_token_id
        self.device = device
        self.generator = generator  # keys of unseeded sequences
        self.temperature = torch.ones(num_slots, device=device)
        self.top_k = torch.zeros(num_slots, dtype=torch.long, device=device)
        self.top_p = torch.ones(num_slots, device=device)
        self.min_p = torch.zeros(num_slots, device=device)
        self.penalty = torch.zeros(num_slots, 3, device=device)  # repetition, presence, frequency
        self.key = torch.zeros(num_slots, dtype=torch.long, device=device)
        # tokens generated so far, counted for the sequences that read it (random draws, min_tokens bans)
        self.step = torch.zeros(num_slots, dtype=torch.long, device=device)
        self.min_tokens = torch.zeros(num_slots, dtype=torch.long, device=device)
        # [num_slots, vocab] tables, allocated when a sequence first needs one; only users' rows are read
        self.bias: Tensor | None = None
        self.banned: Tensor | None = None  # ids banned while step < min_tokens
        self.seen: Tensor | None = None  # ids in the prompt or the output (repetition penalty)
        self.generated: Tensor | None = None  # output counts (presence / frequency penalties)
        # live slots using each stage: a stage runs on the rows of its users only
        self.users: dict[str, set[int]] = {name: set() for name in
                                           ("bias", "banned", "guided", "penalties", "random", "top_k",
                                                            "top_p", "min_p")}
        self.params: list[SamplingParams | None] = [None] * num_slots
        self.matchers: list[GrammarMatcher | None] = [None] * num_slots

    def _table(self, name: str, dtype: torch.dtype) -> Tensor:
        if getattr(self, name) is None:
            setattr(self, name, torch.zeros(self.num_slots, self.vocab_size, dtype=dtype, device=self.device))
        return getattr(self, name)

    def add(self, slot: int, params: SamplingParams, index: int, prompt_token_ids: list[int],
            matcher: GrammarMatcher | None = None) -> None:
        """Sequence ``index`` of a request starts in ``slot``: write its parameters (once per sequence).
        ``matcher``: its grammar, which this sampler reads (the caller advances it with each token)."""
        self.remove(slot)
        self.params[slot] = params
        self.matchers[slot] = matcher
        random = not params.greedy
        uses = {"random": random,
                "top_k": random and 0 < params.top_k < self.vocab_size,
                "top_p": random and params.top_p < 1.0,
                "min_p": random and params.min_p > 0.0,
                "bias": bool(params.logit_bias),
                "banned": params.min_tokens > 0,
                "guided": matcher is not None,
                "penalties": params.repetition_penalty != 1.0 or bool(params.presence_penalty)
                or bool(params.frequency_penalty)}
        for name, used in uses.items():
            if used:
                self.users[name].add(slot)
        self.temperature[slot] = params.temperature if random else 1.0
        self.top_k[slot] = params.top_k
        self.top_p[slot] = params.top_p
        self.min_p[slot] = params.min_p
        self.step[slot] = 0
        self.min_tokens[slot] = params.min_tokens
        if params.seed is not None:
            self.key[slot] = _int64(params.seed + index)
        else:  # drawn on the device: no host sync
            self.key[slot: slot + 1] = torch.randint(0, 1 << 62, (1,), generator=self.generator,
                                                     device=self.generator.device)
        ids = partial(torch.tensor, dtype=torch.long, device=self.device)
        if uses["bias"]:
            bias = self._table("bias", torch.float32)[slot]
            bias.zero_()
            bias[ids(list(params.logit_bias))] = torch.tensor(list(params.logit_bias.values()), device=self.device)
        if uses["banned"]:
            banned = self._table("banned", torch.bool)[slot]
            banned.zero_()
            banned[ids(list(params.stop_token_ids) + ([] if params.ignore_eos else [self.eos_token_id]))] = True
        if uses["penalties"]:
            self.penalty[slot] = torch.tensor([params.repetition_penalty, params.presence_penalty,
                                               params.frequency_penalty])
            seen, generated = self._table("seen", torch.bool)[slot], self._table("generated", torch.float32)[slot]
            seen.zero_()
            seen[ids(prompt_token_ids)] = True
            generated.zero_()

    def remove(self, slot: int) -> None:
        """The sequence in ``slot`` ended."""
        for users in self.users.values():
            users.discard(slot)
        self.params[slot] = None
        self.matchers[slot] = None

    def _rows(self, stage: str, slots: list[int], index: Tensor) -> _Rows | None:
        """The rows of a batch (sequences in ``slots``) that use ``stage``; None if none does."""
        users = self.users[stage]
        if not users:
            return None
        positions = [b for b, slot in enumerate(slots) if slot in users]
        if not positions:
            return None
        if len(positions) == len(slots):
            return _Rows(slice(None), slots, index)
        take = torch.tensor(positions, dtype=torch.long, device=self.device)
        return _Rows(take, [slots[b] for b in positions], index[take])

    @property
    def staged(self) -> set[int]:
        """Live slots using any stage: the others take the argmax of the raw logits."""
        return set().union(*self.users.values())

    def sample(self, logits: Tensor, slots: list[int], index: Tensor | None = None
               ) -> tuple[list[int], list[TokenLogprob | None]]:
        """logits [B, V] (V the tokenizer's vocabulary), row b for the sequence in ``slots[b]`` -> one
        token per row, and its logprobs where the sequence asked for them. Advances each row's step.
        ``index``: ``slots`` as a long tensor on the device, if the caller has one."""
        if self.staged.isdisjoint(slots):
            # greedy rows with no other stage, the common case: two tensor ops, where a step's few host ops
            # each cost tens of microseconds once the model has evicted them from the caches
            x = logits if logits.dtype == torch.float32 else logits.float()
            return self._results(logits, slots, torch.argmax(_finite(x), dim=-1))
        if index is None:
            index = torch.tensor(slots, dtype=torch.long, device=self.device)
        x = self._process(logits.to(torch.float32, copy=True), slots, index)  # raw logits stay for logprobs
        tokens = torch.argmax(x, dim=-1)
        if rows := self._rows("random", slots, index):
            tokens = rows.put(tokens, self._draw(x[rows.take], rows, tokens[rows.take]))
        self.step[index] += 1
        if self.seen is not None:
            self.seen[index, tokens] = True
            self.generated[index, tokens] += 1.0
        return self._results(logits, slots, tokens)

    def _process(self, x: Tensor, slots: list[int], index: Tensor) -> Tensor:
        """Bias, bans and penalties on a copy of the raw logits (written in place): what greedy rows take the
        argmax of."""
        if rows := self._rows("bias", slots, index):
            x = rows.put(x, x[rows.take] + self.bias[rows.index])
        if rows := self._rows("banned", slots, index):
            active = (self.step[rows.index] < self.min_tokens[rows.index]).unsqueeze(1)
            x = rows.put(x, x[rows.take].masked_fill(self.banned[rows.index] & active, float("-inf")))
        if rows := self._rows("guided", slots, index):
            bitmask = allocate_bitmask(len(rows.slots), self.vocab_size)
            for row, slot in enumerate(rows.slots):
                self.matchers[slot].fill_bitmask(bitmask, row)
            allowed = allowed_mask(bitmask, self.vocab_size, self.device)
            x = rows.put(x, x[rows.take].masked_fill(~allowed, float("-inf")))
        if rows := self._rows("penalties", slots, index):
            y = x[rows.take]
            repetition, presence, frequency = self.penalty[rows.index].unsqueeze(2).unbind(1)
            y = torch.where(self.seen[rows.index], torch.where(y > 0, y / repetition, y * repetition), y)
            generated = self.generated[rows.index]
            x = rows.put(x, y - (frequency * generated + presence * (generated > 0).float()))
        return _finite_(x)

    def _filter(self, x: Tensor, slots: list[int], index: Tensor) -> Tensor:
        """Temperature, top-k, top-p and min-p on rows that sample: their probabilities (not normalised)."""
        x = _finite_(x / self.temperature[index].unsqueeze(1))
        if rows := self._rows("top_k", slots, index):
            y = x[rows.take]
            largest = torch.topk(y, max(self.params[s].top_k for s in rows.slots)).values
            kth = largest.gather(1, (self.top_k[rows.index] - 1).unsqueeze(1))
            x = rows.put(x, y.masked_fill(y < kth, float("-inf")))
        probs = torch.softmax(x, dim=-1)
        if rows := self._rows("top_p", slots, index):
            # drop a token when the mass before it already reaches top_p (the top token always stays)
            ordered, order = torch.sort(probs[rows.take], dim=-1, descending=True, stable=True)
            drop = (ordered.cumsum(-1) - ordered) >= self.top_p[rows.index].unsqueeze(1)
            probs = rows.put(probs, torch.empty_like(ordered).scatter_(1, order, ordered.masked_fill(drop, 0.0)))
        if rows := self._rows("min_p", slots, index):
            y = probs[rows.take]
            y = y.masked_fill(y < self.min_p[rows.index].unsqueeze(1) * y.amax(-1, keepdim=True), 0.0)
            probs = rows.put(probs, y)
        return probs

    def _draw(self, x: Tensor, rows: _Rows, fallback: Tensor) -> Tensor:
        """One inverse-CDF draw per row from the filtered probabilities; a row with nothing left to sample
        (every logit -inf) keeps ``fallback`` (its argmax)."""
        cdf = self._filter(x, rows.slots, rows.index).cumsum(-1)
        total = cdf[:, -1]
        # u < 1, so the rounded target is at most total: the first index whose cdf reaches it has a
        # positive probability (total >= the top probability >= 1 / V, so it never rounds to 0 either)
        target = (row_uniforms(self.key[rows.index], self.step[rows.index]) * total).float()
        drawn = torch.searchsorted(cdf, target.unsqueeze(1)).squeeze(1).clamp_(max=x.shape[1] - 1)
        return torch.where(torch.isfinite(total) & (total > 0), drawn, fallback)

    def _results(self, logits: Tensor, slots: list[int], tokens: Tensor) -> tuple[list[int], list[TokenLogprob | None]]:
        """Tokens, and the logprobs (raw model distribution) of the rows that asked for them, computed for
        those rows only with one device->host copy of each result."""
        token_list = tokens.tolist()
        wanted = [(b, self.params[s].logprobs) for b, s in enumerate(slots)
                  if self.params[s] is not None and self.params[s].logprobs is not None]
        out: list[TokenLogprob | None] = [None] * len(slots)
        if not wanted:
            return token_list, out
        take = torch.tensor([b for b, _ in wanted], dtype=torch.long, device=self.device)
        logprobs = torch.log_softmax(logits[take].float(), dim=-1)
        chosen = logprobs.gather(1, tokens[take].unsqueeze(1)).squeeze(1).tolist()
        top_values, top_ids = torch.topk(logprobs, max(k for _, k in wanted))  # k = 0 gives empty rows
        values, ids = top_values.tolist(), top_ids.tolist()
        for row, (b, k) in enumerate(wanted):
            out[b] = TokenLogprob(token_list[b], chosen[row], list(zip(ids[row][:k], values[row][:k], strict=True)))
        return token_list, out


def token_logprob(row_logprobs: Tensor, token_id: int, k: int) -> TokenLogprob:
    """One position's logprob and top-k from a row of logprobs (the prompt's, which are not sampled)."""
    top = []
    if k > 0:
        values, ids = torch.topk(row_logprobs, k)
        top = list(zip(ids.tolist(), values.tolist(), strict=True))
    return TokenLogprob(token_id, float(row_logprobs[token_id]), top)
