"""Stored responses of the Responses API: what ``previous_response_id`` continues, and GET/DELETE return.

A stored response keeps the keys of its saved states (the state after its prompt, and after its output)
and the token ids of the conversation up to the end of its prompt, so a state that is gone can be
rebuilt. The token ids are a chain of segments, one per turn, each pointing to the one before: a turn
stores only its own tokens, so storing and continuing cost the same after 10 or 10,000 turns. Only a
rebuild walks the chain. When a response is evicted or deleted, the responses that continue it take over
its segment, so their chains stay whole.

Responses belong to a tenant: another tenant's id is not found. Each tenant's responses are bounded in
count and bytes (the oldest go first) and expire a fixed time after creation. With a directory,
every stored response is also a file (written off the event loop), and a restarted server loads them:
a conversation continues across restarts.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from array import array
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .state_tiers import BackgroundWriter, write_atomically

logger = logging.getLogger("miras.responses")


@dataclass(frozen=True)
class Segment:
    """Token ids of one stretch of a conversation, after those of ``parent``. Immutable, so the engine
    thread can walk a chain while the event loop stores and evicts responses."""

    tokens: array
    parent: Segment | None = None

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
    parent_id: str | None = None  # whose segment ``segment.parent`` is, while that response is stored
    created: float = field(default_factory=time.time)

    @property
    def nbytes(self) -> int:
        """What it costs to keep (roughly: its body as JSON, its token ids, a fixed overhead)."""
        return (len(json.dumps(self.body)) + 4 * (len(self.segment.tokens) + len(self.output_ids))
                + len(self.output_text) + 256)

    def to_json(self) -> dict[str, Any]:
        return {"id": self.id, "tenant": self.tenant, "namespace": self.namespace, "body": self.body,
                "tokens": list(self.segment.tokens), "length": self.length, "output_ids": self.output_ids,
                "output_text": self.output_text, "prompt_key": self.prompt_key.hex(),
                "finish_key": self.finish_key.hex(), "parent_id": self.parent_id, "created": self.created}


class ResponseStore:
    def __init__(self, max_count: int, max_bytes: int, ttl_seconds: float, directory: str | Path | None = None,
                 writer: BackgroundWriter | None = None,
                 on_forget: Callable[[StoredResponse], None] | None = None):
        """``on_forget`` is called with every response deleted, evicted or expired (to drop its states)."""
        self.max_count = max_count  # per tenant
        self.max_bytes = max_bytes  # per tenant
        self.ttl_seconds = ttl_seconds  # after creation; 0: never
        self.dir = Path(directory) if directory is not None else None
        self.writer = writer or (BackgroundWriter("miras-response-writer") if self.dir is not None else None)
        self.tenants: dict[str, OrderedDict[str, StoredResponse]] = {}  # oldest first
        self.nbytes: dict[str, int] = {}
        self.children: dict[str, set[str]] = {}  # response id -> stored responses continuing it
        self.on_forget = on_forget or (lambda response: None)
        if self.dir is not None:
            self._load()

    def get(self, tenant: str, response_id: str) -> StoredResponse | None:
        responses = self.tenants.get(tenant, {})
        response = responses.get(response_id)
        if response is None:
            return None
        if self._expired(response):
            self.delete(tenant, response_id)
            return None
        return response

    def put(self, response: StoredResponse, save: bool = True) -> None:
        responses = self.tenants.setdefault(response.tenant, OrderedDict())
        responses[response.id] = response
        self.nbytes[response.tenant] = self.nbytes.get(response.tenant, 0) + response.nbytes
        if response.parent_id is not None:
            self.children.setdefault(response.parent_id, set()).add(response.id)
        if save:
            self._save(response)
        self._evict(response.tenant)

    def delete(self, tenant: str, response_id: str) -> bool:
        """Forget a response; those that continue it take over its segment of the conversation."""
        responses = self.tenants.get(tenant, {})
        response = responses.pop(response_id, None)
        if response is None:
            return False
        self.nbytes[tenant] -= response.nbytes
        if response.parent_id is not None:
            self.children.get(response.parent_id, set()).discard(response_id)
        for child_id in self.children.pop(response_id, set()):
            child = responses.get(child_id)
            if child is None:
                continue
            self.nbytes[tenant] -= child.nbytes
            child.segment = Segment(response.segment.tokens + child.segment.tokens, response.segment.parent)
            child.parent_id = response.parent_id
            if child.parent_id is not None:
                self.children.setdefault(child.parent_id, set()).add(child_id)
            self.nbytes[tenant] += child.nbytes
            self._save(child)
        if self.writer is not None:
            path = self._path(response)
            self.writer.submit(lambda: path.unlink(missing_ok=True))
        self.on_forget(response)
        return True

    def count(self, tenant: str) -> int:
        return len(self.tenants.get(tenant, {}))

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
            self.delete(tenant, oldest.id)

    # ---- files ----------------------------------------------------------------------------------------

    def _path(self, response: StoredResponse) -> Path:
        tenant = hashlib.blake2b(response.tenant.encode("utf-8", "surrogatepass"), digest_size=16).hexdigest()
        return self.dir / tenant / f"{response.id}.json"

    def _save(self, response: StoredResponse) -> None:
        if self.writer is None:
            return
        path, data = self._path(response), json.dumps(response.to_json()).encode()
        self.writer.submit(lambda: write_atomically(path, data))

    def flush(self) -> None:
        if self.writer is not None:
            self.writer.flush()

    def _load(self) -> None:
        """Read every stored response back (oldest first), relinking the segments of each conversation;
        one whose earlier segment is missing cannot be rebuilt, so it is dropped."""
        records = []
        for path in self.dir.glob("*/*.json"):
            try:
                records.append(json.loads(path.read_text()))
            except (OSError, ValueError) as exc:
                logger.warning("removing unreadable stored response %s: %s", path, exc)
                path.unlink(missing_ok=True)
        by_id = {r["id"]: r for r in records}
        segments: dict[str, Segment | None] = {}
        for record in sorted(records, key=lambda r: r["created"]):
            segment = _relink(record, by_id, segments)
            response = StoredResponse(
                record["id"], record["tenant"], record["namespace"], record["body"], segment, record["length"],
                record["output_ids"], record["output_text"], bytes.fromhex(record["prompt_key"]),
                bytes.fromhex(record["finish_key"]), record["parent_id"], record["created"])
            if segment is None:
                logger.warning("dropping stored response %s: its conversation's earlier tokens are gone",
                               record["id"])
                self._path(response).unlink(missing_ok=True)
                continue
            self.put(response, save=False)


def _relink(record: dict[str, Any], by_id: dict[str, dict[str, Any]], segments: dict[str, Segment | None]
            ) -> Segment | None:
    """The segment of a loaded record, linked to its parents' (built iteratively: chains are long); None
    if a parent is missing."""
    chain = []
    while record is not None and record["id"] not in segments:
        chain.append(record)
        segments[record["id"]] = None  # until built: a cycle (never written so) ends as a broken chain
        parent_id = record["parent_id"]
        record = by_id.get(parent_id) if parent_id is not None else None
        if parent_id is not None and record is None:
            return None
    parent = segments[record["id"]] if record is not None else None
    for item in reversed(chain):
        if item["parent_id"] is not None and parent is None:
            return None
        parent = segments[item["id"]] = Segment(array("i", item["tokens"]), parent)
    return parent
