"""Dead letters: deliveries that will not be attempted again until an operator replays them.

A dead letter belongs to its subscription's tenant. Listing, replaying and purging act within
one tenant (``tenant_id``, ``default`` unless named): another tenant's are never selected, even
by id. Poison messages are the platform's, not a tenant's (no relay sent them).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import asyncpg

from delivery.errors import InputError
from delivery.events import format_timestamp
from delivery.store.tenants import DEFAULT_TENANT
from delivery.text import safe_text

_BATCH = 1000

# Parking: pending deliveries become dead letters with a reason, never attempted until an
# operator replays them (a disabled subscription's backlog; after `subscriptions enable`,
# `dlq replay` delivers it).
_PARK = """
UPDATE delivery.deliveries
SET state = 'dead', dead_at = clock_timestamp(), dead_reason = $2, lease_until = NULL
WHERE {which} AND state = 'pending'
"""
_PARK_SUBSCRIPTION = _PARK.format(which="subscription_id = $1")
_PARK_DELIVERIES = _PARK.format(which="id = ANY($1::bigint[])")


# Within the tenant: its subscriptions (removed ones too, whose dead letters stay).
_OF_TENANT = (
    "EXISTS (SELECT 1 FROM delivery.subscriptions ts"
    " WHERE ts.id = d.subscription_id AND ts.tenant_id = ${n})"
)


@dataclass(frozen=True)
class Selector:
    """Which of a tenant's dead letters a command acts on: ids, one subscription's, or all."""

    ids: tuple[int, ...] = ()
    subscription_id: str | None = None
    everything: bool = False
    tenant_id: str = DEFAULT_TENANT

    def __post_init__(self) -> None:
        chosen = sum([bool(self.ids), self.subscription_id is not None, self.everything])
        if chosen != 1:
            raise InputError("name dead letters by ID..., --subscription ID or --all (one of them)")

    def where(self) -> tuple[str, list[Any]]:
        """A condition on ``d`` (delivery.deliveries) and its parameters, $1 onwards."""
        args: list[Any]
        if self.ids:
            which, args = "d.id = ANY($1::bigint[])", [list(self.ids)]
        elif self.subscription_id is not None:
            which, args = "d.subscription_id = $1", [self.subscription_id]
        else:
            which, args = "TRUE", []
        tenant = _OF_TENANT.format(n=len(args) + 1)
        return f"{which} AND {tenant}", [*args, self.tenant_id]


@dataclass(frozen=True)
class DeadLetter:
    id: int
    event_id: str
    event_type: str
    subscription_id: str
    reason: str | None
    attempts: int
    last_status: int | None
    first_attempt_at: datetime | None
    last_attempt_at: datetime | None
    dead_at: datetime | None


async def list_dead(
    conn: asyncpg.Connection,
    *,
    subscription_id: str | None = None,
    limit: int = 1000,
    tenant_id: str = DEFAULT_TENANT,
) -> list[DeadLetter]:
    rows = await conn.fetch(
        """
        SELECT d.id, d.event_id, o.type AS event_type, d.subscription_id, d.dead_reason AS reason,
               d.attempts, d.last_status, d.first_attempt_at, d.last_attempt_at, d.dead_at
        FROM delivery.deliveries d
        JOIN delivery.subscriptions s ON s.id = d.subscription_id
        JOIN delivery.outbox o ON o.event_id = d.event_id
        WHERE d.state = 'dead' AND s.tenant_id = $3
          AND ($1::text IS NULL OR d.subscription_id = $1)
        ORDER BY d.dead_at, d.id
        LIMIT $2
        """,
        subscription_id,
        limit,
        tenant_id,
    )
    return [DeadLetter(**dict(r)) for r in rows]


async def list_poison(conn: asyncpg.Connection, *, limit: int = 1000) -> list[dict[str, Any]]:
    """Messages no worker could process (recorded by the dead-letter queue's consumer)."""
    rows = await conn.fetch(
        """
        SELECT id, received_at, message_id, routing_key, reason, death_count,
               substring(body FROM 1 FOR 800) AS body_start
        FROM delivery.poison_messages ORDER BY id LIMIT $1
        """,
        limit,
    )
    # Decoded here, bad bytes escaped: a poison message is whatever someone published, and
    # convert_from() failed the whole listing on one that was not UTF-8.
    return [
        {
            **{k: v for k, v in r.items() if k != "body_start"},
            "message_id": _shown(r["message_id"]),
            "routing_key": _shown(r["routing_key"]),
            "reason": _shown(r["reason"]),
            "received_at": format_timestamp(r["received_at"]),
            "body_excerpt": safe_text(r["body_start"] or b"", limit_chars=200),
        }
        for r in rows
    ]


def _shown(value: str | None) -> str | None:
    return None if value is None else safe_text(value, limit_chars=500)


async def _batched(
    pool: asyncpg.Pool,
    selector: Selector,
    statement: str,
    progress: Callable[[int], None] | None,
) -> int:
    """Apply ``statement`` (which takes a list of ids) to the selected dead letters, in batches
    of one transaction each, so a huge replay shows progress and never holds long locks."""
    where, args = selector.where()
    total = 0
    last_id = 0
    while True:
        async with pool.acquire() as conn, conn.transaction():
            ids = await conn.fetchval(
                f"""
                SELECT array_agg(id) FROM (
                    SELECT d.id FROM delivery.deliveries d
                    WHERE d.state = 'dead' AND d.id > ${len(args) + 1} AND {where}
                    ORDER BY d.id LIMIT {_BATCH} FOR UPDATE SKIP LOCKED
                ) x
                """,
                *args,
                last_id,
            )
            if not ids:
                return total
            status = await conn.execute(statement, ids)
        total += int(status.rsplit(" ", 1)[-1])
        last_id = max(ids)
        if progress is not None:
            progress(total)


async def replay(
    pool: asyncpg.Pool, selector: Selector, *, progress: Callable[[int], None] | None = None
) -> tuple[int, int]:
    """Send the selected dead letters again (same event, same ``webhook-id``), with a fresh
    retry schedule (a paused subscription's go out on resume). An ordered subscription's are
    held, then released one per account in sequence order by migration 0022's trigger.
    Returns (replayed, skipped because the subscription is disabled)."""
    where, args = selector.where()
    skipped: int = await pool.fetchval(
        f"""
        SELECT count(*) FROM delivery.deliveries d
        JOIN delivery.subscriptions s ON s.id = d.subscription_id
        WHERE d.state = 'dead' AND s.state NOT IN ('active', 'paused') AND {where}
        """,
        *args,
    )
    replayed = await _batched(
        pool,
        selector,
        """
        UPDATE delivery.deliveries d
        SET state = 'pending', attempts = 0,
            next_attempt_at = CASE WHEN d.account_id IS NULL THEN clock_timestamp()
                                   ELSE 'infinity' END,
            lease_until = NULL, dead_at = NULL, dead_reason = NULL, unrecorded_handbacks = 0
        FROM delivery.subscriptions s
        WHERE d.id = ANY($1::bigint[]) AND s.id = d.subscription_id
          AND s.state IN ('active', 'paused')
        """,
        progress,
    )
    return replayed, skipped


async def skip(
    pool: asyncpg.Pool, selector: Selector, *, progress: Callable[[int], None] | None = None
) -> int:
    """Give up on the selected dead letters (``delivery dlq skip``, ``POST
    /v1/dead-letters/skip``): kept, as ``skipped``, never sent. An ordered subscription's
    account held behind one goes on with its next event (migration 0022's trigger releases
    it in the same transaction). Returns how many."""
    return await _batched(
        pool,
        selector,
        "UPDATE delivery.deliveries SET state = 'skipped', lease_until = NULL"
        " WHERE id = ANY($1::bigint[]) AND state = 'dead'",
        progress,
    )


async def count(db: asyncpg.Pool | asyncpg.Connection, selector: Selector) -> int:
    """How many dead letters ``selector`` names (what a purge would drop now)."""
    where, args = selector.where()
    found = await db.fetchval(
        f"SELECT count(*) FROM delivery.deliveries d WHERE d.state = 'dead' AND {where}", *args
    )
    return int(found)


async def purge(
    pool: asyncpg.Pool, selector: Selector, *, progress: Callable[[int], None] | None = None
) -> int:
    return await _batched(
        pool, selector, "DELETE FROM delivery.deliveries WHERE id = ANY($1::bigint[])", progress
    )


async def park_pending(
    db: asyncpg.Pool | asyncpg.Connection, subscription_id: str, reason: str
) -> None:
    """Every pending delivery of the subscription, as a dead letter with ``reason``."""
    await db.execute(_PARK_SUBSCRIPTION, subscription_id, reason)


async def park(db: asyncpg.Pool | asyncpg.Connection, delivery_ids: list[int], reason: str) -> None:
    """These deliveries, those still pending, as dead letters with ``reason``."""
    await db.execute(_PARK_DELIVERIES, delivery_ids, reason)


def ids_from_args(values: Sequence[str]) -> tuple[int, ...]:
    """Dead-letter ids as typed: ASCII digits only, within PostgreSQL's bigint."""
    out = []
    for value in values:
        if not (value.isascii() and value.isdigit() and 0 < len(value) <= 18):
            raise InputError(f"dead letter id {value!r} is not a number (see `delivery dlq list`)")
        out.append(int(value))
    return tuple(out)
