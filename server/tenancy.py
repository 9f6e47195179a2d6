"""Who a request belongs to, and so which cached states it may restore.

Every API key configured is a tenant. The auth middleware attaches to each request the tenant id of the
key that authenticated it: a short digest of the key (never the key itself), or "" when no key is
configured. What a tenant stores by name (stored responses) belongs to that tenant alone. A request's
cache namespace combines its cache tenant (its tenant, or "" when cached states are shared across keys:
--state-cache-scope shared) with its ``cache_salt``; the state cache and its tiers key their entries by it,
so neither equal prompts of two tenants nor those of one tenant under two salts ever share an entry.
"""

from __future__ import annotations

import hashlib

from starlette.requests import Request

TENANT_STATE_KEY = "miras.tenant"  # where in the ASGI scope's "state" the middleware puts the tenant id
CACHE_TENANT_STATE_KEY = "miras.cache_tenant"  # and the tenant whose cached states the request may share


def tenant_id(api_key: str) -> str:
    """The tenant id of an API key: 16 hex digits of a digest the key cannot be read back from."""
    return hashlib.blake2b(api_key.encode("utf-8", "surrogatepass"), digest_size=8,
                           person=b"miras-tenant").hexdigest()


def tenant_of(request: Request) -> str:
    """The tenant id the auth layer attached to ``request``; "" when there is none."""
    return request.scope.get("state", {}).get(TENANT_STATE_KEY, "")


def request_namespace(request: Request, cache_salt: str | None) -> str:
    """The state-cache namespace of ``request`` sent with ``cache_salt``."""
    return cache_namespace(request.scope.get("state", {}).get(CACHE_TENANT_STATE_KEY, ""), cache_salt)


def cache_namespace(tenant: str, cache_salt: str | None) -> str:
    """The state-cache namespace of a request of ``tenant`` with ``cache_salt``. Tenant ids hold no "/", so
    the two parts never run together: ("a", "b/c") and ("a/b", "c") cannot meet."""
    return tenant if cache_salt is None else f"{tenant}/{cache_salt}"
