"""Pure ASGI middleware (no buffering, so SSE streams and disconnects pass straight through)."""

from __future__ import annotations

import hashlib
import hmac
import uuid

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from .errors import error_body, wire_json
from .tenancy import CACHE_TENANT_STATE_KEY, TENANT_STATE_KEY, tenant_id

OPEN_PATHS = ("/health", "/metrics", "/version", "/openapi.json", "/docs", "/redoc", "/")
PLAYGROUND_STATIC = "/static"  # the playground's files: public like the page, which asks for the key itself


class RequestIdMiddleware:
    """Echo the client's X-Request-Id (or a fresh one) on every response."""

    def __init__(self, app: ASGIApp):
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        incoming = dict(scope["headers"]).get(b"x-request-id")
        request_id = incoming[:128] if incoming else uuid.uuid4().hex.encode()

        async def send_with_id(message: Message) -> None:
            if message["type"] == "http.response.start":
                message["headers"] = [*message.get("headers", []), (b"x-request-id", request_id)]
            await send(message)

        await self.app(scope, receive, send_with_id)


class APIKeyMiddleware:
    """``Authorization: Bearer <key>`` on everything but health, version, the docs, the playground page and its
    files (and CORS preflights);
    on /metrics too with ``metrics_need_key``. Any of ``api_keys`` is accepted, each compared as a SHA-256
    digest in constant time. The request carries the key's tenant id, and its cache tenant: the same with
    ``cache_per_key``, "" (shared across keys) without (server/tenancy.py)."""

    def __init__(self, app: ASGIApp, api_keys: list[str], cache_per_key: bool = True,
                 metrics_need_key: bool = False):
        self.app = app
        self.cache_per_key = cache_per_key
        self.keys = [(hashlib.sha256(key.encode("utf-8", "surrogateescape")).digest(), tenant_id(key))
                     for key in api_keys]
        self.open_paths = tuple(p for p in OPEN_PATHS if not (metrics_need_key and p == "/metrics"))

    def tenant(self, token: str) -> str | None:
        """The tenant of the key ``token``, or None if it is no configured key."""
        digest = hashlib.sha256(token.encode()).digest()
        found = None
        for key_digest, tenant in self.keys:  # every key compared, so the time says nothing of which matched
            if hmac.compare_digest(digest, key_digest):
                found = tenant
        return found

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        path = scope.get("path", "")
        if (scope["type"] != "http" or scope["method"] == "OPTIONS" or path in self.open_paths
                or path.startswith(PLAYGROUND_STATIC + "/")):
            return await self.app(scope, receive, send)
        header = dict(scope["headers"]).get(b"authorization", b"").decode("latin-1")
        scheme, _, token = header.partition(" ")
        tenant = self.tenant(token.strip()) if scheme.lower() == "bearer" else None
        if tenant is not None:
            state = scope.setdefault("state", {})
            state[TENANT_STATE_KEY] = tenant
            state[CACHE_TENANT_STATE_KEY] = tenant if self.cache_per_key else ""
            return await self.app(scope, receive, send)
        message = "Incorrect API key provided." if header else "Missing API key: send 'Authorization: Bearer <key>'."
        body = wire_json(error_body(401, message, None, "invalid_api_key")).encode()
        await send({"type": "http.response.start", "status": 401,
                    "headers": [(b"content-type", b"application/json"), (b"www-authenticate", b"Bearer")]})
        await send({"type": "http.response.body", "body": body})
