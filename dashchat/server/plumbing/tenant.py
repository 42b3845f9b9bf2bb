"""Who is asking: the tenant an API key stands for, as a context variable the routes read.

With several `--api-key`s each key is a tenant: what one stores (`/v1/responses`) only that key
reads, continues or deletes, and its prompts are cached apart from the others' (the engine's
prefix cache is salted per tenant, so the time to first token tells no tenant what another sent).
AuthMiddleware sets the tenant for the request's whole task (streams and worker threads copy the
context); without keys every request is the one tenant "".
"""

from __future__ import annotations

import hashlib
from contextvars import ContextVar, Token

_tenant: ContextVar[str] = ContextVar("dashchat_tenant", default="")


def tenant_of_key(key: bytes) -> str:
    """A stable name for a key that is not the key (it is kept in memory beside stored responses)."""
    return hashlib.blake2b(key, digest_size=16, person=b"dashchat-tenant").hexdigest()


def current_tenant() -> str:
    return _tenant.get()


def enter_tenant(tenant: str) -> Token[str]:
    return _tenant.set(tenant)


def leave_tenant(token: Token[str]) -> None:
    _tenant.reset(token)


def cache_salt(requested: str | None) -> str | None:
    """The engine's prefix-cache salt: the tenant's, plus the request's own `cache_salt` (vLLM's
    field) within it. None (the shared, unsalted cache) only without keys and without a salt."""
    tenant = current_tenant()
    if not tenant and requested is None:
        return None
    return f"{tenant}\0{requested or ''}"
