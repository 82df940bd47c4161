"""Sign-in sessions of the web page (migration 0024): what a browser holds instead of a key.

A session id is 32 random bytes (base64url) in an HttpOnly cookie; only its SHA-256 is stored,
as with keys. Each session has a CSRF token of its own, which the page sends in a header on
every change. A session speaks for the key it was opened with, so it never has more than the
key: revoking the key ends the session at once (the lookup joins the live key), and it expires
after ``SESSION_TTL_S`` whatever happens.
"""

from __future__ import annotations

import hashlib
import hmac
import re
import secrets
from dataclasses import dataclass

import asyncpg

from delivery.store.keys import Caller, Scope

# A working day: long enough for on-call's shift, short enough that a forgotten browser closes.
SESSION_TTL_S = 8 * 3600
_SESSION = re.compile(r"^[A-Za-z0-9_-]{43}$")


@dataclass(frozen=True)
class Session:
    caller: Caller
    csrf_token: str

    def csrf_ok(self, presented: str | None) -> bool:
        return presented is not None and hmac.compare_digest(presented, self.csrf_token)


def _hash(session_id: str) -> bytes:
    return hashlib.sha256(session_id.encode()).digest()


async def open_session(conn: asyncpg.Connection, caller: Caller) -> tuple[str, Session]:
    """A new session for an authenticated key: the cookie's value (never stored), and the
    session. Expired sessions are swept here, so the table stays the size of the live ones."""
    session_id = secrets.token_urlsafe(32)
    csrf = secrets.token_urlsafe(32)
    async with conn.transaction():
        await conn.execute("DELETE FROM delivery.ui_sessions WHERE expires_at < now()")
        await conn.execute(
            "INSERT INTO delivery.ui_sessions (id_hash, key_id, csrf_token, expires_at)"
            " VALUES ($1, $2, $3, now() + make_interval(secs => $4))",
            _hash(session_id),
            caller.key_id,
            csrf,
            float(SESSION_TTL_S),
        )
    return session_id, Session(caller, csrf)


async def find_session(conn: asyncpg.Connection, session_id: str) -> Session | None:
    """The live session of a cookie's value; ``None`` when malformed, unknown, expired or
    its key was revoked. A malformed value is refused without a query."""
    if not (session_id.isascii() and _SESSION.fullmatch(session_id)):
        return None
    row = await conn.fetchrow(
        """
        SELECT k.id, k.tenant_id, k.scopes, s.csrf_token
        FROM delivery.ui_sessions s JOIN delivery.api_keys k ON k.id = s.key_id
        WHERE s.id_hash = $1 AND s.expires_at > now() AND k.revoked_at IS NULL
        """,
        _hash(session_id),
    )
    if row is None:
        return None
    caller = Caller(
        key_id=row["id"],
        tenant_id=row["tenant_id"],
        scopes=frozenset(Scope(s) for s in row["scopes"]),
    )
    return Session(caller, row["csrf_token"])


async def close_session(conn: asyncpg.Connection, session_id: str) -> bool:
    """Sign-out: the session is deleted (the cookie alone is worth nothing after)."""
    if not (session_id.isascii() and _SESSION.fullmatch(session_id)):
        return False
    done = await conn.execute(
        "DELETE FROM delivery.ui_sessions WHERE id_hash = $1", _hash(session_id)
    )
    return bool(done != "DELETE 0")
