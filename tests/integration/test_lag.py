"""The end-to-end lag read (delivery.store.lag) on the real database, stage by stage: each
stage reports its oldest waiting event's age since commit, and reads an index's front."""

from __future__ import annotations

import asyncpg
import pytest

from delivery import publish_many
from delivery.store import subscriptions
from delivery.store.lag import DispatchFrontier, read_lag
from delivery.testing.factories import trade

pytestmark = pytest.mark.integration


async def _age(conn: asyncpg.Connection, event_id: str, seconds: float) -> None:
    """Pretend ``event_id`` committed ``seconds`` ago."""
    await conn.execute(
        "UPDATE delivery.outbox SET created_at = clock_timestamp() - make_interval(secs => $2)"
        " WHERE event_id = $1",
        event_id,
        seconds,
    )


async def _publish(conn: asyncpg.Connection, *event_ids: str) -> None:
    await conn.execute(
        "UPDATE delivery.outbox SET published_at = clock_timestamp() WHERE event_id = ANY($1)",
        list(event_ids),
    )


async def _dispatch(conn: asyncpg.Connection, sub_id: str, *event_ids: str) -> None:
    for event_id in event_ids:
        await conn.execute("INSERT INTO delivery.inbox (event_id) VALUES ($1)", event_id)
        await conn.execute(
            "INSERT INTO delivery.deliveries (event_id, subscription_id) VALUES ($1, $2)",
            event_id,
            sub_id,
        )


async def test_each_stage_reports_the_age_of_its_oldest_waiting_event(settings):
    conn = await asyncpg.connect(settings.database_url)
    sub = await subscriptions.add(conn, url="https://example.com/hook", patterns=["*"])
    ids = [f"e{i}" for i in range(6)]
    await publish_many(conn, [trade(i, id=e) for i, e in enumerate(ids)])
    for event_id, age_s in zip(ids, (600, 500, 400, 300, 200, 100), strict=True):
        await _age(conn, event_id, age_s)
    frontier = DispatchFrontier(chunk_rows=2)

    # Nothing relayed: every event waits in the outbox, the oldest 600 s.
    lag = await read_lag(conn, frontier)
    assert 600 <= lag.outbox_s < 610 and lag.dispatch_s == 0.0 and lag.delivery_s == 0.0

    # e0..e3 relayed, e0 and e1 dispatched (e0 then attempted once, e1 not yet).
    await _publish(conn, *ids[:4])
    await _dispatch(conn, sub.id, "e0", "e1")
    await conn.execute(
        "UPDATE delivery.deliveries SET first_attempt_at = clock_timestamp(), attempts = 1"
        " WHERE event_id = 'e0'"
    )
    lag = await read_lag(conn, frontier)
    assert 200 <= lag.outbox_s < 210  # e4
    assert lag.dispatch_s is not None and 400 <= lag.dispatch_s < 410  # e2, past 2 chunks
    assert 500 <= lag.delivery_s < 510  # e1: e0 has its first outcome

    # A subscription whose circuit is open holds its own deliveries back: not platform lag.
    await conn.execute("UPDATE delivery.subscriptions SET circuit_state = 'open'")
    assert (await read_lag(conn, frontier)).delivery_s == 0.0
    await conn.execute("UPDATE delivery.subscriptions SET circuit_state = 'closed'")

    # A backfill: a replay makes e5's delivery long after its dispatch (its inbox row is 300 s
    # old): once e1 has its outcome, e5 leads, counted from the replay, not from its commit
    # 100 s ago.
    await conn.execute(
        "INSERT INTO delivery.inbox (event_id, received_at) VALUES"
        " ('e5', clock_timestamp() - interval '300 seconds')"
    )
    await conn.execute(
        "INSERT INTO delivery.deliveries (event_id, subscription_id) VALUES ('e5', $1)", sub.id
    )
    await conn.execute(
        "UPDATE delivery.deliveries SET first_attempt_at = clock_timestamp() WHERE event_id = 'e1'"
    )
    assert (await read_lag(conn, frontier)).delivery_s < 5
    await conn.execute("DELETE FROM delivery.deliveries WHERE event_id = 'e5'")
    await conn.execute("DELETE FROM delivery.inbox WHERE event_id = 'e5'")

    # Everything dispatched and attempted: every stage reads 0.
    await _publish(conn, *ids[4:])
    await _dispatch(conn, sub.id, *ids[2:])
    await conn.execute("UPDATE delivery.deliveries SET first_attempt_at = clock_timestamp()")
    lag = await read_lag(conn, frontier)
    assert (lag.outbox_s, lag.dispatch_s, lag.delivery_s) == (0.0, 0.0, 0.0)
    await conn.close()


async def test_the_dispatch_walk_is_bounded_and_goes_on_where_it_stopped(settings):
    conn = await asyncpg.connect(settings.database_url)
    ids = [f"e{i}" for i in range(7)]
    await publish_many(conn, [trade(i, id=e) for i, e in enumerate(ids)])
    for event_id in ids:  # one at a time: publish order = id order
        await _publish(conn, event_id)
    await conn.executemany(
        "INSERT INTO delivery.inbox (event_id) VALUES ($1)", [(e,) for e in ids[:6]]
    )
    frontier = DispatchFrontier(chunk_rows=2, max_chunks=2)
    # Two chunks of dispatched rows: unknown this time, not a false 0.
    assert await frontier.oldest_s(conn) is None
    # The next read starts where this one stopped, and finds e6.
    found = await frontier.oldest_s(conn)
    assert found is not None and found >= 0.0
    await conn.close()


async def test_the_delivery_stage_reads_the_front_of_its_partial_index(settings):
    conn = await asyncpg.connect(settings.database_url)
    await conn.execute("SET enable_seqscan = off")
    plan = "\n".join(
        r[0]
        for r in await conn.fetch(
            "EXPLAIN SELECT d.event_id FROM delivery.deliveries d WHERE d.subscription_id = 's'"
            " AND d.state = 'pending' AND d.first_attempt_at IS NULL ORDER BY d.created_at LIMIT 1"
        )
    )
    assert "deliveries_awaiting_first_outcome" in plan and "Sort" not in plan, plan
    await conn.close()
