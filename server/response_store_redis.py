"""Stored responses shared by every replica through Redis, so a ``previous_response_id`` made on one
replica is continued on another (server/response_store.py keeps the local copy and calls this).

Per model identity, Redis holds each response as JSON under ``<prefix>:resp:<tenant digest>:<id>`` and each
conversation segment under ``<prefix>:seg:<id>``, with a reference count per segment (``<prefix>:segrefs``):
a response holds its segment, a new segment holds its parent, the same rule as the local store, so a turn
writes only its own tokens and a segment goes when no stored response's conversation runs through it. Each
tenant's responses are listed by creation time (``<prefix>:resps:<tenant digest>``) and bounded there in
count and age, the oldest first. A replica that has not seen a conversation fetches its segments once,
walking up from the newest until one it already holds.
"""

from __future__ import annotations

import hashlib
import json
import time
from typing import Any

from .state_tier_redis import StoreHealth


def _tenant(tenant: str) -> str:
    return hashlib.blake2b(tenant.encode("utf-8", "surrogatepass"), digest_size=16).hexdigest()


class RedisResponses:
    def __init__(self, client: Any, identity: str, max_count: int, ttl_seconds: float, retry_seconds: float = 5.0):
        self.redis = client
        self.prefix = f"miras:{identity}"
        self.max_count = max_count  # per tenant
        self.ttl_seconds = ttl_seconds  # after creation; 0: never
        kwargs = client.connection_pool.connection_kwargs
        self.health = StoreHealth(f"shared response store {kwargs.get('host', '')}:{kwargs.get('port', '')}",
                                  retry_seconds)

    def _response(self, tenant: str, response_id: str) -> str:
        return f"{self.prefix}:resp:{_tenant(tenant)}:{response_id}"

    def _segment(self, segment_id: str) -> str:
        return f"{self.prefix}:seg:{segment_id}"

    # ---- reads (the event loop; short timeouts, skipped while the store is down) ------------------------

    def get(self, tenant: str, response_id: str) -> dict[str, Any] | None:
        data = self.health.call(lambda: self.redis.get(self._response(tenant, response_id)))
        record = json.loads(data) if data else None
        return record if record is not None and record["tenant"] == tenant else None

    def exists(self, tenant: str, response_id: str) -> bool:
        """Whether the response is still stored (True when the store cannot say: the local copy stands)."""
        return bool(self.health.call(lambda: self.redis.exists(self._response(tenant, response_id)), True))

    def segments(self, segment_id: str | None, known: Any) -> dict[str, dict[str, Any]] | None:
        """The records of a conversation's segments from ``segment_id`` up to the first in ``known`` (or
        the start); None if one is missing or the store is down."""
        records: dict[str, dict[str, Any]] = {}
        while segment_id is not None and segment_id not in known:
            data = self.health.call(lambda sid=segment_id: self.redis.get(self._segment(sid)))
            if data is None:
                return None
            record = records[segment_id] = json.loads(data)
            segment_id = record["parent"]
        return records

    # ---- writes (the event loop too: a response is readable on every replica once it is answered) --------

    def put(self, record: dict[str, Any], segment: Any) -> None:
        """Store a response (``record`` as StoredResponse.to_json) and hold its conversation's segments."""
        def store() -> None:
            self._hold(segment)
            tenant = record["tenant"]
            pipe = self.redis.pipeline()
            pipe.set(self._response(tenant, record["id"]), json.dumps(record))
            pipe.zadd(f"{self.prefix}:resps:{_tenant(tenant)}", {record["id"]: record["created"]})
            pipe.execute()
            self._evict(tenant)

        self.health.call(store)

    def delete(self, tenant: str, response_id: str) -> None:
        self.health.call(lambda: self._delete(tenant, response_id))

    def _delete(self, tenant: str, response_id: str) -> None:
        data = self.redis.get(self._response(tenant, response_id))
        pipe = self.redis.pipeline()
        pipe.delete(self._response(tenant, response_id))
        pipe.zrem(f"{self.prefix}:resps:{_tenant(tenant)}", response_id)
        if pipe.execute()[0] and data:  # only the replica that removed it releases its segments
            self._release(json.loads(data)["segment"])

    def _hold(self, segment: Any) -> None:
        while segment is not None:
            if self.redis.hincrby(f"{self.prefix}:segrefs", segment.id, 1) > 1:
                return
            self.redis.set(self._segment(segment.id), json.dumps(
                {"id": segment.id, "parent": segment.parent.id if segment.parent else None,
                 "tokens": list(segment.tokens)}))
            segment = segment.parent

    def _release(self, segment_id: str | None) -> None:
        while segment_id is not None:
            if self.redis.hincrby(f"{self.prefix}:segrefs", segment_id, -1) > 0:
                return
            data = self.redis.get(self._segment(segment_id))
            pipe = self.redis.pipeline()
            pipe.hdel(f"{self.prefix}:segrefs", segment_id)
            pipe.delete(self._segment(segment_id))
            pipe.execute()
            segment_id = json.loads(data)["parent"] if data else None

    def _evict(self, tenant: str) -> None:
        """The tenant's oldest responses beyond the count, and those past their time (bounded passes)."""
        listed = f"{self.prefix}:resps:{_tenant(tenant)}"
        gone = []
        if self.ttl_seconds > 0:
            gone += self.redis.zrangebyscore(listed, "-inf", time.time() - self.ttl_seconds, start=0, num=1000)
        extra = self.redis.zcard(listed) - self.max_count
        if extra > 0:
            gone += self.redis.zrange(listed, 0, min(extra, 1000) - 1)
        for response_id in dict.fromkeys(gone):
            self._delete(tenant, response_id.decode())
