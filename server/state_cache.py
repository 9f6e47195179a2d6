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

A conversation continued by reference (the Responses API's ``previous_response_id``) never hashes its
history: its states are keyed by a chain, the key of the state it continues hashed with the tokens since
(``chain_key``), and found by that exact key (``get``). Those entries take no part in prefix lookups.

Below the memory tier there may be a slower one (server/state_tiers.py: local disk, later a shared
store): every entry is written through to it, and a key missing in memory is looked for there, then kept
in memory again.
"""

from __future__ import annotations

import hashlib
from array import array
from collections import Counter, OrderedDict

from torch import Tensor

from miras_serve.models.model import ModelState

from .state_tiers import CachedState, StateTier

__all__ = ["CachedState", "StateCache", "chain_key", "prefix_key", "state_key"]


def _token_bytes(token_ids: list[int]) -> bytes:
    return array("q", token_ids).tobytes()


def _hasher(namespace: str) -> hashlib.blake2b:
    """An empty token-id hasher keyed by the namespace: equal token ids in two namespaces never share a key."""
    return hashlib.blake2b(digest_size=16, key=hashlib.blake2b(namespace.encode("utf-8", "surrogatepass")).digest())


def prefix_key(token_ids: list[int], namespace: str) -> bytes:
    """The key of the state after ``token_ids`` from the start, in ``namespace``."""
    hasher = _hasher(namespace)
    hasher.update(_token_bytes(token_ids))
    return hasher.digest()


def chain_key(parent: bytes, token_ids: list[int]) -> bytes:
    """The key of the state after the state under ``parent`` continued with ``token_ids``: as distinct per
    namespace as ``parent`` is, and computed without the tokens before it."""
    hasher = hashlib.blake2b(digest_size=16, key=parent, person=b"miras-chain")
    hasher.update(_token_bytes(token_ids))
    return hasher.digest()


def state_key(context: bytes | None, namespace: str, token_ids: list[int]) -> bytes:
    """The key of the state after ``token_ids``: from the start of a sequence in ``namespace`` (no
    context), or continuing the saved state under the key ``context``."""
    return prefix_key(token_ids, namespace) if context is None else chain_key(context, token_ids)


class StateCache:
    def __init__(self, capacity_bytes: int, tier: StateTier | None = None):
        self.capacity_bytes = capacity_bytes
        self.tier = tier
        self.entries: OrderedDict[bytes, CachedState] = OrderedDict()  # least recently used first
        self.lengths: Counter[int] = Counter()  # lengths of the prefix entries, to know which prefixes to hash
        self.nbytes = 0

    def lookup(self, token_ids: list[int], namespace: str = "") -> CachedState | None:
        """The longest prefix of ``token_ids`` cached in ``namespace`` (in memory or in the tier below) that
        can continue it: shorter than the sequence, or the whole sequence if its entry has the logits to
        sample from."""
        data = _token_bytes(token_ids)
        lengths = set(self.lengths) | (set(self.tier.lengths()) if self.tier is not None else set())
        hasher, done, usable = _hasher(namespace), 0, []
        for length in sorted(n for n in lengths if n <= len(token_ids)):
            hasher.update(data[done * 8: length * 8])
            done = length
            key = hasher.copy().digest()
            entry = self.entries.get(key)
            if entry is not None:
                has_logits = entry.logits is not None
            else:
                found = self.tier.index(key) if self.tier is not None else None
                if found is None or not found[2]:
                    continue
                has_logits = found[1]
            if length < len(token_ids) or has_logits:
                usable.append(key)
        for key in reversed(usable):  # longest first; a tier may still reject its entry
            entry = self.get(key)
            if entry is not None:
                return entry
        return None

    def get(self, key: bytes) -> CachedState | None:
        """The entry under exactly ``key``: from memory, else from the tier below (and kept in memory)."""
        entry = self.entries.get(key)
        if entry is not None:
            self.entries.move_to_end(key)
            entry.tier, entry.load_seconds = "memory", 0.0
            return entry
        entry = self.tier.lookup(key) if self.tier is not None else None
        if entry is not None:
            self._remember(key, entry)
        return entry

    def insert(self, token_ids: list[int], state: ModelState, logits: Tensor | None = None,
               namespace: str = "") -> None:
        """Remember ``state`` (one row, not shared with anything that changes) after ``token_ids``, for
        requests of ``namespace`` only."""
        self.put(prefix_key(token_ids, namespace), CachedState(len(token_ids), state, logits))

    def put(self, key: bytes, entry: CachedState) -> None:
        """Remember ``entry`` under ``key`` (``prefix_key`` of its tokens, or a ``chain_key`` with
        ``entry.prefix`` false), here and in the tier below."""
        old = self.entries.get(key)
        if entry.logits is None and old is not None:
            # a finish entry of a sequence that generated nothing keeps the prompt's logits
            entry.logits = old.logits
        self._remember(key, entry)
        if self.tier is not None:
            self.tier.insert(key, entry)

    def delete(self, key: bytes) -> None:
        old = self.entries.pop(key, None)
        if old is not None:
            self._forget(old)
        if self.tier is not None:
            self.tier.delete(key)

    def _remember(self, key: bytes, entry: CachedState) -> None:
        old = self.entries.pop(key, None)
        if old is not None:
            self._forget(old)
        if entry.nbytes > self.capacity_bytes:
            return
        self.entries[key] = entry
        if entry.prefix:
            self.lengths[entry.length] += 1
        self.nbytes += entry.nbytes
        while self.nbytes > self.capacity_bytes:
            self._forget(self.entries.popitem(last=False)[1])

    def _forget(self, entry: CachedState) -> None:
        if entry.prefix:
            self.lengths[entry.length] -= 1
            if not self.lengths[entry.length]:
                del self.lengths[entry.length]
        self.nbytes -= entry.nbytes
