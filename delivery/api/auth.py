"""Bearer keys: ``Authorization: Bearer dk_...`` looked up on every request (no cache, so a
revoked key is refused at once by every API process), then the route's scope."""

from __future__ import annotations

import asyncpg

from delivery.api.problems import ApiError
from delivery.store.keys import Caller, Scope, authenticate

_CHALLENGE = {"WWW-Authenticate": 'Bearer realm="delivery"'}


def _bearer(header: str | None) -> str | None:
    if not header:
        return None
    kind, _, token = header.partition(" ")
    if kind.lower() != "bearer" or not token.strip():
        return None
    return token.strip()


async def caller_for(pool: asyncpg.Pool, header: str | None, scope: Scope) -> Caller:
    """Who the request speaks for; ``ApiError`` 401 without a valid key, 403 without
    ``scope``. The message never repeats the key."""
    key = _bearer(header)
    if key is None:
        raise ApiError(
            "unauthenticated", "send an API key: Authorization: Bearer dk_...", headers=_CHALLENGE
        )
    caller = await authenticate(pool, key)
    if caller is None:
        raise ApiError("unauthenticated", "the API key is unknown or revoked", headers=_CHALLENGE)
    if scope not in caller.scopes:
        raise ApiError("forbidden", f"this API key lacks the {scope.value!r} scope")
    return caller
