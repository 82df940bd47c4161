"""After the faults: wait (with a deadline) until the platform has nothing left to do, and
read the state the checker judges. Talks to the servers directly, never through the proxies."""

from __future__ import annotations

import asyncio
import contextlib
import time

import asyncpg

from chaos.cluster import Cluster
from chaos.records import Redrive, SettledState
from delivery.broker.depths import queue_depths

__all__ = ["read_state", "wait_settled"]

_COUNTS = """
SELECT
    (SELECT count(*) FROM delivery.outbox WHERE published_at IS NULL) AS unpublished,
    (SELECT count(*) FROM delivery.outbox o
      WHERE NOT EXISTS (SELECT 1 FROM delivery.inbox i WHERE i.event_id = o.event_id))
        AS undispatched,
    (SELECT count(*) FROM delivery.deliveries WHERE state = 'pending') AS pending,
    (SELECT count(*) FROM delivery.deliveries WHERE state = 'dead') AS dead,
    (SELECT count(*) FROM delivery.poison_messages) AS poison,
    (SELECT count(*) FROM delivery.attempts) AS attempts
"""
_DEAD_REASONS = """
SELECT coalesce(dead_reason, '?') AS reason, count(*) AS n
FROM delivery.deliveries WHERE state = 'dead' GROUP BY 1
"""
_SEQUENCE_GAPS = """
SELECT count(*) FROM (
    SELECT account_id, count(*) AS n, min(sequence) AS lo, max(sequence) AS hi,
           count(DISTINCT sequence) AS distinct_n
    FROM delivery.outbox GROUP BY account_id
) t WHERE NOT (lo = 1 AND hi = n AND distinct_n = n)
"""
# Every redrive of every event (a row of NULLs where outbox.redrives counts one the log lacks),
# and the inbox's redeliveries of the event (NULL: never dispatched).
_REDRIVES = """
SELECT o.event_id, o.redrives, i.redeliveries, e->>'by' AS by,
       extract(epoch FROM (e->>'published_at')::timestamptz)::float8 AS published_s,
       extract(epoch FROM (e->>'at')::timestamptz)::float8 AS at_s
FROM delivery.outbox o
LEFT JOIN delivery.inbox i ON i.event_id = o.event_id
LEFT JOIN LATERAL jsonb_array_elements(o.redrive_log) AS e ON true
WHERE o.redrives > 0
"""
_POLL_S = 0.25


async def _queues(cluster: Cluster) -> tuple[int | None, int | None]:
    try:
        depths = await asyncio.wait_for(queue_depths(cluster.amqp_url, cluster.names), 15)
    except Exception:
        return None, None
    return depths.get(cluster.names.dispatch_queue), depths.get(cluster.names.dead_queue)


async def _snapshot(conn: asyncpg.Connection, cluster: Cluster) -> tuple[int | None, ...]:
    row = await conn.fetchrow(_COUNTS)
    assert row is not None
    ready, dead_ready = await _queues(cluster)
    return (*row.values(), ready, dead_ready)


def _idle(snapshot: tuple[int | None, ...], allowed_dead: int) -> bool:
    # Poison rows are terminal (kept for an operator): the checker judges them, not the wait.
    unpublished, undispatched, pending, dead, _poison, _attempts, ready, dead_ready = snapshot
    if unpublished or undispatched or pending or ready or dead_ready:
        return False
    return ready is not None and (dead or 0) <= allowed_dead


async def wait_settled(
    cluster: Cluster, *, timeout_s: float, allowed_dead: int = 0, no_progress_s: float = 20.0
) -> tuple[bool, float]:
    """Poll until the outbox, the queues and the retry state are empty: (settled, waited_s).

    Gives up at ``timeout_s``, or earlier when nothing at all has moved (counts, attempts,
    queue depths) for ``no_progress_s``: every fault is healed by now, and the platform's own
    timers (leases, retries, circuit cool-downs) are all far shorter than that here.
    """
    began = time.monotonic()
    deadline = began + timeout_s
    conn: asyncpg.Connection | None = None
    last: tuple[int | None, ...] = ()
    moved_at = began
    try:
        while time.monotonic() < deadline:
            try:
                if conn is None or conn.is_closed():
                    conn = await asyncpg.connect(cluster.db_url, timeout=5)
                snapshot = await _snapshot(conn, cluster)
            except (OSError, asyncpg.PostgresError, asyncpg.InterfaceError, TimeoutError):
                conn = None
            else:
                if _idle(snapshot, allowed_dead):
                    return True, time.monotonic() - began
                if snapshot != last:
                    last, moved_at = snapshot, time.monotonic()
                elif time.monotonic() - moved_at > no_progress_s:
                    break
            await asyncio.sleep(_POLL_S)
        return False, time.monotonic() - began
    finally:
        if conn is not None:
            with contextlib.suppress(Exception):
                await conn.close()


async def read_state(cluster: Cluster, *, settled: bool, waited_s: float) -> SettledState:
    conn = await asyncpg.connect(cluster.db_url, timeout=10)
    try:
        row = await conn.fetchrow(_COUNTS)
        assert row is not None
        reasons = {r["reason"]: r["n"] for r in await conn.fetch(_DEAD_REASONS)}
        ids = frozenset(
            r["event_id"] for r in await conn.fetch("SELECT event_id FROM delivery.outbox")
        )
        gaps = await conn.fetchval(_SEQUENCE_GAPS)
        poison = await conn.fetch(
            "SELECT coalesce(message_id, '') AS id, count(*) AS n "
            "FROM delivery.poison_messages GROUP BY 1"
        )
        redrives, redeliveries = _redrives(await conn.fetch(_REDRIVES))
    finally:
        await conn.close()
    ready, dead_ready = await _queues(cluster)
    return SettledState(
        settled=settled,
        waited_s=waited_s,
        outbox_ids=ids,
        outbox_unpublished=row["unpublished"],
        undispatched=row["undispatched"],
        deliveries_pending=row["pending"],
        dead_letters=row["dead"],
        dead_reasons=reasons,
        queue_ready=ready,
        dead_queue_ready=dead_ready,
        poison_messages=row["poison"],
        sequence_gaps=int(gaps or 0),
        poison_by_id={r["id"]: r["n"] for r in poison},
        redrives=redrives,
        redeliveries=redeliveries,
    )


def _redrives(rows: list[asyncpg.Record]) -> tuple[tuple[Redrive, ...], dict[str, int]]:
    entries: dict[str, list[Redrive]] = {}
    counts: dict[str, int] = {}
    redeliveries: dict[str, int] = {}
    for r in rows:
        event_id = r["event_id"]
        counts[event_id] = r["redrives"]
        if r["redeliveries"] is not None:
            redeliveries[event_id] = r["redeliveries"]
        logged = entries.setdefault(event_id, [])
        if r["by"] is not None:
            logged.append(Redrive(event_id, r["by"], r["published_s"], r["at_s"]))
    redrives: list[Redrive] = []
    for event_id, logged in entries.items():
        # Redrives from before the log existed (migration 0009): counted, not attributable.
        missing = max(0, counts[event_id] - len(logged))
        redrives += logged + [Redrive(event_id, "?", None)] * missing
    return tuple(redrives), redeliveries
