"""Stored responses of the Responses API: what ``previous_response_id`` continues, and GET/DELETE return.

A stored response keeps the keys of its saved states (the state after its prompt, and after its output)
and the token ids of the conversation up to the end of its prompt, so a state that is gone can be
rebuilt. The token ids are a chain of segments, one per turn, each pointing to the one before: a turn
stores only its own tokens, so storing, continuing and evicting cost the same after 10 or 10,000 turns.
Only a rebuild walks the chain. A segment is kept as long as a stored response's chain passes through
it (reference counts), so evicting or deleting a response never breaks a conversation that continues it.

Responses belong to a tenant: another tenant's id is not found. Each tenant's responses are bounded in
count and bytes (the oldest go first) and expire a fixed time after creation. With a directory, every
stored response and segment is also a file (written off the event loop), and a restarted server loads
them: a conversation continues across restarts. With a shared store (server/response_store_redis.py) every
stored response is also written there, and one this replica does not hold is looked for there, so a
conversation continues on any replica; this replica's copies are then a cache, bounded as above, and a
response deleted elsewhere is dropped here when next asked for.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
import uuid
from array import array
from collections import ChainMap, OrderedDict
from collections.abc import Callable, MutableMapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .response_store_redis import RedisResponses
from .state_tiers import BackgroundWriter, write_atomically

logger = logging.getLogger("miras.responses")


@dataclass(frozen=True, eq=False)
class Segment:
    """Token ids of one stretch of a conversation, after those of ``parent``. Immutable, so the engine
    thread can walk a chain while the event loop stores and evicts responses."""

    tokens: array
    parent: Segment | None = None
    id: str = field(default_factory=lambda: uuid.uuid4().hex)

    def token_ids(self) -> list[int]:
        """Every token id of the conversation up to the end of this segment (walks the chain)."""
        parts, segment = [], self
        while segment is not None:
            parts.append(segment.tokens)
            segment = segment.parent
        ids: list[int] = []
        for part in reversed(parts):
            ids.extend(part)
        return ids


@dataclass
class StoredResponse:
    id: str
    tenant: str
    namespace: str  # the cache namespace its states are saved in (tenant and cache_salt)
    body: dict[str, Any]  # the response object, as GET returns it
    segment: Segment  # the conversation up to the end of this response's prompt
    length: int  # tokens in that conversation
    output_ids: list[int]  # the generated tokens
    output_text: str
    prompt_key: bytes  # state-cache key of the state after the prompt
    finish_key: bytes  # ... and after the output (all generated tokens but the last, which was never fed)
    created: float = field(default_factory=time.time)

    @property
    def nbytes(self) -> int:
        """What it costs to keep (roughly: its body as JSON, its turn's token ids, a fixed overhead)."""
        return (len(json.dumps(self.body)) + 4 * (len(self.segment.tokens) + len(self.output_ids))
                + len(self.output_text) + 256)

    def to_json(self) -> dict[str, Any]:
        return {"id": self.id, "tenant": self.tenant, "namespace": self.namespace, "body": self.body,
                "segment": self.segment.id, "length": self.length, "output_ids": self.output_ids,
                "output_text": self.output_text, "prompt_key": self.prompt_key.hex(),
                "finish_key": self.finish_key.hex(), "created": self.created}


class ResponseStore:
    def __init__(self, max_count: int, max_bytes: int, ttl_seconds: float, directory: str | Path | None = None,
                 writer: BackgroundWriter | None = None,
                 on_forget: Callable[[StoredResponse], None] | None = None, shared: RedisResponses | None = None):
        """``on_forget`` is called with every response deleted, evicted or expired (to drop its states; with
        a shared store, only when deleted: other replicas may still continue it)."""
        self.max_count = max_count  # per tenant
        self.max_bytes = max_bytes  # per tenant
        self.ttl_seconds = ttl_seconds  # after creation; 0: never
        self.dir = Path(directory) if directory is not None else None
        self.shared = shared
        self.writer = writer or (BackgroundWriter("miras-response-writer") if self.dir is not None else None)
        self.tenants: dict[str, OrderedDict[str, StoredResponse]] = {}  # oldest first
        self.nbytes: dict[str, int] = {}
        # segment id -> how many stored responses and kept segments point to it
        self.refs: dict[str, int] = {}
        self.segments: dict[str, Segment] = {}  # the segments held, by id
        self.on_forget = on_forget or (lambda response: None)
        if self.dir is not None:
            self._load()

    def get(self, tenant: str, response_id: str) -> StoredResponse | None:
        response = self.tenants.get(tenant, {}).get(response_id)
        if response is not None and self._expired(response):
            self._drop(tenant, response_id, forget=self.shared is None)
            return None
        if response is not None and self.shared is not None and not self.shared.exists(tenant, response_id):
            self._drop(tenant, response_id, forget=False)  # deleted (or evicted) on another replica
            return None
        if response is None and self.shared is not None:
            response = self._fetch(tenant, response_id)
        return response

    def put(self, response: StoredResponse, save: bool = True) -> None:
        """Keep a response; ``save``: also write it to the directory and the shared store (not when it
        was read from there)."""
        responses = self.tenants.setdefault(response.tenant, OrderedDict())
        responses[response.id] = response
        self.nbytes[response.tenant] = self.nbytes.get(response.tenant, 0) + response.nbytes
        self._hold(response.segment, save and self.dir is not None)
        if save and self.dir is not None:
            self._write(self._path(response), response.to_json())
        if save and self.shared is not None:  # at once: the next turn may come to another replica right away
            self.shared.put(response.to_json(), response.segment)
        self._evict(response.tenant)

    def delete(self, tenant: str, response_id: str) -> bool:
        """Forget a response, here and in the shared store (its segments stay while another stored
        response's conversation needs them)."""
        if self.get(tenant, response_id) is None:
            return False
        if self.shared is not None:
            self.shared.delete(tenant, response_id)
        self._drop(tenant, response_id, forget=True)
        return True

    def _drop(self, tenant: str, response_id: str, forget: bool) -> None:
        response = self.tenants[tenant].pop(response_id)
        self.nbytes[tenant] -= response.nbytes
        self._release(response.segment)
        if self.dir is not None:
            path = self._path(response)
            self.writer.submit(lambda: path.unlink(missing_ok=True))
        if forget:
            self.on_forget(response)

    def _fetch(self, tenant: str, response_id: str) -> StoredResponse | None:
        """A response another replica stored, with the segments of its conversation this one lacks."""
        record = self.shared.get(tenant, response_id)
        if record is None:
            return None
        records = self.shared.segments(record["segment"], self.segments)
        if records is None:
            return None
        segment = _build(record["segment"], records, ChainMap({}, self.segments))
        if segment is None:
            return None
        response = _from_json(record, segment)
        self.put(response, save=False)
        return response

    def count(self, tenant: str) -> int:
        return len(self.tenants.get(tenant, {}))

    def flush(self) -> None:
        if self.writer is not None:
            self.writer.flush()

    # ---- bounds ---------------------------------------------------------------------------------------

    def _expired(self, response: StoredResponse) -> bool:
        return self.ttl_seconds > 0 and time.time() - response.created > self.ttl_seconds

    def _evict(self, tenant: str) -> None:
        responses = self.tenants[tenant]
        while responses:
            oldest = next(iter(responses.values()))
            if len(responses) <= self.max_count and self.nbytes[tenant] <= self.max_bytes \
                    and not self._expired(oldest):
                break
            if self.shared is None:
                self.delete(tenant, oldest.id)
            else:  # this replica's copy only: the shared store bounds its own
                self._drop(tenant, oldest.id, forget=False)

    # ---- segments -------------------------------------------------------------------------------------

    def _hold(self, segment: Segment, save: bool) -> None:
        """One more reference to ``segment``; a new segment holds its parent in turn (and is written)."""
        while segment is not None:
            known = segment.id in self.refs
            self.refs[segment.id] = self.refs.get(segment.id, 0) + 1
            if known:
                return
            self.segments[segment.id] = segment
            if save:
                self._write(self._segment_path(segment.id), {
                    "id": segment.id, "parent": segment.parent.id if segment.parent else None,
                    "tokens": list(segment.tokens)})
            segment = segment.parent

    def _release(self, segment: Segment) -> None:
        """One reference less; a segment no one holds is dropped, and lets go of its parent."""
        while segment is not None:
            self.refs[segment.id] -= 1
            if self.refs[segment.id]:
                return
            del self.refs[segment.id]
            del self.segments[segment.id]
            if self.dir is not None:
                path = self._segment_path(segment.id)
                self.writer.submit(lambda path=path: path.unlink(missing_ok=True))
            segment = segment.parent

    # ---- files ----------------------------------------------------------------------------------------

    def _path(self, response: StoredResponse) -> Path:
        tenant = hashlib.blake2b(response.tenant.encode("utf-8", "surrogatepass"), digest_size=16).hexdigest()
        return self.dir / "tenants" / tenant / f"{response.id}.json"

    def _segment_path(self, segment_id: str) -> Path:
        return self.dir / "segments" / f"{segment_id}.json"

    def _write(self, path: Path, record: dict[str, Any]) -> None:
        data = json.dumps(record).encode()
        self.writer.submit(lambda: write_atomically(path, data))

    def _load(self) -> None:
        """Read the stored responses back (oldest first) with the segments of their conversations; a
        response whose conversation lost a segment cannot be rebuilt, so it is dropped, and segments no
        response needs are removed."""
        segments = {r["id"]: r for r in _read_all(self.dir / "segments")}
        built: dict[str, Segment | None] = {}
        for record in sorted(_read_all(self.dir / "tenants"), key=lambda r: r["created"]):
            segment = _build(record["segment"], segments, built)
            response = _from_json(record, segment)
            if segment is None:
                logger.warning("dropping stored response %s: its conversation's earlier tokens are gone",
                               record["id"])
                self._path(response).unlink(missing_ok=True)
                continue
            self.put(response, save=False)
        for segment_id in set(segments) - set(self.refs):
            self._segment_path(segment_id).unlink(missing_ok=True)


def _from_json(record: dict[str, Any], segment: Segment | None) -> StoredResponse:
    return StoredResponse(record["id"], record["tenant"], record["namespace"], record["body"], segment,
                          record["length"], record["output_ids"], record["output_text"],
                          bytes.fromhex(record["prompt_key"]), bytes.fromhex(record["finish_key"]), record["created"])


def _read_all(directory: Path) -> list[dict[str, Any]]:
    records = []
    for path in directory.rglob("*.json"):
        try:
            records.append(json.loads(path.read_text()))
        except (OSError, ValueError) as exc:
            logger.warning("removing unreadable stored record %s: %s", path, exc)
            path.unlink(missing_ok=True)
    return records


def _build(segment_id: str, records: dict[str, dict[str, Any]], built: MutableMapping[str, Segment | None]
           ) -> Segment | None:
    """The segment ``segment_id`` linked to its parents, from their records (iteratively: chains are
    long); None if one of them is missing."""
    chain = []
    while segment_id is not None and segment_id not in built:
        record = records.get(segment_id)
        if record is None:
            built[segment_id] = None
            break
        chain.append(record)
        built[segment_id] = None  # until built below: a cycle (never written so) ends as a broken chain
        segment_id = record["parent"]
    parent = built[segment_id] if segment_id is not None else None
    for record in reversed(chain):
        broken = record["parent"] is not None and parent is None
        parent = built[record["id"]] = None if broken else Segment(array("i", record["tokens"]), parent,
                                                                  record["id"])
    return parent
