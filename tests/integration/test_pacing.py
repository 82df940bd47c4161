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
from delivery.testing.receiver import scripted_subscriber
from delivery.testing.throttling import FirstAttemptRefuser, RateLimitedSubscriber
from tests.support import run_until_idle

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
