"""``delivery status``, the database half: is it healthy, what is stuck, since when.

The queue depths come from the broker (``delivery.broker.depths``); the caller passes them in as
a function, so this module needs no broker.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import asyncpg

from delivery.events import format_timestamp
from delivery.store.unhealthy import unhealthy
from delivery.targets import mask_url

# How far behind the relay is: read by ``delivery status`` and by the relay for its gauges.
_OUTBOX_BACKLOG = """
SELECT count(*) AS pending,
       coalesce(extract(epoch FROM clock_timestamp() - min(created_at)), 0)::float8 AS oldest_s
FROM delivery.outbox WHERE published_at IS NULL
"""
_PER_SUBSCRIPTION = """
SELECT s.id, s.tenant_id, s.url, s.state, s.disabled_reason, s.event_patterns, s.account_id,
       s.ordered, s.circuit_state, s.consecutive_failures, s.failing_since, s.paced_until,
       count(*) FILTER (WHERE d.state = 'pending' AND d.attempts = 0) AS pending,
       count(*) FILTER (WHERE d.state = 'pending' AND d.attempts > 0) AS retrying,
       count(*) FILTER (WHERE d.state = 'dead') AS dead,
       count(*) FILTER (WHERE d.state = 'delivered') AS delivered,
       max(d.delivered_at) AS last_success,
       -- An ordered subscription's held deliveries (never due until released) excluded.
       min(d.next_attempt_at) FILTER (
           WHERE d.state = 'pending' AND d.next_attempt_at <> 'infinity') AS next_attempt_at,
       count(DISTINCT d.account_id) FILTER (
           WHERE d.state = 'dead' AND d.account_id IS NOT NULL) AS blocked_accounts
FROM delivery.subscriptions s
LEFT JOIN delivery.deliveries d ON d.subscription_id = s.id
WHERE s.state <> 'removed' AND ($1::text IS NULL OR s.tenant_id = $1)
GROUP BY s.id
ORDER BY s.created_at, s.id
"""
# Ordered subscriptions' accounts held by a dead letter: each one's first dead letter (what
# on-call replays or skips). Only ordered deliveries have an account_id (migration 0022), and
# their partial index holds only the unfinished ones.
BLOCKED_LIMIT = 100
_BLOCKED = """
SELECT DISTINCT ON (d.subscription_id, d.account_id)
       d.subscription_id, s.tenant_id, d.account_id, d.sequence, d.id AS dead_letter_id,
       d.dead_at, d.dead_reason
FROM delivery.deliveries d
JOIN delivery.subscriptions s ON s.id = d.subscription_id
WHERE d.account_id IS NOT NULL AND d.state = 'dead' AND s.state <> 'removed'
ORDER BY d.subscription_id, d.account_id, d.sequence
LIMIT $1
"""
# One subscription's held accounts, for the web page (the caller has checked its tenant).
_BLOCKED_OF = """
SELECT DISTINCT ON (d.account_id)
       d.account_id, d.sequence, d.id AS dead_letter_id, d.event_id, d.dead_at, d.dead_reason,
       d.last_status
