"""Who a request belongs to, and which cached states it may share.

Placeholder bodies until the hardening work (issue 18) lands its version of this module, which derives
the tenant from the API key that authenticated the request. Every store of states or responses keys
its entries through these two functions only, so that version takes effect everywhere at once.
"""

from __future__ import annotations

import json

from fastapi import Request


def tenant_of(request: Request) -> str:
    """The tenant the request is served for: "" (one tenant) until per-key tenants exist."""
    return ""


def cache_namespace(tenant: str, cache_salt: str | None) -> str:
    """The state-cache namespace of a request: its tenant and salt combined unambiguously (a JSON pair,
    so no choice of salt can make one tenant's namespace equal another's)."""
    return json.dumps([tenant, cache_salt])
