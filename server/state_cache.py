"""Recurrent states of token sequences served before, so a prompt that repeats or extends one starts from
its state instead of prefilling it again: vLLM's prefix caching, for a model whose whole context is one
fixed-size state.

Entries are made where the engine holds a state anyway: at the end of every prompt's prefill (with the
last position's logits, so an identical prompt, a "regenerate", needs no prefill at all) and when a
sequence finishes (the prompt and all generated tokens but the last, which was sampled and never fed:
a client that continues with the generated token ids extends exactly that). A prompt restores its
longest cached prefix. Over a chat template the next turn restores at least the previous turn's whole
prompt: the reply comes back as text, and whether its re-rendering matches the generated tokens
depends on the template (the shipped one adds a space after "assistant:", so the reply is prefilled
again, never the conversation before it). Restoring
is exact: the model gives the same logits for a sequence in one pass or continued from any position's
state (the invariant the model and kernel tests check), so only the work changes.

Entries are keyed by a BLAKE2b digest of the token ids, hashed incrementally, so a lookup costs one pass
over the prompt however many entries there are. The hash is keyed by the request's cache namespace (its
tenant and salt, chosen by the caller): a state is only ever restored for a request of the same namespace,
so one tenant can neither reuse nor detect (by timing) another's prompts. Least recently used entries go
first once the states exceed the byte budget.
"""

from __future__ import annotations

import hashlib
from array import array
from collections import Counter, OrderedDict
from dataclasses import dataclass

from torch import Tensor

from models.model import ModelState


@dataclass
class CachedState:
    length: int  # tokens the state has consumed
    state: ModelState  # one row
    logits: Tensor | None  # next-token logits after those tokens (prompt entries only)

    @property
    def nbytes(self) -> int:
        return self.state.nbytes() + (0 if self.logits is None else self.logits.numel() * self.logits.element_size())


def _token_bytes(token_ids: list[int]) -> bytes:
    return array("q", token_ids).tobytes()


def _hasher(namespace: str) -> hashlib.blake2b:
    """An empty token-id hasher keyed by the namespace: equal token ids in two namespaces never share a key."""
    return hashlib.blake2b(digest_size=16, key=hashlib.blake2b(namespace.encode("utf-8", "surrogatepass")).digest())


def _key(token_ids: list[int], namespace: str) -> bytes:
    hasher = _hasher(namespace)
    hasher.update(_token_bytes(token_ids))
    return hasher.digest()


class StateCache:
    def __init__(self, capacity_bytes: int):
        self.capacity_bytes = capacity_bytes
        self.entries: OrderedDict[bytes, CachedState] = OrderedDict()  # least recently used first
        self.lengths: Counter[int] = Counter()  # lengths of the entries, to know which prefixes to hash
        self.nbytes = 0

    def lookup(self, token_ids: list[int], namespace: str = "") -> CachedState | None:
        """The longest prefix of ``token_ids`` cached in ``namespace`` that can continue it: shorter than the
        sequence, or the whole sequence if its entry has the logits to sample from."""
        data = _token_bytes(token_ids)
        hasher, done, best, best_key = _hasher(namespace), 0, None, b""
        for length in sorted(n for n in self.lengths if n <= len(token_ids)):
            hasher.update(data[done * 8: length * 8])
            done = length
            key = hasher.copy().digest()
            entry = self.entries.get(key)
            if entry is not None and (length < len(token_ids) or entry.logits is not None):
                best, best_key = entry, key
        if best is not None:
            self.entries.move_to_end(best_key)
        return best

    def insert(self, token_ids: list[int], state: ModelState, logits: Tensor | None = None,
               namespace: str = "") -> None:
        """Remember ``state`` (one row, not shared with anything that changes) after ``token_ids``, for
        requests of ``namespace`` only."""
        key = _key(token_ids, namespace)
        old = self.entries.pop(key, None)
        if old is not None:
            self._forget(old)
            if logits is None:  # a finish entry of a sequence that generated nothing keeps the prompt's logits
                logits = old.logits
        entry = CachedState(len(token_ids), state, logits)
        if entry.nbytes > self.capacity_bytes:
            return
        self.entries[key] = entry
        self.lengths[entry.length] += 1
        self.nbytes += entry.nbytes
        while self.nbytes > self.capacity_bytes:
            self._forget(self.entries.popitem(last=False)[1])

    def _forget(self, entry: CachedState) -> None:
        self.lengths[entry.length] -= 1
        if not self.lengths[entry.length]:
            del self.lengths[entry.length]
        self.nbytes -= entry.nbytes
