"""A shared tier of saved states in Redis, below the local tiers, so that every replica of a model restores
a conversation's state whichever replica made it (and a replica that dies loses none).

It keeps the local disk tier's contract (server/state_tiers.py): entries are stored in the same packed
form (model identity, key and a checksum in the header), under keys of that model identity only, and one
that is corrupt, from another model or of another layout is deleted and reported as a miss, so its state
is recomputed. The state-cache key already carries the tenant namespace. Per model identity, Redis holds:

- ``<prefix>:state:<key>``: the packed entry (expires ``ttl`` seconds after its last use, if set);
- ``<prefix>:index``: key -> [length, has logits, prefix entry, bytes], what ``index`` answers from;
- ``<prefix>:used``: key -> time of last use (sorted), to evict the least recently used beyond
  ``capacity_bytes`` (counted in ``<prefix>:bytes``) and to drop expired ones.

The index is mirrored in memory and refreshed every ``refresh_seconds`` by a background thread (so asking
whether a key is held does no I/O, and states saved by other replicas become visible); writes, touches and
evictions run on the background writer. Only ``lookup`` reads Redis on the engine thread, with a short
socket timeout. When Redis is unreachable the tier is skipped for ``retry_seconds`` at a time, with a
warning: requests are still served, their states recomputed, and health is unaffected.
"""

from __future__ import annotations

import io
import json
import logging
import threading
import time
from collections import Counter
from collections.abc import Callable
from typing import Any

from miras_serve.models.model import ModelState

from .state_tiers import BackgroundWriter, CachedState, pack_entry, unpack_entry

logger = logging.getLogger("miras.state_tiers")


def redis_client(url: str, timeout: float = 0.5) -> Any:
    """A client for ``url`` (redis://host:port/db) with short timeouts; the ``redis`` package is optional
    and only imported when a shared store is configured."""
    try:
        import redis
    except ImportError as exc:  # pragma: no cover - depends on the installation
        raise ValueError("a Redis store needs the 'redis' package: pip install 'miras-serve[redis]'") from exc
    return redis.Redis.from_url(url, socket_timeout=timeout, socket_connect_timeout=timeout)


class StoreHealth:
    """Whether a shared store is worth asking: after a failure it is skipped for ``retry_seconds``, and the
    warning is logged once per outage, not once per request."""

    def __init__(self, what: str, retry_seconds: float = 5.0):
        self.what = what
        self.retry_seconds = retry_seconds
        self.down_until = 0.0
        self.down = False

    def usable(self) -> bool:
        return time.monotonic() >= self.down_until

    def failed(self, exc: Exception) -> None:
        if not self.down:
            logger.warning("%s unreachable (%s): serving without it (states are recomputed) until it is back",
                           self.what, exc)
        self.down = True
        self.down_until = time.monotonic() + self.retry_seconds

    def ok(self) -> None:
        if self.down:
            logger.warning("%s reachable again", self.what)
        self.down = False

    def call(self, fn: Callable[[], Any], default: Any = None) -> Any:
        """``fn()``, or ``default`` if the store is down or fails now."""
        if not self.usable():
            return default
        try:
            result = fn()
        except Exception as exc:  # noqa: BLE001 - redis.RedisError and OSError: the store is unavailable
            self.failed(exc)
            return default
        self.ok()
        return result


