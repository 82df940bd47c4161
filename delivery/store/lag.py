"""The end-to-end lag: how old the oldest event is that has not yet reached a subscriber for the
first time, per stage of the pipeline. Read by the relay for ``delivery_lag_seconds{stage}``.

* ``outbox``    committed, not yet published to RabbitMQ: the front of the relay's own index
                (``outbox_unpublished``). It counts events no subscription matches too: the relay
                cannot tell them apart, and they wait as long.
* ``dispatch``  published, not yet in a worker's inbox (ready in the queue, prefetched, on the
                wire). No index says "not dispatched", so a ``DispatchFrontier`` walks the
                published rows in publish order from where its last read stopped, in bounded
                chunks, and stops at the first one without an inbox row: each read costs about
                the events published since the previous one, never the whole log.
* ``delivery``  dispatched to an active subscription, no first attempt outcome yet: per
                subscription, the front of ``deliveries_awaiting_first_outcome`` (migration
                0020), one index probe each. Subscriptions whose circuit is open or that a 429
                paces are left out: their subscriber holds them back, which the circuit and
                throttling alerts report; the lag alert is about the platform falling behind.
                A delivery a replay made for an event the subscription never had counts from
                the replay, not from the commit.

Every age runs from the outbox commit (``created_at``), so a backlog reads the same whichever
stage it sits in, and moving from one stage to the next does not reset it.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime

import asyncpg

__all__ = ["STAGES", "DispatchFrontier", "Lag", "read_lag"]

STAGES = ("outbox", "dispatch", "delivery")

_OUTBOX_FRONT = """
SELECT extract(epoch FROM clock_timestamp() - created_at)::float8
FROM delivery.outbox WHERE published_at IS NULL ORDER BY pk LIMIT 1
"""
# $1 the last row known dispatched (NULL: start $3 seconds ago), $2 rows per chunk. Strictly
# after it: published_at is clock_timestamp() per row, so a tie that would hide a row is a
# microsecond coincidence, and re-reading the last row would waste a slot of every chunk.
# The bound uses now(), not clock_timestamp(): a stable expression is an index condition (the
# range scan starts at the bound), a volatile one only a filter over the index from its start.
# The inbox probe is a scalar subquery with LIMIT so that it stays one index probe per row: as
# EXISTS, the planner may hash the whole inbox instead (measured: a seq scan of 195,000 rows
# per chunk).
_PUBLISHED_FROM = """
SELECT o.published_at,
       extract(epoch FROM clock_timestamp() - o.created_at)::float8 AS age_s,
       (SELECT true FROM delivery.inbox i WHERE i.event_id = o.event_id LIMIT 1) IS NOT NULL
           AS dispatched
FROM delivery.outbox o
WHERE o.published_at IS NOT NULL
  AND o.published_at > coalesce($1::timestamptz, now() - make_interval(secs => $3))
ORDER BY o.published_at
LIMIT $2
"""
# A delivery made by dispatch is made in the statement that writes the event's inbox row; one
# made much later (a replay of a window to a subscription that never had the event: a backfill)
# is not late since the commit, but since it was asked for.
_DELIVERY_FRONT = """
SELECT max(extract(epoch FROM clock_timestamp() - CASE
           WHEN f.created_at <= i.received_at + interval '5 seconds' THEN o.created_at
           ELSE f.created_at END))::float8
FROM delivery.subscriptions s
CROSS JOIN LATERAL (
    SELECT d.event_id, d.created_at FROM delivery.deliveries d
    WHERE d.subscription_id = s.id AND d.state = 'pending' AND d.first_attempt_at IS NULL
    ORDER BY d.created_at LIMIT 1
) f
JOIN delivery.outbox o ON o.event_id = f.event_id
LEFT JOIN delivery.inbox i ON i.event_id = f.event_id
WHERE s.state = 'active' AND s.circuit_state = 'closed'
  AND (s.paced_until IS NULL OR s.paced_until <= clock_timestamp())
"""


@dataclass(frozen=True, slots=True)
class Lag:
    """Seconds since the commit of each stage's oldest waiting event (0: nothing waits there).
    ``dispatch`` is None when the walk has not caught up with the publishes yet (unknown)."""

    outbox_s: float
    dispatch_s: float | None
    delivery_s: float

    def by_stage(self) -> dict[str, float | None]:
        return {"outbox": self.outbox_s, "dispatch": self.dispatch_s, "delivery": self.delivery_s}


class DispatchFrontier:
    """Where the walk of published rows stands: every row published before ``at`` has reached
    the inbox. A new frontier starts ``start_horizon_s`` back (an older undispatched event is
    left to the relay's redrive sweep, which puts it back in the outbox stage)."""

    def __init__(
        self, *, chunk_rows: int = 1000, max_chunks: int = 10, start_horizon_s: float = 900.0
    ) -> None:
        self.chunk_rows = chunk_rows
        self.max_chunks = max_chunks
        self.start_horizon_s = start_horizon_s
        self.at: datetime | None = None

    async def oldest_s(self, conn: asyncpg.Connection | asyncpg.Pool) -> float | None:
        """The age of the first published row without an inbox row, 0.0 if there is none, None
        if ``max_chunks`` chunks were all dispatched (the next read goes on from there)."""
        for _ in range(self.max_chunks):
            rows = await conn.fetch(_PUBLISHED_FROM, self.at, self.chunk_rows, self.start_horizon_s)
            for row in rows:
                if not row["dispatched"]:  # the next read starts again at this row
                    return max(0.0, float(row["age_s"]))
                self.at = row["published_at"]
            if len(rows) < self.chunk_rows:
                return 0.0
        return None


async def read_lag(conn: asyncpg.Connection | asyncpg.Pool, frontier: DispatchFrontier) -> Lag:
    outbox_s = await conn.fetchval(_OUTBOX_FRONT)
    dispatch_s = await frontier.oldest_s(conn)
    delivery_s = await conn.fetchval(_DELIVERY_FRONT)
    return Lag(
        outbox_s=max(0.0, outbox_s or 0.0),
        dispatch_s=dispatch_s,
        delivery_s=max(0.0, delivery_s or 0.0),
    )