FROM delivery.deliveries d
WHERE d.subscription_id = $1 AND d.account_id IS NOT NULL AND d.state = 'dead'
ORDER BY d.account_id, d.sequence
LIMIT $2
"""
# A removed subscription's dead letters stay (its history) but hold nothing anyone waits for.
BLOCKED_ACCOUNTS = """
SELECT count(*) FROM (
    SELECT DISTINCT d.subscription_id, d.account_id FROM delivery.deliveries d
    JOIN delivery.subscriptions s ON s.id = d.subscription_id
    WHERE d.account_id IS NOT NULL AND d.state = 'dead' AND s.state <> 'removed'
) x
"""


@dataclass(frozen=True, slots=True)
class OutboxBacklog:
    pending: int  # events not published yet
    oldest_s: float  # the age of the oldest of them (0 when there is none)


async def outbox_backlog(db: asyncpg.Pool | asyncpg.Connection) -> OutboxBacklog:
    row = await db.fetchrow(_OUTBOX_BACKLOG)
    assert row is not None  # an aggregate without GROUP BY: always one row
    return OutboxBacklog(pending=row["pending"], oldest_s=row["oldest_s"])


async def collect(
    conn: asyncpg.Connection,
    queues: Callable[[], Awaitable[tuple[dict[str, int | None], str | None]]],
) -> dict[str, Any]:
    """The report of ``delivery status``; ``queues`` reads the depths and why they are unknown
    (``queue_report``). One shape whatever the broker says: ``ok`` is false, and
    ``queues_error`` says why, when the depths could not be read."""
    outbox = await outbox_backlog(conn)
    subs = await subscription_health(conn)
    blocked = [
        {
            "subscription_id": r["subscription_id"],
            "tenant_id": r["tenant_id"],
            "account_id": r["account_id"],
            "sequence": r["sequence"],
            "dead_letter_id": r["dead_letter_id"],
            "dead_at": _ts(r["dead_at"]),
            "reason": r["dead_reason"],
        }
        for r in await conn.fetch(_BLOCKED, BLOCKED_LIMIT)
    ]
    depths, queues_error = await queues()
    poison = await conn.fetchval("SELECT count(*) FROM delivery.poison_messages")
    return {
        "ok": queues_error is None,
        "outbox": {"pending": outbox.pending, "oldest_age_s": round(outbox.oldest_s, 3)},
        "poison_messages": poison,
        "queues": depths,
        "queues_error": queues_error,
        "subscriptions": subs,
        # At most BLOCKED_LIMIT; each subscription's blocked_accounts counts them all.
        "blocked_accounts": blocked,
        # Each unhealthy thing, since when, and the alert that covers it (the longest first).
        "unhealthy": await unhealthy(conn, queues_error=queues_error),
    }


async def blocked_accounts_of(
    db: asyncpg.Pool | asyncpg.Connection, subscription_id: str, limit: int = BLOCKED_LIMIT
) -> list[dict[str, Any]]:
    """An ordered subscription's accounts held by a dead letter, by account: the sequence held
    and the dead letter holding it (its first), which a replay or skip releases."""
    return [
        {
            "account_id": r["account_id"],
            "sequence": r["sequence"],
            "dead_letter_id": r["dead_letter_id"],
            "event_id": r["event_id"],
            "dead_at": r["dead_at"],
            "reason": r["dead_reason"],
            "last_status": r["last_status"],
        }
        for r in await db.fetch(_BLOCKED_OF, subscription_id, limit)
    ]


async def subscription_health(
    db: asyncpg.Pool | asyncpg.Connection, tenant_id: str | None = None
) -> list[dict[str, Any]]:
    """Per subscription (not removed): state, circuit, counts by delivery state, last success;
    one tenant's, or every tenant's (``None``: the operator's view)."""
    subs = []
    for row in await db.fetch(_PER_SUBSCRIPTION, tenant_id):
        subs.append(
            {
                "id": row["id"],
                "tenant_id": row["tenant_id"],  # an operator's view: every tenant's
                "url": mask_url(row["url"]),  # a row from before credentials were refused
                "state": row["state"],
                "circuit": row["circuit_state"],
                "consecutive_failures": row["consecutive_failures"],
                "failing_since": _ts(row["failing_since"]),
                "paced_until": _ts(row["paced_until"]),
                "disabled_reason": row["disabled_reason"],
                "events": list(row["event_patterns"]),
                "account_id": row["account_id"],
                "ordered": row["ordered"],
                "blocked_accounts": row["blocked_accounts"],
                "pending": row["pending"],
                "retrying": row["retrying"],
                "dead": row["dead"],
                "delivered": row["delivered"],
                "last_success": _ts(row["last_success"]),
                "next_attempt_at": _ts(row["next_attempt_at"]),
            }
        )
    return subs


def _ts(value: Any) -> str | None:
    return format_timestamp(value) if value is not None else None
