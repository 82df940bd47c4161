"""Who a request speaks for: ``Authorization: Bearer dk_...``, or the web page's session
cookie (``delivery.store.sessions``), then the route's scope.

Keys and sessions are looked up on every request (no cache), so a revoked key, and every
session opened with it, is refused at once by every API process. A request authenticated by
the cookie that changes anything (any method but GET/HEAD/OPTIONS) must also carry the
session's CSRF token in ``X-CSRF-Token``: a cookie is sent by the browser on its own, a header
only by the page's script. Bearer requests need none (no browser adds a key by itself).
"""

from __future__ import annotations

import asyncpg
from aiohttp import web

from delivery.api.problems import ApiError
from delivery.store.keys import Caller, Scope, authenticate
from delivery.store.sessions import find_session

SESSION_COOKIE = "delivery_session"
CSRF_HEADER = "X-CSRF-Token"
_SAFE_METHODS = frozenset({"GET", "HEAD", "OPTIONS"})
_CHALLENGE = {"WWW-Authenticate": 'Bearer realm="delivery"'}


def _bearer(header: str | None) -> str | None:
    if not header:
        return None
    kind, _, token = header.partition(" ")
    if kind.lower() != "bearer" or not token.strip():
        return None
    return token.strip()


def unauthenticated(message: str) -> ApiError:
    return ApiError("unauthenticated", message, headers=_CHALLENGE)


async def _by_cookie(pool: asyncpg.Pool, request: web.Request, value: str) -> Caller:
    session = await find_session(pool, value)
    if session is None:
        raise unauthenticated("the session has ended; sign in again")
    if request.method not in _SAFE_METHODS and not session.csrf_ok(
        request.headers.get(CSRF_HEADER)
    ):
        raise ApiError("forbidden", f"a change made with the session cookie needs {CSRF_HEADER}")
    return session.caller


async def caller_for(pool: asyncpg.Pool, request: web.Request, scope: Scope) -> Caller:
    """Who the request speaks for; ``ApiError`` 401 without a valid key or session, 403
    without ``scope`` or (cookie) without the CSRF token. The message never repeats the key."""
    header = request.headers.get("Authorization")
    cookie = request.cookies.get(SESSION_COOKIE)
    if header is None and cookie is not None:
        caller = await _by_cookie(pool, request, cookie)
    else:
        key = _bearer(header)
        if key is None:
            raise unauthenticated("send an API key: Authorization: Bearer dk_...")
        found = await authenticate(pool, key)
        if found is None:
            raise unauthenticated("the API key is unknown or revoked")
        caller = found
    if scope not in caller.scopes:
        raise ApiError("forbidden", f"this API key lacks the {scope.value!r} scope")
    return caller
