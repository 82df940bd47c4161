"""``delivery status``: is it healthy, what is stuck, since when."""

from __future__ import annotations

from typing import Any

import aio_pika
import asyncpg

from delivery.broker.connection import with_defaults
from delivery.broker.topology import Names
from delivery.events import format_timestamp

_OUTBOX = """
SELECT count(*) AS pending,
       coalesce(extract(epoch FROM clock_timestamp() - min(created_at)), 0)::float8 AS oldest_s
FROM delivery.outbox WHERE published_at IS NULL
"""
_PER_SUBSCRIPTION = """
SELECT s.id, s.url, s.state, s.disabled_reason, s.event_patterns, s.account_id,
       s.circuit_state, s.consecutive_failures, s.failing_since,
       count(*) FILTER (WHERE d.state = 'pending' AND d.attempts = 0) AS pending,
       count(*) FILTER (WHERE d.state = 'pending' AND d.attempts > 0) AS retrying,
       count(*) FILTER (WHERE d.state = 'dead') AS dead,
       count(*) FILTER (WHERE d.state = 'delivered') AS delivered,
       max(d.delivered_at) AS last_success,
       min(d.next_attempt_at) FILTER (WHERE d.state = 'pending') AS next_attempt_at
FROM delivery.subscriptions s
LEFT JOIN delivery.deliveries d ON d.subscription_id = s.id
GROUP BY s.id
ORDER BY s.created_at, s.id
"""


async def queue_depths(amqp_url: str, names: Names) -> dict[str, int | None]:
    """Message counts by passive declare; ``None`` for a queue that does not exist (yet)."""
    depths: dict[str, int | None] = {}
    connection = await aio_pika.connect(with_defaults(amqp_url), timeout=10)
    try:
        for name in (names.dispatch_queue, names.dead_queue):
            channel = await connection.channel()
            try:
                queue = await channel.declare_queue(name, passive=True)
                depths[name] = queue.declaration_result.message_count
            except aio_pika.exceptions.ChannelClosed:
                depths[name] = None
            finally:
                if not channel.is_closed:
                    await channel.close()
    finally:
        await connection.close()
    return depths


async def collect(conn: asyncpg.Connection, amqp_url: str | None, names: Names) -> dict[str, Any]:
    outbox = await conn.fetchrow(_OUTBOX)
    assert outbox is not None
    subs = []
    for row in await conn.fetch(_PER_SUBSCRIPTION):
        subs.append(
            {
                "id": row["id"],
                "url": row["url"],
                "state": row["state"],
                "circuit": row["circuit_state"],
                "consecutive_failures": row["consecutive_failures"],
                "failing_since": _ts(row["failing_since"]),
                "disabled_reason": row["disabled_reason"],
                "events": list(row["event_patterns"]),
                "account_id": row["account_id"],
                "pending": row["pending"],
                "retrying": row["retrying"],
                "dead": row["dead"],
                "delivered": row["delivered"],
                "last_success": _ts(row["last_success"]),
                "next_attempt_at": _ts(row["next_attempt_at"]),
            }
        )
    queues: dict[str, int | None] | str
    try:
        queues = await queue_depths(amqp_url, names) if amqp_url else "DELIVERY_AMQP_URL not set"
    except Exception as exc:
        queues = f"unreachable: {type(exc).__name__}"
    poison = await conn.fetchval("SELECT count(*) FROM delivery.poison_messages")
    return {
        "outbox": {"pending": outbox["pending"], "oldest_age_s": round(outbox["oldest_s"], 3)},
        "poison_messages": poison,
        "queues": queues,
        "subscriptions": subs,
    }


def _ts(value: Any) -> str | None:
    return format_timestamp(value) if value is not None else None
