"""429 means "slow down", not "down": a throttling subscriber is paced, never cut off.

Both subscribers here are real local HTTP servers: one that refuses the first attempt of each
event (429 + Retry-After), one that allows a fixed rate and refuses what goes beyond it.
"""

from __future__ import annotations

import asyncpg
import pytest

from delivery import publish_many
from delivery.store import subscriptions
from delivery.testing.factories import balance
from delivery.testing.receiver import Receiver, scripted_subscriber
from delivery.testing.throttling import FirstAttemptRefuser, RateLimitedSubscriber
from delivery.testing.waits import wait_until
from tests.support import run_until_idle, running

pytestmark = pytest.mark.integration


async def circuit_opened(conn: asyncpg.Connection) -> bool:
    return bool(
        await conn.fetchval(
            "SELECT bool_or(circuit_state = 'open' OR consecutive_failures > 0)"
            " FROM delivery.subscriptions"
        )
    )


async def test_a_subscriber_refusing_each_first_attempt_gets_every_event_in_two_attempts(settings):
    """The issue's livelock: 429s opened the circuit, its probes were always fresh first
    attempts (refused again), and the due retries, which would succeed, were never tried."""
    settings = settings.model_copy(update={"retry_schedule_s": (0.5, 1.0, 2.0, 2.0, 2.0, 2.0)})
    refuser = FirstAttemptRefuser(retry_after_s=2)
    events = [balance(i, account=f"acc_{i % 3}", id=f"evt_first_{i:03d}") for i in range(24)]
    conn = await asyncpg.connect(settings.database_url)
    try:
        async with scripted_subscriber(refuser.answer) as base:
            await subscriptions.add(conn, url=f"{base}/hook", patterns="*")
            await publish_many(conn, events)
            await run_until_idle(settings, timeout_s=120)
        assert refuser.delivered == {e["id"] for e in events}
        # Every event: one refused first attempt, one accepted retry, nothing more.
        assert set(refuser.attempts.values()) == {2}
        assert not await circuit_opened(conn)  # a 429 is not a failure of the subscriber
        # The pause reached PostgreSQL, where every worker sees it.
        assert await conn.fetchval("SELECT paced_until IS NOT NULL FROM delivery.subscriptions")
        states = await conn.fetch("SELECT state, attempts FROM delivery.deliveries")
        assert {(r["state"], r["attempts"]) for r in states} == {("delivered", 2)}
    finally:
        await conn.close()


async def test_a_rate_limited_subscriber_gets_everything_with_bounded_attempts(settings):
    """20 requests/s allowed, 429 + Retry-After beyond: the subscription is paced near that
    rate, so an event is refused only a few times at most, and the circuit never opens."""
    settings = settings.model_copy(
        update={"retry_schedule_s": (0.5, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0)}
    )
    limited = RateLimitedSubscriber(rate_per_s=20)
    events = [balance(i, account=f"acc_{i % 3}", id=f"evt_rate_{i:03d}") for i in range(100)]
    conn = await asyncpg.connect(settings.database_url)
    try:
        async with scripted_subscriber(limited.answer) as base:
            await subscriptions.add(conn, url=f"{base}/hook", patterns="*")
            await publish_many(conn, events)
            await run_until_idle(settings, timeout_s=120)
        assert limited.delivered == {e["id"] for e in events}
        assert limited.refused > 0  # the subscriber really did refuse some
        # Without pacing, most of a burst is refused again and again; paced, an event is
        # refused at most a couple of times (its retry goes first after the pause).
        assert max(limited.attempts.values()) <= 4
        assert sum(limited.attempts.values()) <= 2 * len(events)
        assert not await circuit_opened(conn)
    finally:
        await conn.close()


async def test_a_probe_after_a_circuit_cooldown_is_a_due_retry_not_a_fresh_event(settings):
    """Fresh first attempts wait beside a due retry (older ones, so the retry is not first by
    time): the probe, and the claim after it, take the retry first."""
    settings = settings.model_copy(update={"circuit_cooldown_s": 1.0})
    conn = await asyncpg.connect(settings.database_url)
    try:
        async with Receiver() as receiver:
            sub = await subscriptions.add(conn, url=receiver.url("/hook"), patterns="*")
            # The circuit is open: dispatch leaves new deliveries waiting for the probe.
            await conn.execute(
                "UPDATE delivery.subscriptions SET circuit_state = 'open', consecutive_failures = 5,"
                " circuit_retry_at = clock_timestamp() + interval '1 hour' WHERE id = $1",
                sub.id,
            )
            events = [balance(i, id=f"evt_probe_{i}") for i in range(6)]
            async with running(settings):
                await publish_many(conn, events)
                await wait_until(
                    lambda: conn.fetchval("SELECT count(*) = 6 FROM delivery.deliveries"),
                    timeout_s=30,
                    what="the deliveries waiting behind the open circuit",
                )
                # The newest event failed once already and is due for retry now.
                await conn.execute(
                    "UPDATE delivery.deliveries SET attempts = 1, last_status = 503,"
                    " next_attempt_at = clock_timestamp() WHERE event_id = 'evt_probe_5'"
                )
                await conn.execute(
                    "UPDATE delivery.subscriptions SET circuit_retry_at = clock_timestamp()"
                )
                await receiver.wait_for(
                    lambda r: r.unique_count("/hook") == 6, timeout_s=60, what="all six"
                )
        assert receiver.arrivals[0].webhook_id == "evt_probe_5"
    finally:
        await conn.close()


async def test_a_pause_recorded_in_postgresql_holds_back_every_worker(settings):
    """Another worker saw the 429: this one sends nothing to that subscriber before the pause
    recorded in PostgreSQL ends, neither new events nor claimed ones."""
    conn = await asyncpg.connect(settings.database_url)
    try:
        async with Receiver() as receiver:
            sub = await subscriptions.add(conn, url=receiver.url("/hook"), patterns="*")
            paused_until = await conn.fetchval(
                "UPDATE delivery.subscriptions"
                " SET paced_until = clock_timestamp() + interval '2 seconds'"
                " WHERE id = $1 RETURNING extract(epoch FROM paced_until)::float8",
                sub.id,
            )
            events = [balance(i, id=f"evt_paused_{i}") for i in range(10)]
            await publish_many(conn, events)
            await run_until_idle(settings, timeout_s=60)
        assert receiver.unique_ids("/hook") == {e["id"] for e in events}
        assert min(a.arrived_at for a in receiver.arrivals) >= paused_until
    finally:
        await conn.close()
