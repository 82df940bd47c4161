"""API keys (migration 0014): random, shown once, stored as a hash, scoped, revocable.

A key is ``dk_`` + 32 random bytes (base64url). Only its SHA-256 is stored: the key has 256 bits
of entropy, so a fast unsalted hash resists a leaked table as well as a slow one would, and a
request costs one index lookup. Every request looks its key up afresh (no cache), so a revoked key
is refused at once by every API process.
"""

from __future__ import annotations

import hashlib
import re
import secrets
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import datetime
from enum import StrEnum
from typing import Any

import asyncpg

from delivery.errors import InputError, NotFoundError

KEY_PREFIX = "dk_"
_KEY = re.compile(r"^dk_[A-Za-z0-9_-]{43}$")
_KEY_ID = re.compile(r"^key_[0-9a-f]{16}$")


class Scope(StrEnum):
    PUBLISH = "publish"
    MANAGE = "manage"
    READ = "read"
    # The platform's health across tenants (GET /v1/ops/...); never implied by the others.
    OPERATOR = "operator"


# What a key gets when none are named: a tenant's own work, not the operator's view.
ALL_SCOPES = (Scope.PUBLISH, Scope.MANAGE, Scope.READ)


@dataclass(frozen=True)
class ApiKey:
    """A key as listed: never the key itself."""

    id: str
    tenant_id: str
    scopes: tuple[Scope, ...]
    created_at: datetime
    revoked_at: datetime | None

    @classmethod
    def from_row(cls, row: Any) -> ApiKey:
        return cls(
            id=row["id"],
            tenant_id=row["tenant_id"],
            scopes=tuple(Scope(s) for s in row["scopes"]),
            created_at=row["created_at"],
            revoked_at=row["revoked_at"],
        )

    def public_dict(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "tenant_id": self.tenant_id,
            "scopes": [str(s) for s in self.scopes],
            "created_at": self.created_at.isoformat(),
            "revoked_at": self.revoked_at.isoformat() if self.revoked_at else None,
        }


@dataclass(frozen=True)
class Caller:
    """Who a valid key speaks for."""

    key_id: str
    tenant_id: str
    scopes: frozenset[Scope]


def hash_key(key: str) -> bytes:
    return hashlib.sha256(key.encode()).digest()


def parse_scopes(text: str | Iterable[str]) -> tuple[Scope, ...]:
    items = text.split(",") if isinstance(text, str) else list(text)
    names = [s.strip() for s in items if s.strip()]
    if not names:
        raise InputError("scopes: give at least one of publish, manage, read, operator")
    scopes: list[Scope] = []
    for name in names:
        try:
            scope = Scope(name)
        except ValueError:
            raise InputError(
                f"scopes: {name!r} is not one of publish, manage, read, operator"
            ) from None
        if scope not in scopes:
            scopes.append(scope)
    return tuple(scopes)


def parse_key_id(text: str) -> str:
    if not (text.isascii() and _KEY_ID.fullmatch(text)):
        raise InputError(f"{text!r} is not a key id (see `delivery keys list TENANT_ID`)")
    return text


async def create(
    conn: asyncpg.Connection, tenant_id: str, scopes: Iterable[Scope] = ALL_SCOPES
) -> tuple[ApiKey, str]:
    """A new key for the tenant: the listing, and the key itself (shown once, never stored)."""
    scopes = tuple(scopes)
    key = KEY_PREFIX + secrets.token_urlsafe(32)
    row = await conn.fetchrow(
        """
        INSERT INTO delivery.api_keys (id, tenant_id, key_hash, scopes)
        SELECT $1, t.id, $3, $4 FROM delivery.tenants t WHERE t.id = $2
        RETURNING id, tenant_id, scopes, created_at, revoked_at
        """,
        "key_" + secrets.token_hex(8),
        tenant_id,
        hash_key(key),
        [str(s) for s in scopes],
    )
    if row is None:
        raise NotFoundError(f"tenant {tenant_id!r} does not exist")
    return ApiKey.from_row(row), key


async def list_for(conn: asyncpg.Connection, tenant_id: str) -> list[ApiKey]:
    if not await conn.fetchval("SELECT true FROM delivery.tenants WHERE id = $1", tenant_id):
        raise NotFoundError(f"tenant {tenant_id!r} does not exist")
    rows = await conn.fetch(
        "SELECT id, tenant_id, scopes, created_at, revoked_at FROM delivery.api_keys"
        " WHERE tenant_id = $1 ORDER BY created_at, id",
        tenant_id,
    )
    return [ApiKey.from_row(r) for r in rows]


async def revoke(conn: asyncpg.Connection, key_id: str) -> ApiKey:
    """Revoke a key (a revoked key stays revoked; revoking it again changes nothing)."""
    row = await conn.fetchrow(
        """
        UPDATE delivery.api_keys SET revoked_at = coalesce(revoked_at, now()) WHERE id = $1
        RETURNING id, tenant_id, scopes, created_at, revoked_at
        """,
        key_id,
    )
    if row is None:
        raise NotFoundError(f"key {key_id!r} does not exist")
    return ApiKey.from_row(row)


async def authenticate(conn: asyncpg.Connection, key: str) -> Caller | None:
    """The caller a presented key speaks for; ``None`` for a malformed, unknown or revoked key.
    A malformed key is refused without a query."""
    if not (key.isascii() and _KEY.fullmatch(key)):
        return None
    row = await conn.fetchrow(
        "SELECT id, tenant_id, scopes FROM delivery.api_keys"
        " WHERE key_hash = $1 AND revoked_at IS NULL",
        hash_key(key),
    )
    if row is None:
        return None
    return Caller(
        key_id=row["id"],
        tenant_id=row["tenant_id"],
        scopes=frozenset(Scope(s) for s in row["scopes"]),
    )
