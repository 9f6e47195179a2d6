"""Tiers of saved recurrent states behind the in-process state cache: a local-disk tier here, a shared store
for replicas in state_tier_redis.py, both behind one interface (and stacked by ``StackedTiers``).

A tier maps a state-cache key (a digest that already carries the tenant namespace, see state_cache.py) to
one row of recurrent state. Entries are bound to the model that made them: the tier's files live under the
model's identity (a digest of its weights and config, the chunk size included), every file repeats that
identity and the key in its header, and its payload carries a checksum. A file that is corrupt, truncated,
from another model, or of another state layout is deleted and reported as a miss, so the state is
recomputed, never used.

States are serialised generically over ``ModelState``'s position and layer dicts (``pos`` and
``layers.<i>.<name>`` in safetensors), whatever tensors the layers hold. Writes happen on a background
thread: the engine thread only hands over the row it already copied out of the pool.
"""

from __future__ import annotations

import atexit
import hashlib
import json
import logging
import os
import queue
import struct
import threading
import time
from collections import Counter, OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO, Protocol

import torch
from safetensors.torch import load as load_tensors
from safetensors.torch import save as save_tensors

from miras_serve.models import MirasLM
from miras_serve.models.model import ModelState

logger = logging.getLogger("miras.state_tiers")

MAGIC = b"MIRASST1"
_HEADER_LEN = struct.Struct("<I")


@dataclass
class CachedState:
    """One row of recurrent state after ``length`` tokens, with the next-token logits when known."""

    length: int
    state: ModelState
    logits: torch.Tensor | None = None
    prefix: bool = True  # keyed by its token ids, so prefix lookups can find it (else by a chained key)
    tier: str = "memory"  # where it was found
    load_seconds: float = 0.0  # time it took to bring it into memory (0 for the memory tier)

    @property
    def nbytes(self) -> int:
        return self.state.nbytes() + (0 if self.logits is None else self.logits.numel() * self.logits.element_size())


class StateTier(Protocol):
    """What the state cache needs of a tier below it. ``index`` answers without I/O which keys the tier
    holds (for the prefix lookups of the cache); ``lookup`` may do I/O and returns None for an entry it
    had to reject."""

    name: str
    nbytes: int  # what it holds

    def index(self, key: bytes) -> tuple[int, bool, bool] | None:
        """(length, has logits, prefix entry) of the entry under ``key``, or None."""

    def lengths(self) -> Counter[int]:
        """How many prefix entries of each length the tier holds."""

    def lookup(self, key: bytes) -> CachedState | None: ...

    def insert(self, key: bytes, entry: CachedState) -> None: ...

    def delete(self, key: bytes) -> None: ...

    def flush(self) -> None:
        """Wait until what was inserted is stored (shutdown, tests)."""


