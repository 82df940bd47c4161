"""Workers die at the worst moments; the delivery promise holds.

A worker killed after the subscriber's 2xx but before recording it delivers again with the same
``webhook-id`` and body; one killed after recording the success never POSTs that event again.
The crash points are a test-only switch (``DELIVERY_DANGEROUS_CRASH_POINT``) that calls
``os._exit`` exactly there, so the test is deterministic rather than a race with ``kill -9``.
"""

from __future__ import annotations

import asyncio
import signal

import asyncpg
import orjson
import pytest

from delivery import publish
from delivery.store import subscriptions
from delivery.testing.env import harness_switches
from delivery.testing.factories import trade
from delivery.testing.receiver import Behaviour, Receiver
from delivery.testing.waits import wait_until
from tests.support import read_until, run_until_idle, running, start_worker, stop_gracefully

pytestmark = pytest.mark.integration


async def test_killed_before_recording_the_success_delivers_again_with_same_webhook_id(settings):
    settings = settings.model_copy(update={"delivery_lease_s": 2.0, "http_timeout_s": 1.0})
    conn = await asyncpg.connect(settings.database_url)
    async with Receiver() as receiver:
        sub = await subscriptions.add(conn, url=receiver.url("/h"), patterns="*")
        receiver.expect_secret("/h", sub.secret)
        await publish(conn, trade(1, id="evt_crash_post"))
        async with running(settings, worker=False):
            doomed = await start_worker(
                settings, **harness_switches(DELIVERY_DANGEROUS_CRASH_POINT="after_post")
            )
            assert await asyncio.wait_for(doomed.wait(), 60) == 137
            assert doomed.stderr is not None
            # A process running with a test-only switch says so, loudly, at start-up
            lines = [orjson.loads(line) for line in (await doomed.stderr.read()).splitlines()]
            (warning,) = [e for e in lines if e["event"] == "test_only_switches_active"]
            assert warning["level"] == "critical"
            assert warning["switches"] == ["DELIVERY_DANGEROUS_CRASH_POINT"]
            assert [a.webhook_id for a in receiver.delivered()] == ["evt_crash_post"]
            row = await conn.fetchrow("SELECT state, lease_until FROM delivery.deliveries")
            assert row["state"] == "pending" and row["lease_until"] is not None

            survivor = await start_worker(settings)
            await receiver.wait_for(
                lambda r: len(r.delivered()) == 2, timeout_s=60, what="the redelivery"
            )
            await wait_until(
                lambda: conn.fetchval("SELECT state = 'delivered' FROM delivery.deliveries"),
                timeout_s=30,
                what="the success recorded",
            )
            assert await stop_gracefully(survivor) == 0
        first, second = receiver.delivered()
        assert first.webhook_id == second.webhook_id == "evt_crash_post"
        assert first.body == second.body
        assert first.signature_ok and second.signature_ok
    await conn.close()


async def test_killed_after_recording_the_success_never_posts_again(settings):
    settings = settings.model_copy(update={"delivery_lease_s": 2.0, "http_timeout_s": 1.0})
    conn = await asyncpg.connect(settings.database_url)
    async with Receiver() as receiver:
        await subscriptions.add(conn, url=receiver.url("/h"), patterns="*")
        await publish(conn, trade(1, id="evt_crash_record"))
        async with running(settings, worker=False):
            doomed = await start_worker(
                settings, **harness_switches(DELIVERY_DANGEROUS_CRASH_POINT="after_record")
            )
            assert await asyncio.wait_for(doomed.wait(), 60) == 137
            assert await conn.fetchval("SELECT state FROM delivery.deliveries") == "delivered"
        # When another worker runs until no work is left (a delivery still leased or due, had
        # the success not been recorded, would be waited for and POSTed again)
        await run_until_idle(settings)
        # Then the event was POSTed once
        assert [a.webhook_id for a in receiver.arrivals] == ["evt_crash_record"]
    await conn.close()


async def test_sigterm_drains_and_exits_zero(settings):
    conn = await asyncpg.connect(settings.database_url)
    async with Receiver() as receiver:
        await subscriptions.add(conn, url=receiver.url("/h"), patterns="*")
        proc = await start_worker(settings, command="run")
        await publish(conn, trade(1, id="evt_before_sigterm"))
        await receiver.wait_for(lambda r: len(r.delivered()) == 1, timeout_s=60, what="delivery")
        assert await stop_gracefully(proc) == 0
        stderr = (await proc.stderr.read()).decode()
        assert "shutdown_started" in stderr
        # A component the supervisor restarted before the signal (RabbitMQ answering a consume
        # with INTERNAL_ERROR on a loaded machine) is not the drain's business; the drain is.
        assert "Traceback" not in stderr.split("shutdown_started", 1)[1]
    await conn.close()


async def test_a_second_signal_skips_the_drain_and_still_hands_work_back(settings):
    settings = settings.model_copy(
        update={"shutdown_timeout_s": 60.0, "http_timeout_s": 30.0, "delivery_lease_s": 120.0}
    )
    conn = await asyncpg.connect(settings.database_url)
    async with Receiver() as receiver:
        receiver.set_behaviour("/hang", Behaviour(hang=True))
        await subscriptions.add(conn, url=receiver.url("/hang"), patterns="*")
        proc = await start_worker(settings, command="run")
        await publish(conn, trade(1, id="evt_in_flight"))
        await receiver.wait_for(lambda r: len(r.arrivals) == 1, timeout_s=60, what="the attempt")
        assert await conn.fetchval("SELECT lease_until IS NOT NULL FROM delivery.deliveries")
        proc.send_signal(signal.SIGTERM)
        assert proc.stderr is not None
        await asyncio.wait_for(read_until(proc.stderr, b"shutdown_started"), 20)
        proc.send_signal(signal.SIGTERM)
        # Far sooner than the 60 s drain deadline.
        assert await asyncio.wait_for(proc.wait(), 20) == 0
        # The attempt was cancelled and its lease handed back: another worker takes it now,
        # not after the lease would have expired.
        row = await conn.fetchrow("SELECT state, lease_until FROM delivery.deliveries")
        assert row["state"] == "pending" and row["lease_until"] is None
    await conn.close()
