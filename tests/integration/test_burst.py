"""Burst mode: ``run_process(..., until_idle=True)`` runs until no work is left, then drains and
returns, so a test can publish, run, and assert exactly what arrived without waiting for it.
The rule (``delivery.worker.burst``): nothing to publish, nothing queued or held, every
published event in the inbox, no delivery leased or due before the deadline; a retry due
within the deadline is waited for, a later one left pending; an open circuit's deliveries wait
for their probe, not for the burst; work left at the deadline is an error after the drain."""

from __future__ import annotations

import asyncio

import asyncpg
import pytest

from delivery import publish, publish_many
from delivery.broker.depths import queue_depths
from delivery.broker.topology import Names
from delivery.store import subscriptions
from delivery.testing.factories import add_subscription, balance, trade
from delivery.testing.receiver import Behaviour, Receiver
from tests.support import run_until_idle

pytestmark = pytest.mark.integration


async def test_a_burst_returns_once_every_event_is_delivered_and_nothing_is_left(settings):
    conn = await asyncpg.connect(settings.database_url)
    async with Receiver() as receiver:
        await add_subscription(conn, receiver, "/trades", patterns="trade.*")
        await add_subscription(conn, receiver, "/all", patterns="*")
        trades = [trade(i, account=f"acc_{i % 3}", id=f"evt_t{i}") for i in range(20)]
        balances = [balance(i, id=f"evt_b{i}") for i in range(10)]
        await publish_many(conn, trades + balances)
        # When the platform runs until idle (no wait of our own afterwards)
        await run_until_idle(settings)
        # Then everything has arrived, once, and nothing is left anywhere
        assert receiver.unique_ids("/trades") == {e["id"] for e in trades}
        assert receiver.unique_ids("/all") == {e["id"] for e in trades + balances}
        assert receiver.duplicates("/trades") == receiver.duplicates("/all") == {}
        assert all(a.signature_ok for a in receiver.arrivals)
    states = await conn.fetch("SELECT state, count(*) FROM delivery.deliveries GROUP BY 1")
    assert {r["state"]: r["count"] for r in states} == {"delivered": 50}
    assert (
        await conn.fetchval("SELECT count(*) FROM delivery.outbox WHERE published_at IS NULL") == 0
    )
    names = Names(settings.amqp_prefix)
    assert await queue_depths(settings.amqp_url, names) == {
        names.dispatch_queue: 0,
        names.dead_queue: 0,
    }
    await conn.close()


async def test_a_burst_waits_for_a_retry_due_before_its_deadline(settings):
    settings = settings.model_copy(update={"retry_schedule_s": (1.0, 1.0)})
    conn = await asyncpg.connect(settings.database_url)
    async with Receiver() as receiver:
        receiver.set_behaviour("/h", Behaviour(status=503))
        await subscriptions.add(conn, url=receiver.url("/h"), patterns="*")
        await publish(conn, trade(1, id="evt_retried"))
        burst = asyncio.create_task(run_until_idle(settings, timeout_s=60))
        await receiver.wait_for(lambda r: len(r.arrivals) == 1, timeout_s=30, what="the 503")
        receiver.set_behaviour("/h", Behaviour())  # the retry, about a second later, succeeds
        await asyncio.wait_for(burst, 90)
        first, second = receiver.arrivals
        assert (first.status, second.status) == (503, 200)
        assert second.arrived_at - first.arrived_at >= 0.75  # the retry's time, less its jitter
    assert await conn.fetchval("SELECT state FROM delivery.deliveries") == "delivered"
    await conn.close()


async def test_a_retry_due_after_the_deadline_is_left_pending(settings):
    settings = settings.model_copy(update={"retry_schedule_s": (600.0,)})
    conn = await asyncpg.connect(settings.database_url)
    async with Receiver() as receiver:
        receiver.set_behaviour("/h", Behaviour(status=503))
        await subscriptions.add(conn, url=receiver.url("/h"), patterns="*")
        await publish(conn, trade(1, id="evt_later"))
        await run_until_idle(settings, timeout_s=60)  # returns, without TimeoutError
        assert [a.status for a in receiver.arrivals] == [503]
    row = await conn.fetchrow(
        "SELECT state, attempts, lease_until,"
        " next_attempt_at > clock_timestamp() + interval '400 seconds' AS later"
        " FROM delivery.deliveries"
    )
    assert dict(row) == {"state": "pending", "attempts": 1, "lease_until": None, "later": True}
    await conn.close()


