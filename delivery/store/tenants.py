"""Tenants: who owns events and subscriptions (migration 0014).

``default`` (id and name) is created by ``delivery migrate``; the Python API and the CLI use it
unless told otherwise, so single-tenant use stays as it was.
"""

from __future__ import annotations

import re
import secrets
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import asyncpg

from delivery.errors import InputError, NotFoundError

DEFAULT_TENANT = "default"

# Bounds of the quotas (the table's CHECK constraints say the same).
MAX_EVENTS_PER_S_LIMIT = 1_000_000
MAX_SUBSCRIPTIONS_LIMIT = 1_000_000

_ID = re.compile(r"^[A-Za-z0-9_-]{1,64}$")
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9 _.-]{0,99}$")
_COLUMNS = "id, name, max_events_per_s, max_subscriptions, created_at"


@dataclass(frozen=True)
class Tenant:
    id: str
    name: str
    max_events_per_s: int | None
    max_subscriptions: int | None
    created_at: datetime

    @classmethod
    def from_row(cls, row: Any) -> Tenant:
        return cls(**dict(row))

    def public_dict(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "name": self.name,
            "max_events_per_s": self.max_events_per_s,
            "max_subscriptions": self.max_subscriptions,
            "created_at": self.created_at.isoformat(),
        }


def new_tenant_id() -> str:
    return "ten_" + secrets.token_hex(8)


def parse_tenant_id(text: str) -> str:
    """A tenant id as typed: ``InputError`` unless it could be one."""
    if not (text.isascii() and _ID.fullmatch(text)):
        raise InputError(f"tenant: {text!r} is not a tenant id (see `delivery tenants list`)")
    return text


def validate_name(name: str) -> str:
    if not (name.isascii() and _NAME.fullmatch(name)):
        raise InputError(
            f"name: {name!r} must be 1-100 ASCII letters, digits, spaces, '_', '.' or '-',"
            " starting with a letter or digit"
        )
    return name


def _check_quota(field: str, value: int | None, limit: int, minimum: int) -> None:
    if value is not None and not minimum <= value <= limit:
        raise InputError(f"{field}: must be between {minimum} and {limit:,}")


async def add(
    conn: asyncpg.Connection,
    name: str,
    *,
    max_events_per_s: int | None = None,
    max_subscriptions: int | None = None,
) -> Tenant:
    name = validate_name(name)
    _check_quota("max_events_per_s", max_events_per_s, MAX_EVENTS_PER_S_LIMIT, 1)
    _check_quota("max_subscriptions", max_subscriptions, MAX_SUBSCRIPTIONS_LIMIT, 0)
    row = await conn.fetchrow(
        f"""
        INSERT INTO delivery.tenants (id, name, max_events_per_s, max_subscriptions)
        VALUES ($1, $2, $3, $4)
        ON CONFLICT (name) DO NOTHING
        RETURNING {_COLUMNS}
        """,
        new_tenant_id(),
        name,
        max_events_per_s,
        max_subscriptions,
    )
    if row is None:
        raise InputError(f"name: a tenant named {name!r} exists already")
    return Tenant.from_row(row)


async def list_all(conn: asyncpg.Connection) -> list[Tenant]:
    rows = await conn.fetch(f"SELECT {_COLUMNS} FROM delivery.tenants ORDER BY created_at, id")
    return [Tenant.from_row(r) for r in rows]


async def get(conn: asyncpg.Connection, tenant_id: str) -> Tenant:
    row = await conn.fetchrow(f"SELECT {_COLUMNS} FROM delivery.tenants WHERE id = $1", tenant_id)
    if row is None:
        raise NotFoundError(f"tenant {tenant_id!r} does not exist")
    return Tenant.from_row(row)
