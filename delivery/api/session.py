"""``/v1/session``: the web page's sign-in, who is signed in, and sign-out.

Sign-in takes a key in the body (never a URL), checks it as a Bearer key would be checked,
and answers with a session cookie: ``HttpOnly`` (no script reads it), ``SameSite=Strict``
(no other site's page sends it), ``Path=/``, and ``Secure`` when the request came over TLS,
directly or (``X-Forwarded-Proto: https``) through a TLS-terminating proxy. Trusting that
header is safe in one direction only, which is the one used: a lie can only make the cookie
stricter. The answer carries the session's CSRF token, which the page keeps in memory.
"""

from __future__ import annotations

from aiohttp import web

from delivery.api.auth import CSRF_HEADER, SESSION_COOKIE, unauthenticated
from delivery.api.models import SessionOut
from delivery.api.problems import ApiError
from delivery.api.routing import Call, Reply
from delivery.store.keys import authenticate
from delivery.store.sessions import (
    SESSION_TTL_S,
    Session,
    close_session,
    find_session,
    open_session,
)


def _over_tls(request: web.Request) -> bool:
    forwarded = request.headers.get("X-Forwarded-Proto", "").split(",")[0].strip().lower()
    return request.secure or forwarded == "https"


def _cookie(request: web.Request, value: str, max_age_s: int) -> str:
    parts = [
        f"{SESSION_COOKIE}={value}",
        "Path=/",
        f"Max-Age={max_age_s}",
        "HttpOnly",
        "SameSite=Strict",
    ]
    if _over_tls(request):
        parts.append("Secure")
    return "; ".join(parts)


def _out(session: Session) -> SessionOut:
    return SessionOut(
        tenant_id=session.caller.tenant_id,
        key_id=session.caller.key_id,
        scopes=sorted(str(s) for s in session.caller.scopes),
        csrf_token=session.csrf_token,
    )


async def sign_in(call: Call) -> Reply:
    async with call.pool.acquire() as conn:
        caller = await authenticate(conn, call.body.key)
        if caller is None:
            raise unauthenticated("the API key is unknown or revoked")
        session_id, session = await open_session(conn, caller)
    cookie = _cookie(call.request, session_id, SESSION_TTL_S)
    return Reply(201, _out(session), headers={"Set-Cookie": cookie, "Cache-Control": "no-store"})


async def _current(call: Call) -> tuple[str, Session]:
    value = call.request.cookies.get(SESSION_COOKIE)
    session = await find_session(call.pool, value) if value else None
    if value is None or session is None:
        raise unauthenticated("not signed in (or the session has ended): sign in with a key")
    return value, session


async def current(call: Call) -> Reply:
    _, session = await _current(call)
    return Reply(200, _out(session), headers={"Cache-Control": "no-store"})


async def sign_out(call: Call) -> Reply:
    value, session = await _current(call)
    if not session.csrf_ok(call.request.headers.get(CSRF_HEADER)):
        raise ApiError("forbidden", f"signing out with the session cookie needs {CSRF_HEADER}")
    await close_session(call.pool, value)
    return Reply(204, headers={"Set-Cookie": _cookie(call.request, "", 0)})
