"""Tenant-scoped pages for the HTTP API: events, one event's deliveries and attempts, a
subscription's deliveries, dead letters. Keyset pages: each function takes the last row's key
(``after``) and returns ``limit + 1`` rows at most, so the caller knows whether more follow.

Another tenant's rows are filtered in the same statement: they are never read, and an id that
belongs to another tenant is indistinguishable from one that does not exist.
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime
from typing import Any

import asyncpg
import orjson

from delivery.errors import NotFoundError
from delivery.store.states import SubscriptionState
from delivery.store.subscriptions import FIELDS, list_all

_EVENT = (
    "o.pk, o.event_id AS id, o.type, o.account_id, o.sequence, o.occurred_at, o.created_at,"
    " o.data::text AS data"
)
_DELIVERY = (
    "d.id, d.event_id, d.subscription_id, d.state, d.attempts, d.created_at, d.next_attempt_at,"
    " d.first_attempt_at, d.last_attempt_at, d.delivered_at, d.last_status, d.last_error,"
    " d.dead_reason, d.dead_at"
)


def _event(row: Any) -> dict[str, Any]:
    out = dict(row)
    out["data"] = orjson.loads(out["data"])
    return out


async def events(
    conn: asyncpg.Connection,
    tenant_id: str,
    *,
    limit: int,
    after: int | None = None,
    event_type: str | None = None,
    account_id: str | None = None,
    since: datetime | None = None,
    until: datetime | None = None,
) -> list[dict[str, Any]]:
    """Newest first (by ``pk``, the order of insertion; the index of migration 0015)."""
    rows = await conn.fetch(
        f"""
        SELECT {_EVENT} FROM delivery.outbox o
        WHERE o.tenant_id = $1
          AND ($2::text IS NULL OR o.type = $2)
          AND ($3::text IS NULL OR o.account_id = $3)
          AND ($4::timestamptz IS NULL OR o.created_at >= $4)
          AND ($5::timestamptz IS NULL OR o.created_at < $5)
          AND ($6::bigint IS NULL OR o.pk < $6)
        ORDER BY o.pk DESC
        LIMIT $7
        """,
        tenant_id,
        event_type,
        account_id,
        since,
        until,
        after,
        limit + 1,
    )
    return [_event(r) for r in rows]


async def event(conn: asyncpg.Connection, tenant_id: str, event_id: str) -> dict[str, Any]:
    row = await conn.fetchrow(
        f"SELECT {_EVENT} FROM delivery.outbox o WHERE o.event_id = $1 AND o.tenant_id = $2",
        event_id,
        tenant_id,
    )
    if row is None:
        raise NotFoundError(f"event {event_id!r} does not exist")
    return _event(row)


async def _with_attempts(conn: asyncpg.Connection, rows: Sequence[Any]) -> list[dict[str, Any]]:
    deliveries = [dict(r) for r in rows]
    if not deliveries:
        return []
    attempts = await conn.fetch(
        """
        SELECT delivery_id, attempt, started_at, duration_ms, outcome, status, error,
               response_excerpt
        FROM delivery.attempts WHERE delivery_id = ANY($1::bigint[])
        ORDER BY delivery_id, attempt, id
        """,
        [d["id"] for d in deliveries],
    )
    by_delivery: dict[int, list[dict[str, Any]]] = {}
    for a in attempts:
        item = dict(a)
        by_delivery.setdefault(item.pop("delivery_id"), []).append(item)
    for d in deliveries:
        d["attempt_log"] = by_delivery.get(d["id"], [])
    return deliveries


async def event_deliveries(
    conn: asyncpg.Connection, tenant_id: str, event_id: str
) -> list[dict[str, Any]]:
    """Every delivery of the event to the tenant's subscriptions, with its attempts."""
    rows = await conn.fetch(
        f"""
        SELECT {_DELIVERY} FROM delivery.deliveries d
        JOIN delivery.subscriptions s ON s.id = d.subscription_id
        WHERE d.event_id = $1 AND s.tenant_id = $2
        ORDER BY d.id
        """,
        event_id,
        tenant_id,
    )
    return await _with_attempts(conn, rows)