async def test_a_burst_does_not_wait_for_the_probe_of_an_open_circuit(settings):
    # The retry would be due at once, but the first failure opens the circuit for a minute.
    settings = settings.model_copy(
        update={
            "retry_schedule_s": (0.2, 0.2),
            "circuit_failure_threshold": 1,
            "circuit_cooldown_s": 60.0,
        }
    )
    conn = await asyncpg.connect(settings.database_url)
    async with Receiver() as receiver:
        receiver.set_behaviour("/down", Behaviour(status=503))
        await subscriptions.add(conn, url=receiver.url("/down"), patterns="*")
        await publish(conn, trade(1, id="evt_behind_open_circuit"))
        await run_until_idle(settings, timeout_s=30)
        assert [a.status for a in receiver.arrivals] == [503]
    assert await conn.fetchval("SELECT circuit_state FROM delivery.subscriptions") == "open"
    assert await conn.fetchval("SELECT state FROM delivery.deliveries") == "pending"
    await conn.close()


async def test_a_burst_waits_for_the_probe_of_an_open_circuit_while_it_is_in_flight(settings):
    # Taking the probe moves the circuit's retry time a minute on: only the probe's lease says
    # that work is in flight. A drain this short would cut the probe, had the burst ended.
    settings = settings.model_copy(update={"circuit_cooldown_s": 60.0, "shutdown_timeout_s": 0.1})
    conn = await asyncpg.connect(settings.database_url)
    async with Receiver() as receiver:
        receiver.set_behaviour("/slow", Behaviour(delay_s=1.0))
        sub = await subscriptions.add(conn, url=receiver.url("/slow"), patterns="*")
        await publish(conn, trade(1, id="evt_probe"))
        await conn.execute(
            "INSERT INTO delivery.deliveries (event_id, subscription_id) VALUES ('evt_probe', $1)",
            sub.id,
        )
        # (dispatched long ago)
        await conn.execute("UPDATE delivery.outbox SET published_at = clock_timestamp()")
        await conn.execute("INSERT INTO delivery.inbox (event_id) VALUES ('evt_probe')")
        # Given the circuit is open and its cooldown is over
        await conn.execute(
            "UPDATE delivery.subscriptions SET circuit_state = 'open', consecutive_failures = 5,"
            " circuit_retry_at = clock_timestamp() - interval '1 second'"
        )
        await run_until_idle(settings, timeout_s=30)
        assert [a.status for a in receiver.arrivals] == [200]
    assert await conn.fetchval("SELECT state FROM delivery.deliveries") == "delivered"
    assert await conn.fetchval("SELECT circuit_state FROM delivery.subscriptions") == "closed"
    await conn.close()


async def test_a_burst_with_work_left_at_its_deadline_drains_and_says_what_was_left(settings):
    settings = settings.model_copy(
        update={"http_timeout_s": 30.0, "delivery_lease_s": 60.0, "shutdown_timeout_s": 0.5}
    )
    conn = await asyncpg.connect(settings.database_url)
    async with Receiver() as receiver:
        receiver.set_behaviour("/hang", Behaviour(hang=True))
        await subscriptions.add(conn, url=receiver.url("/hang"), patterns="*")
        await publish(conn, trade(1, id="evt_hanging"))
        # A deadline long enough for relay, dispatch and the first attempt on a loaded machine;
        # the attempt then hangs past it.
        with pytest.raises(TimeoutError, match=r"after 10 s: 1 deliveries"):
            await run_until_idle(settings, timeout_s=10)
        assert len(receiver.arrivals) == 1
    # The attempt in flight was cancelled at the drain deadline and handed back.
    row = await conn.fetchrow("SELECT state, lease_until FROM delivery.deliveries")
    assert dict(row) == {"state": "pending", "lease_until": None}
    await conn.close()


async def test_a_relay_only_burst_ends_once_every_row_is_published(settings):
    conn = await asyncpg.connect(settings.database_url)
    await publish_many(conn, [trade(i, id=f"evt_{i}") for i in range(10)])
    await run_until_idle(settings, worker=False)
    assert (
        await conn.fetchval("SELECT count(*) FROM delivery.outbox WHERE published_at IS NULL") == 0
    )
    names = Names(settings.amqp_prefix)
    depths = await queue_depths(settings.amqp_url, names)
    assert depths[names.dispatch_queue]  # every row is in the queue (packed), none dispatched
    assert await conn.fetchval("SELECT count(*) FROM delivery.inbox") == 0
    await conn.close()