def model_identity(model: MirasLM) -> str:
    """A digest of what makes a saved state valid for a model: its config (the chunk size included) and
    every weight. Two models with the same identity compute the same state from the same tokens."""
    digest = hashlib.blake2b(digest_size=16)
    digest.update(json.dumps(model.config.to_dict(), sort_keys=True).encode())
    for name, tensor in sorted(model.state_dict().items()):
        digest.update(name.encode())
        digest.update(str(tensor.dtype).encode())
        digest.update(json.dumps(list(tensor.shape)).encode())
        digest.update(tensor.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def state_tensors(state: ModelState) -> dict[str, torch.Tensor]:
    """A state's tensors by name (``pos``, ``layers.<i>.<name>``), whatever its layers hold."""
    named = {"pos": state.pos}
    for i, layer in enumerate(state.layers):
        named.update({f"layers.{i}.{name}": t for name, t in layer.items()})
    return named


def layout(state: ModelState) -> dict[str, tuple[str, tuple[int, ...]]]:
    """Name -> (dtype, shape without the batch dim) of every tensor of a state: what must match to restore."""
    return {name: (str(t.dtype), tuple(t.shape[1:])) for name, t in state_tensors(state).items()}


def encode_state(entry: CachedState) -> bytes:
    tensors = {name: t.detach().cpu().contiguous() for name, t in state_tensors(entry.state).items()}
    if entry.logits is not None:
        tensors["logits"] = entry.logits.detach().cpu().contiguous()
    return save_tensors(tensors)


def decode_state(payload: bytes, template: ModelState, device: torch.device) -> tuple[ModelState, torch.Tensor | None]:
    """The state in ``payload``, which must have exactly ``template``'s tensors (names, dtypes, shapes)."""
    tensors = load_tensors(payload)
    logits = tensors.pop("logits", None)
    found = {name: (str(t.dtype), tuple(t.shape[1:])) for name, t in tensors.items()}
    if found != layout(template) or any(t.shape[0] != 1 for t in tensors.values()):
        raise ValueError("state layout differs from the model's")
    layers = [{name: tensors[f"layers.{i}.{name}"].to(device) for name in layer} for i, layer in
              enumerate(template.layers)]
    return ModelState(tensors["pos"].to(device), layers), None if logits is None else logits.to(device)


def pack_entry(identity: str, key: bytes, entry: CachedState) -> bytes:
    """A saved state as stored by every tier: magic, a JSON header (model identity, key, length, checksum of
    the payload) and the safetensors payload."""
    payload = encode_state(entry)
    header = json.dumps({"identity": identity, "key": key.hex(), "length": entry.length, "prefix": entry.prefix,
                         "logits": entry.logits is not None,
                         "checksum": hashlib.blake2b(payload, digest_size=16).hexdigest()}).encode()
    return MAGIC + _HEADER_LEN.pack(len(header)) + header + payload


def read_header(f: BinaryIO, identity: str) -> dict:
    """The header of a packed entry (``f`` is left at its payload); ValueError if it is not one of this
    model's."""
    if f.read(len(MAGIC)) != MAGIC:
        raise ValueError("not a saved state")
    (size,) = _HEADER_LEN.unpack(f.read(_HEADER_LEN.size))
    header = json.loads(f.read(size))
    if header.get("identity") != identity:
        raise ValueError("saved by another model")
    return header


def unpack_entry(f: BinaryIO, identity: str, key: bytes, template: ModelState, device: torch.device
                 ) -> tuple[dict, ModelState, torch.Tensor | None]:
    """The header, state and logits of a packed entry, checked against the model identity, the key, the checksum
    and the layout; ValueError (struct.error included) when any differs."""
    try:
        header = read_header(f, identity)
    except struct.error as exc:
        raise ValueError("truncated") from exc
    payload = f.read()
    if header.get("key") != key.hex():
        raise ValueError("entry holds another key")
    if hashlib.blake2b(payload, digest_size=16).hexdigest() != header.get("checksum"):
        raise ValueError("checksum mismatch")
    return header, *decode_state(payload, template, device)


class BackgroundWriter:
    """One daemon thread that runs file writes and deletes in order, off the engine and event-loop threads.
    ``flush`` waits for what is queued (tests, shutdown; and at exit, so no write is cut off)."""

    def __init__(self, name: str):
        self.jobs: queue.Queue[Callable[[], None]] = queue.Queue()
        self.thread = threading.Thread(target=self._run, name=name, daemon=True)
        self.thread.start()
        atexit.register(self.flush)

    def submit(self, job: Callable[[], None]) -> None:
        self.jobs.put(job)

    def flush(self) -> None:
        self.jobs.join()

    def _run(self) -> None:
        while True:
            job = self.jobs.get()
            try:
                job()
            except Exception:  # noqa: BLE001 - a failed write loses a cached state, never a request
                logger.warning("background write failed", exc_info=True)
            finally:
                self.jobs.task_done()


def write_atomically(path: Path, data: bytes) -> None:
    """Write to a temporary file, then rename: a reader never sees a partial file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{threading.get_ident()}.tmp")
    with open(tmp, "wb") as f:
        f.write(data)
    os.replace(tmp, path)


@dataclass
class _DiskEntry:
    length: int
    has_logits: bool
    prefix: bool
    nbytes: int
    used: float  # wall time of the last write or hit (file mtime after a restart)


class DiskStateTier:
    """Saved states as files under ``<root>/<model identity>/states/``: bounded in bytes (least recently
    used first), optionally expiring ``ttl`` seconds after their last use, written asynchronously and
    checksummed. The index of what is on disk is kept in memory (rebuilt from the file headers at start),
    so asking the tier whether it holds a key does no I/O."""

    name = "disk"

    def __init__(self, root: str | Path, identity: str, template: ModelState, capacity_bytes: int,
                 ttl_seconds: float = 0.0, writer: BackgroundWriter | None = None,
                 on_reject: Callable[[str], None] | None = None, max_pending_bytes: int = 1 << 30):
        self.model_dir = Path(root) / identity  # what this model saves (other stores may live here too)
        self.dir = self.model_dir / "states"
        self.identity = identity
        self.template = template  # one fresh row: the layout every loaded state must have
        self.device = template.pos.device
        self.capacity_bytes = capacity_bytes
        self.ttl_seconds = ttl_seconds
        self.writer = writer or BackgroundWriter("miras-state-writer")
        self.entries: OrderedDict[bytes, _DiskEntry] = OrderedDict()  # least recently used first
        self._lengths: Counter[int] = Counter()
        self.nbytes = 0
        self.pending: dict[bytes, CachedState] = {}  # queued for writing; served from memory meanwhile
        self.max_pending_bytes = max_pending_bytes
        self.on_reject = on_reject or (lambda reason: None)  # a metric: why an entry was not used
        self._lock = threading.Lock()  # the writer thread and the engine thread both touch ``pending``
        self._scan()

    # ---- the tier interface ---------------------------------------------------------------------------

    def index(self, key: bytes) -> tuple[int, bool, bool] | None:
        entry = self.entries.get(key)
        if entry is None or self._expired(entry):
            return None
        return entry.length, entry.has_logits, entry.prefix

    def lengths(self) -> Counter[int]:
        return self._lengths

    def lookup(self, key: bytes) -> CachedState | None:
        entry = self.entries.get(key)
        if entry is None:
            return None
        if self._expired(entry):
            self.delete(key)
            return None
        start = time.perf_counter()
        with self._lock:
            pending = self.pending.get(key)
        if pending is not None:
            state, logits = pending.state, pending.logits
        else:
            try:
                state, logits = self._read(key)
            except (OSError, ValueError) as exc:
                reason = "missing" if isinstance(exc, FileNotFoundError) else "corrupt"
                logger.warning("rejected saved state %s (%s): %s", key.hex(), reason, exc)
                self.on_reject(reason)
                self.delete(key)
                return None
        entry.used = time.time()
        self.entries.move_to_end(key)
        if pending is None:  # the file's time is its last use after a restart (order and expiry)
            path = self._path(key)
            self.writer.submit(lambda: os.utime(path) if path.exists() else None)
        return CachedState(entry.length, state, logits, entry.prefix, self.name, time.perf_counter() - start)

    def insert(self, key: bytes, entry: CachedState) -> None:
        old = self.entries.get(key)
        if old is not None and not self._expired(old) and (old.has_logits or entry.logits is None):
            # the same key is the same tokens of the same model: the file already holds this state
            old.used = time.time()
            self.entries.move_to_end(key)
            return
        self.delete(key)
        disk = _DiskEntry(entry.length, entry.logits is not None, entry.prefix, entry.nbytes, time.time())
        with self._lock:
            backlog = sum(e.nbytes for e in self.pending.values())
        if disk.nbytes > self.capacity_bytes or backlog + disk.nbytes > self.max_pending_bytes:
            return  # too big, or the disk is behind: this state stays in memory only
        self._add(key, disk)
        with self._lock:
            self.pending[key] = entry
        self.writer.submit(lambda: self._write(key, entry))
        self._evict()

    def delete(self, key: bytes) -> None:
        entry = self.entries.pop(key, None)
        if entry is None:
            return
        self._forget(entry)
        with self._lock:
            self.pending.pop(key, None)  # a write still queued is skipped
        path = self._path(key)
        self.writer.submit(lambda: path.unlink(missing_ok=True))  # queued writes run in order

    def flush(self) -> None:
        self.writer.flush()

    # ---- files ----------------------------------------------------------------------------------------

    def _path(self, key: bytes) -> Path:
        name = key.hex()
        return self.dir / name[:2] / f"{name}.state"

    def _write(self, key: bytes, entry: CachedState) -> None:
        try:
            with self._lock:
                if self.pending.get(key) is not entry:  # replaced or deleted before it was written
                    return
            write_atomically(self._path(key), pack_entry(self.identity, key, entry))
        finally:
            with self._lock:
                if self.pending.get(key) is entry:
                    del self.pending[key]

    def _read(self, key: bytes) -> tuple[ModelState, torch.Tensor | None]:
        with open(self._path(key), "rb") as f:
            _, state, logits = unpack_entry(f, self.identity, key, self.template, self.device)
        return state, logits

    def _scan(self) -> None:
        """Rebuild the index from the files' headers, oldest first (a restart keeps every saved state)."""
        found = []
        for path in self.dir.glob("*/*.state"):
            try:
                with open(path, "rb") as f:
                    header = read_header(f, self.identity)
                stat = path.stat()
                found.append((stat.st_mtime, bytes.fromhex(header["key"]), header, stat.st_size))
            except (OSError, ValueError, KeyError) as exc:
                logger.warning("removing unreadable saved state %s: %s", path, exc)
                path.unlink(missing_ok=True)
        for mtime, key, header, size in sorted(found, key=lambda item: item[0]):
            self._add(key, _DiskEntry(int(header["length"]), bool(header["logits"]), bool(header["prefix"]),
                                      size, mtime))
        self._evict()

    # ---- bookkeeping ----------------------------------------------------------------------------------

    def _expired(self, entry: _DiskEntry) -> bool:
        return self.ttl_seconds > 0 and time.time() - entry.used > self.ttl_seconds

    def _add(self, key: bytes, entry: _DiskEntry) -> None:
        self.entries[key] = entry
        self.nbytes += entry.nbytes
        if entry.prefix:
            self._lengths[entry.length] += 1

    def _forget(self, entry: _DiskEntry) -> None:
        self.nbytes -= entry.nbytes
        if entry.prefix:
            self._lengths[entry.length] -= 1
            if not self._lengths[entry.length]:
                del self._lengths[entry.length]

    def _evict(self) -> None:
        while self.entries:
            key, oldest = next(iter(self.entries.items()))
            if self.nbytes <= self.capacity_bytes and not self._expired(oldest):
                return
            self.delete(key)


class StackedTiers:
    """Several tiers below memory, fastest first (local disk, then a shared store): an entry is looked for
    in each in turn and written to all, so whichever holds it serves it."""

    def __init__(self, tiers: list[StateTier]):
        self.tiers = tiers
        self.name = "+".join(t.name for t in tiers)

    @property
    def nbytes(self) -> int:
        return sum(t.nbytes for t in self.tiers)

    def index(self, key: bytes) -> tuple[int, bool, bool] | None:
        return next((found for t in self.tiers if (found := t.index(key)) is not None), None)

    def lengths(self) -> Counter[int]:
        total: Counter[int] = Counter()
        for t in self.tiers:
            total.update(t.lengths())
        return total

    def lookup(self, key: bytes) -> CachedState | None:
        return next((entry for t in self.tiers if (entry := t.lookup(key)) is not None), None)

    def insert(self, key: bytes, entry: CachedState) -> None:
        for t in self.tiers:
            t.insert(key, entry)

    def delete(self, key: bytes) -> None:
        for t in self.tiers:
            t.delete(key)

    def flush(self) -> None:
        for t in self.tiers:
            t.flush()