async def subscription_deliveries(
    conn: asyncpg.Connection,
    subscription_id: str,
    *,
    limit: int,
    after: int | None = None,
    state: str | None = None,
    since: datetime | None = None,
    until: datetime | None = None,
) -> list[dict[str, Any]]:
    """A subscription's deliveries, newest first, with attempts; ``since``/``until`` on the
    event's ``created_at``. The caller has checked the subscription is the tenant's."""
    rows = await conn.fetch(
        f"""
        SELECT {_DELIVERY} FROM delivery.deliveries d
        JOIN delivery.outbox o ON o.event_id = d.event_id
        WHERE d.subscription_id = $1
          AND ($2::text IS NULL OR d.state = $2)
          AND ($3::timestamptz IS NULL OR o.created_at >= $3)
          AND ($4::timestamptz IS NULL OR o.created_at < $4)
          AND ($5::bigint IS NULL OR d.id < $5)
        ORDER BY d.id DESC
        LIMIT $6
        """,
        subscription_id,
        state,
        since,
        until,
        after,
        limit + 1,
    )
    return await _with_attempts(conn, rows)


_DEAD_WHERE = """
    d.state = 'dead' AND s.tenant_id = $1
    AND ($2::text IS NULL OR d.subscription_id = $2)
    AND ($3::timestamptz IS NULL OR o.created_at >= $3)
    AND ($4::timestamptz IS NULL OR o.created_at < $4)
"""


async def dead_letters(
    conn: asyncpg.Connection,
    tenant_id: str,
    *,
    limit: int,
    after: int | None = None,
    subscription_id: str | None = None,
    since: datetime | None = None,
    until: datetime | None = None,
) -> list[dict[str, Any]]:
    """The tenant's dead letters, oldest delivery first (by id)."""
    rows = await conn.fetch(
        f"""
        SELECT d.id, d.event_id, o.type AS event_type, d.subscription_id, d.dead_reason AS reason,
               d.attempts, d.last_status, d.first_attempt_at, d.last_attempt_at, d.dead_at,
               o.created_at
        FROM delivery.deliveries d
        JOIN delivery.subscriptions s ON s.id = d.subscription_id
        JOIN delivery.outbox o ON o.event_id = d.event_id
        WHERE {_DEAD_WHERE} AND ($5::bigint IS NULL OR d.id > $5)
        ORDER BY d.id
        LIMIT $6
        """,
        tenant_id,
        subscription_id,
        since,
        until,
        after,
        limit + 1,
    )
    return [dict(r) for r in rows]


async def dead_letter_ids(
    conn: asyncpg.Connection,
    tenant_id: str,
    *,
    ids: Sequence[int] | None = None,
    subscription_id: str | None = None,
    since: datetime | None = None,
    until: datetime | None = None,
) -> list[int]:
    """The ids of the tenant's dead letters among ``ids`` (another tenant's are dropped, as
    missing ones are) or matching the filter; for ``dead_letters.replay`` and ``purge``."""
    rows = await conn.fetch(
        f"""
        SELECT d.id FROM delivery.deliveries d
        JOIN delivery.subscriptions s ON s.id = d.subscription_id
        JOIN delivery.outbox o ON o.event_id = d.event_id
        WHERE {_DEAD_WHERE} AND ($5::bigint[] IS NULL OR d.id = ANY($5::bigint[]))
        ORDER BY d.id
        """,
        tenant_id,
        subscription_id,
        since,
        until,
        list(ids) if ids is not None else None,
    )
    return [r["id"] for r in rows]


async def subscriptions(
    conn: asyncpg.Connection, tenant_id: str, *, limit: int, after: tuple[datetime, str] | None
) -> list[Any]:
    """The tenant's subscriptions (not the removed ones), oldest first; rows for
    ``Subscription.from_row``."""
    columns = ", ".join(FIELDS)
    return list(
        await conn.fetch(
            f"""
            SELECT {columns} FROM delivery.subscriptions
            WHERE tenant_id = $1 AND state <> 'removed'
              AND ($2::timestamptz IS NULL OR (created_at, id) > ($2, $3))
            ORDER BY created_at, id
            LIMIT $4
            """,
            tenant_id,
            after[0] if after else None,
            after[1] if after else None,
            limit + 1,
        )
    )


async def awaiting_dispatch(
    conn: asyncpg.Connection, tenant_id: str, event: dict[str, Any]
) -> list[str]:
    """The tenant's subscriptions (active or paused) that the event matches, while no worker
    has dispatched it (no inbox row): who will get a delivery. Empty once dispatched."""
    if await conn.fetchval("SELECT true FROM delivery.inbox WHERE event_id = $1", event["id"]):
        return []
    waiting = (SubscriptionState.ACTIVE, SubscriptionState.PAUSED)
    return [
        s.id
        for s in await list_all(conn, tenant_id=tenant_id)
        if s.state in waiting and s.matches(event["type"], event["account_id"])
    ]