class RedisStateTier:
    name = "redis"

    def __init__(self, client: Any, identity: str, template: ModelState, capacity_bytes: int,
                 ttl_seconds: float = 0.0, on_reject: Callable[[str], None] | None = None,
                 refresh_seconds: float = 1.0, retry_seconds: float = 5.0, max_pending_bytes: int = 1 << 30):
        self.redis = client
        self.identity = identity
        self.prefix = f"miras:{identity}"
        self.template = template
        self.device = template.pos.device
        self.capacity_bytes = capacity_bytes
        self.ttl_seconds = ttl_seconds
        self.on_reject = on_reject or (lambda reason: None)
        self.health = StoreHealth(f"shared state store {client.connection_pool.connection_kwargs.get('host', '')}:"
                                  f"{client.connection_pool.connection_kwargs.get('port', '')}", retry_seconds)
        self.writer = BackgroundWriter("miras-redis-writer")
        self.max_pending_bytes = max_pending_bytes
        self.pending: dict[bytes, CachedState] = {}  # queued for writing; served from memory meanwhile
        self._lock = threading.Lock()
        self.entries: dict[bytes, tuple[int, bool, bool]] = {}  # the mirror of the index
        self._lengths: Counter[int] = Counter()
        self.nbytes = 0
        self.refresh_seconds = refresh_seconds
        self._stop = threading.Event()
        self.refresh()
        self._refresher = threading.Thread(target=self._refresh_loop, name="miras-redis-index", daemon=True)
        self._refresher.start()

    def _key(self, what: str, key: bytes | None = None) -> str:
        return f"{self.prefix}:{what}" if key is None else f"{self.prefix}:{what}:{key.hex()}"

    # ---- the tier interface ---------------------------------------------------------------------------

    def index(self, key: bytes) -> tuple[int, bool, bool] | None:
        return self.entries.get(key) if self.health.usable() or key in self.pending else None

    def lengths(self) -> Counter[int]:
        return self._lengths

    def lookup(self, key: bytes) -> CachedState | None:
        start = time.perf_counter()
        with self._lock:
            pending = self.pending.get(key)
        if pending is not None:
            return CachedState(pending.length, pending.state, pending.logits, pending.prefix, self.name,
                               time.perf_counter() - start)
        data = self.health.call(lambda: self.redis.get(self._key("state", key)))
        if data is None:
            if self.health.usable() and key in self.entries:  # expired or evicted since the last refresh
                self._unindex(key)
            return None
        try:
            header, state, logits = unpack_entry(io.BytesIO(data), self.identity, key, self.template, self.device)
        except (ValueError, KeyError) as exc:
            logger.warning("rejected shared saved state %s (corrupt): %s", key.hex(), exc)
            self.on_reject("corrupt")
            self.delete(key)
            return None
        self.writer.submit(lambda: self._touch(key))
        return CachedState(int(header["length"]), state, logits, bool(header["prefix"]), self.name,
                           time.perf_counter() - start)

    def insert(self, key: bytes, entry: CachedState) -> None:
        if not self.health.usable():
            return
        old = self.entries.get(key)
        if old is not None and (old[1] or entry.logits is None):
            self.writer.submit(lambda: self._touch(key))  # the same tokens of the same model: already stored
            return
        with self._lock:
            backlog = sum(e.nbytes for e in self.pending.values())
            if entry.nbytes > self.capacity_bytes or backlog + entry.nbytes > self.max_pending_bytes:
                return  # too big, or Redis is behind: this state stays local
            self.pending[key] = entry
        self._index(key, (entry.length, entry.logits is not None, entry.prefix))
        self.writer.submit(lambda: self._write(key, entry))

    def delete(self, key: bytes) -> None:
        self._unindex(key)
        with self._lock:
            self.pending.pop(key, None)  # a write still queued is skipped
        self.writer.submit(lambda: self.health.call(lambda: self._remove([key])))

    def flush(self) -> None:
        self.writer.flush()

    def close(self) -> None:
        self._stop.set()
        self.flush()

    # ---- Redis (background threads) -------------------------------------------------------------------

    def _write(self, key: bytes, entry: CachedState) -> None:
        try:
            with self._lock:
                if self.pending.get(key) is not entry:  # replaced or deleted before it was written
                    return
            data = pack_entry(self.identity, key, entry)
            meta = json.dumps([entry.length, entry.logits is not None, entry.prefix, len(data)])

            def store() -> None:
                old = self.redis.hget(self._key("index"), key.hex())
                pipe = self.redis.pipeline()
                pipe.set(self._key("state", key), data, px=int(self.ttl_seconds * 1000) or None)
                pipe.hset(self._key("index"), key.hex(), meta)
                pipe.zadd(self._key("used"), {key.hex(): time.time()})
                pipe.incrby(self._key("bytes"), len(data) - (json.loads(old)[3] if old else 0))
                pipe.execute()
                self._evict()

            self.health.call(store)
        finally:
            with self._lock:
                if self.pending.get(key) is entry:
                    del self.pending[key]

    def _touch(self, key: bytes) -> None:
        def touch() -> None:
            pipe = self.redis.pipeline()
            pipe.zadd(self._key("used"), {key.hex(): time.time()}, xx=True)
            if self.ttl_seconds > 0:
                pipe.pexpire(self._key("state", key), int(self.ttl_seconds * 1000))
            pipe.execute()

        self.health.call(touch)

    def _remove(self, keys: list[bytes]) -> None:
        """Drop entries from Redis (their bytes leave the count only if this call removed their index)."""
        for key in keys:
            meta = self.redis.hget(self._key("index"), key.hex())
            pipe = self.redis.pipeline()
            pipe.delete(self._key("state", key))
            pipe.hdel(self._key("index"), key.hex())
            pipe.zrem(self._key("used"), key.hex())
            removed = pipe.execute()[1]
            if removed and meta:
                self.redis.decrby(self._key("bytes"), json.loads(meta)[3])

    def _evict(self) -> None:
        """Least recently used first while over capacity, and whatever expired (bounded passes)."""
        if self.ttl_seconds > 0:
            expired = self.redis.zrangebyscore(self._key("used"), "-inf", time.time() - self.ttl_seconds,
                                               start=0, num=1000)
            self._remove([bytes.fromhex(k.decode()) for k in expired])
        for _ in range(1000):
            if int(self.redis.get(self._key("bytes")) or 0) <= self.capacity_bytes:
                return
            oldest = self.redis.zrange(self._key("used"), 0, 0)
            if not oldest:
                return
            self._remove([bytes.fromhex(oldest[0].decode())])

    def refresh(self) -> None:
        """Mirror the index of what Redis holds (what every replica saved), and its size."""
        def read() -> tuple[dict[bytes, Any], int]:
            pipe = self.redis.pipeline()
            pipe.hgetall(self._key("index"))
            pipe.get(self._key("bytes"))
            raw, size = pipe.execute()
            return raw, int(size or 0)

        found = self.health.call(read)
        if found is None:
            return
        raw, size = found
        entries = {}
        for key, meta in raw.items():
            length, has_logits, prefix, _ = json.loads(meta)
            entries[bytes.fromhex(key.decode())] = (length, has_logits, prefix)
        with self._lock:  # what is queued here but not yet in Redis stays indexed
            entries.update({k: (e.length, e.logits is not None, e.prefix) for k, e in self.pending.items()})
        self._set_index(entries)
        self.nbytes = size

    def _refresh_loop(self) -> None:
        while not self._stop.wait(self.refresh_seconds):
            self.refresh()

    # ---- the mirror (replaced whole, so the engine thread always reads a consistent one) ----------------

    def _set_index(self, entries: dict[bytes, tuple[int, bool, bool]]) -> None:
        self._lengths = Counter(length for length, _, prefix in entries.values() if prefix)
        self.entries = entries

    def _index(self, key: bytes, meta: tuple[int, bool, bool]) -> None:
        self._set_index({**self.entries, key: meta})

    def _unindex(self, key: bytes) -> None:
        if key in self.entries:
            self._set_index({k: v for k, v in self.entries.items() if k != key})
