"""Pure ASGI middleware (no buffering, so SSE streams and disconnects pass straight through)."""

from __future__ import annotations

import hashlib
import hmac
import json
import uuid

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from .errors import error_body

OPEN_PATHS = ("/health", "/metrics", "/version", "/openapi.json", "/docs", "/redoc")


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
    """``Authorization: Bearer <key>`` on everything but health, metrics, version and the docs (and CORS
    preflights). Keys are compared as SHA-256 digests in constant time."""

    def __init__(self, app: ASGIApp, api_key: str):
        self.app = app
        self.digest = hashlib.sha256(api_key.encode()).digest()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["method"] == "OPTIONS" or scope["path"] in OPEN_PATHS:
            return await self.app(scope, receive, send)
        header = dict(scope["headers"]).get(b"authorization", b"").decode("latin-1")
        scheme, _, token = header.partition(" ")
        if scheme.lower() == "bearer" and hmac.compare_digest(hashlib.sha256(token.strip().encode()).digest(),
                                                               self.digest):
            return await self.app(scope, receive, send)
        message = "Incorrect API key provided." if header else "Missing API key: send 'Authorization: Bearer <key>'."
        body = json.dumps(error_body(401, message, None, "invalid_api_key")).encode()
        await send({"type": "http.response.start", "status": 401,
                    "headers": [(b"content-type", b"application/json"), (b"www-authenticate", b"Bearer")]})
        await send({"type": "http.response.body", "body": body})
