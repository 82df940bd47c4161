"""Failures are normal: retries with backoff, dead letters and replay, 410, isolation of a
hanging subscriber, poison messages, the circuit breaker. All on the real services, against a
controllable receiver."""

from __future__ import annotations

import collections
import itertools

import aio_pika
import asyncpg
import pytest

from delivery import publish_many
from delivery.broker.relay import _CLAIM as _RELAY_CLAIM
from delivery.broker.topology import Names, declare
from delivery.broker.wire import pack_rows
from delivery.store import dead_letters as dlq
from delivery.store import subscriptions
from delivery.testing.factories import balance, trade
from delivery.testing.receiver import Behaviour, Receiver
from delivery.testing.waits import wait_until
from tests.support import run_until_idle, running, start_worker, stop_gracefully

pytestmark = pytest.mark.integration


async def test_half_failing_subscriber_gets_everything_and_attempts_match_failures(settings):
    settings = settings.model_copy(
        update={
            "retry_schedule_s": (0.05, 0.1, 0.1, 0.1, 0.1, 0.1, 0.1, 0.1, 0.1, 0.1),
            "circuit_failure_threshold": 1000,
        }
    )
    conn = await asyncpg.connect(settings.database_url)
    async with Receiver() as receiver:
        receiver.set_behaviour("/flaky", Behaviour(fail_rate=0.5, fail_status=500, seed=11))
        await subscriptions.add(conn, url=receiver.url("/flaky"), patterns="*")
        events = [balance(i, account=f"acc_{i % 5}", id=f"evt_{i:04d}") for i in range(200)]
        await publish_many(conn, events)
        async with running(settings):
            await receiver.wait_for(
                lambda r: len(r.unique_ids("/flaky")) == 200, timeout_s=90, what="all 200"
            )
            await wait_until(
                lambda: conn.fetchval(
                    "SELECT count(*) = 200 FROM delivery.deliveries WHERE state = 'delivered'"
                ),
                timeout_s=30,
                what="all recorded",
            )
        failures = sum(1 for a in receiver.arrivals if a.status == 500)
        assert failures > 50  # the receiver really failed about half
        recorded = await conn.fetchrow(
            "SELECT count(*) FILTER (WHERE outcome = 'retry') AS retries, count(*) AS total FROM delivery.attempts"
        )
        assert recorded["retries"] == failures
        assert recorded["total"] == len(receiver.arrivals)
        assert await conn.fetchval("SELECT sum(attempts) FROM delivery.deliveries") == len(
            receiver.arrivals
        )
    await conn.close()


async def test_400_goes_to_dead_letters_then_replay_delivers_with_same_webhook_id(settings):
    conn = await asyncpg.connect(settings.database_url)
    async with Receiver() as receiver:
        receiver.set_behaviour("/strict", Behaviour(status=400))
        sub = await subscriptions.add(conn, url=receiver.url("/strict"), patterns="*")
        await publish_many(conn, [trade(1, id="evt_refused")])
        async with running(settings):
            await wait_until(
                lambda: conn.fetchval("SELECT state = 'dead' FROM delivery.deliveries"),
                timeout_s=30,
                what="the dead letter",
            )
            (dead,) = await dlq.list_dead(conn)
            assert dead.reason == "HTTP 400: not retryable"
            assert dead.attempts == 1 and dead.last_status == 400
            assert len(receiver.arrivals) == 1  # no retry of a permanent failure

            receiver.set_behaviour("/strict", Behaviour(status=200))
            pool = await asyncpg.create_pool(settings.database_url, min_size=1, max_size=2)
            replayed, skipped = await dlq.replay(pool, dlq.Selector(subscription_id=sub.id))
            await pool.close()
            assert (replayed, skipped) == (1, 0)
            await receiver.wait_for(lambda r: len(r.delivered()) == 1, timeout_s=30, what="replay")
        first, second = receiver.arrivals
        assert first.webhook_id == second.webhook_id == "evt_refused"
        assert first.body == second.body
    await conn.close()


async def test_410_disables_the_subscription_and_keeps_its_events(settings):
    conn = await asyncpg.connect(settings.database_url)
    async with Receiver() as receiver:
        receiver.set_behaviour("/gone", Behaviour(status=410))
        gone = await subscriptions.add(conn, url=receiver.url("/gone"), patterns="*")
        ok = await subscriptions.add(conn, url=receiver.url("/ok"), patterns="*")
        async with running(settings):
            await publish_many(conn, [trade(1, id="evt_1")])
            await wait_until(
                lambda: conn.fetchval(
                    "SELECT state = 'disabled' FROM delivery.subscriptions WHERE id = $1", gone.id
                ),
                timeout_s=30,
                what="the subscription disabled",
            )
            await publish_many(conn, [trade(2, id="evt_2")])
            await receiver.wait_for(
                lambda r: r.unique_ids("/ok") == {"evt_1", "evt_2"},
                timeout_s=30,
                what="healthy one",
            )
            await wait_until(
                lambda: conn.fetchval(
                    "SELECT count(*) = 2 FROM delivery.deliveries WHERE subscription_id = $1 AND state = 'dead'",
                    gone.id,
                ),
                timeout_s=30,
                what="both events kept as dead letters",
            )
            # Only the first event was ever sent to the gone endpoint.
            assert [a.webhook_id for a in receiver.arrivals if a.path == "/gone"] == ["evt_1"]
            # Operator: the subscriber fixed its endpoint.
            receiver.set_behaviour("/gone", Behaviour(status=200))
            await subscriptions.set_state(conn, gone.id, "active")
            pool = await asyncpg.create_pool(settings.database_url, min_size=1, max_size=2)
            assert (await dlq.replay(pool, dlq.Selector(subscription_id=gone.id)))[0] == 2
            await pool.close()
            await receiver.wait_for(
                lambda r: r.unique_ids("/gone") == {"evt_1", "evt_2"}, timeout_s=30, what="replayed"
            )
        dead = await conn.fetchval(
            "SELECT dead_reason FROM delivery.deliveries WHERE subscription_id = $1 AND state = 'dead' LIMIT 1",
            ok.id,
        )
        assert dead is None
    await conn.close()


async def test_a_hanging_subscriber_does_not_delay_a_healthy_one(settings):
    settings = settings.model_copy(
        update={"http_timeout_s": 30, "per_subscription_max_in_flight": 4, "max_in_flight": 32}
    )
    conn = await asyncpg.connect(settings.database_url)
    async with Receiver() as receiver:
        receiver.set_behaviour("/hang", Behaviour(hang=True))
        await subscriptions.add(conn, url=receiver.url("/hang"), patterns="*")
        await subscriptions.add(conn, url=receiver.url("/healthy"), patterns="*")
        events = [trade(i, account=f"acc_{i % 4}", id=f"evt_{i:03d}") for i in range(300)]
        async with running(settings):
            await publish_many(conn, events)
            await receiver.wait_for(
                lambda r: len(r.unique_ids("/healthy")) == 300, timeout_s=60, what="healthy ones"
            )
            hanging = sum(1 for a in receiver.arrivals if a.path == "/hang")
            # Not one attempt of the hanging subscriber has ended (each waits its 30 s timeout):
            # the healthy one was never queued behind it, however slow the machine is.
            ended = await conn.fetchval(
                "SELECT count(*) FROM delivery.attempts a JOIN delivery.deliveries d"
                " ON d.id = a.delivery_id JOIN delivery.subscriptions s"
                " ON s.id = d.subscription_id WHERE s.url = $1",
                receiver.url("/hang"),
            )
        # The hanging subscriber holds at most its own share of slots, never more.
        assert hanging <= 4
        assert ended == 0
    await conn.close()


async def test_poison_message_is_dead_lettered_and_the_queue_keeps_flowing(settings):
    conn = await asyncpg.connect(settings.database_url)
    async with Receiver() as receiver:
        await subscriptions.add(conn, url=receiver.url("/h"), patterns="*")
        async with running(settings):
            connection = await aio_pika.connect(settings.amqp_url)
            channel = await connection.channel()
            topology = await declare(channel, Names(settings.amqp_prefix), delivery_limit=20)
            await topology.events.publish(
                # Declared as the relay's format, so that its body is what is judged (a
                # message with no content type is refused before that: test_forged_messages).
                aio_pika.Message(
                    b"{this is not an envelope",
                    message_id="poison-1",
                    content_type="application/json",
                ),
                routing_key="trade.executed",
            )
            await publish_many(conn, [trade(1, id="evt_after_poison")])
            await receiver.wait_for(
                lambda r: "evt_after_poison" in r.unique_ids(), timeout_s=30, what="flow"
            )
            await wait_until(
                lambda: conn.fetchval("SELECT count(*) = 1 FROM delivery.poison_messages"),
                timeout_s=30,
                what="the poison message recorded",
            )
            await connection.close()
        row = await conn.fetchrow("SELECT message_id, reason, body FROM delivery.poison_messages")
        assert row["message_id"] == "poison-1"
        assert row["reason"].startswith("unprocessable: body is not JSON")
        assert row["body"] == b"{this is not an envelope"
    await conn.close()


async def test_circuit_opens_after_consecutive_failures_and_a_probe_closes_it(settings):
    settings = settings.model_copy(
        update={
            "circuit_failure_threshold": 3,
            "circuit_cooldown_s": 1.0,
            "retry_schedule_s": (0.05,) * 20,
            "per_subscription_max_in_flight": 1,
        }
    )
    conn = await asyncpg.connect(settings.database_url)
    async with Receiver() as receiver:
        receiver.set_behaviour("/down", Behaviour(status=503))
        sub = await subscriptions.add(conn, url=receiver.url("/down"), patterns="*")
        async with running(settings):
            await publish_many(conn, [trade(i, id=f"evt_{i}") for i in range(5)])
            await wait_until(
                lambda: conn.fetchval("SELECT circuit_state = 'open' FROM delivery.subscriptions"),
                timeout_s=30,
                what="the circuit to open",
            )
            opened_with = len(receiver.arrivals)
            # While open, only probes go out: about one per cooldown, not one per retry step.
            await wait_until(
                lambda: len(receiver.arrivals) >= opened_with + 2, timeout_s=30, what="two probes"
            )
            probe_times = [a.arrived_at for a in receiver.arrivals[opened_with:]]
            assert all(b - a >= 0.8 for a, b in itertools.pairwise(probe_times))
            receiver.set_behaviour("/down", Behaviour(status=200))
            await receiver.wait_for(
                lambda r: len(r.unique_ids("/down")) == 5, timeout_s=60, what="all after recovery"
            )
            await wait_until(
                lambda: conn.fetchval(
                    "SELECT circuit_state = 'closed' FROM delivery.subscriptions WHERE id = $1",
                    sub.id,
                ),
                timeout_s=30,
                what="the circuit to close",
            )
        counts = collections.Counter(a.webhook_id for a in receiver.delivered())
        assert set(counts) == {f"evt_{i}" for i in range(5)}
        # Attempts were not burned while the circuit was open: far fewer than the schedule allows.
        assert await conn.fetchval("SELECT max(attempts) FROM delivery.deliveries") < 10
    await conn.close()


async def test_sigterm_under_load_hands_back_and_restart_delivers_everything(settings):
    """Drain: stop consuming, let in-flight finish (or hand back), exit 0; after a restart every
    event is delivered (again with the same webhook-id where a crash window allowed)."""
    settings = settings.model_copy(update={"shutdown_timeout_s": 2.0})
    conn = await asyncpg.connect(settings.database_url)
    async with Receiver() as receiver:
        receiver.set_behaviour("/slow", Behaviour(delay_s=0.05))
        await subscriptions.add(conn, url=receiver.url("/slow"), patterns="*")
        await publish_many(
            conn, [balance(i, account=f"acc_{i % 9}", id=f"evt_{i:04d}") for i in range(1500)]
        )
        first = await start_worker(settings, command="run")
        await receiver.wait_for(lambda r: len(r.delivered()) >= 100, timeout_s=60, what="load")
        assert await stop_gracefully(first, timeout_s=30) == 0
        # Whatever was in flight or queued at the deadline went back to PostgreSQL at once
        # (no lease left to expire), so the restart takes it without waiting.
        leased = await conn.fetchval(
            "SELECT count(*) FROM delivery.deliveries"
            " WHERE state = 'pending' AND lease_until > clock_timestamp()"
        )
        assert leased == 0
        partial = len(receiver.unique_ids())
        assert partial < 1500  # it really was stopped mid-flight
        second = await start_worker(settings, command="run")
        await receiver.wait_for(
            lambda r: len(r.unique_ids()) == 1500, timeout_s=120, what="everything"
        )
        assert await stop_gracefully(second) == 0
        by_id = collections.defaultdict(set)
        for arrival in receiver.delivered():
            by_id[arrival.webhook_id].add(arrival.body)
        assert all(len(bodies) == 1 for bodies in by_id.values())  # duplicates are identical
    await conn.close()


async def test_events_lost_by_the_broker_after_their_confirm_are_redriven(settings):
    """An operator deletes the dispatch queue with events in it: they were confirmed (and
    marked published), so only the outbox still has them. The relay notices the queue is gone,
    declares it again, and republishes every published event no worker ever dispatched."""
    import aio_pika as _aio_pika

    settings = settings.model_copy(update={"redrive_after_s": 0.5})
    conn = await asyncpg.connect(settings.database_url)
    async with Receiver() as receiver:
        await subscriptions.add(conn, url=receiver.url("/h"), patterns="*")
        await publish_many(conn, [trade(i, id=f"evt_{i}") for i in range(20)])
        # Relay only: the events reach the queue and are marked published.
        await run_until_idle(settings, worker=False)
        connection = await _aio_pika.connect(settings.amqp_url)
        channel = await connection.channel()
        await channel.queue_delete(Names(settings.amqp_prefix).dispatch_queue)
        await connection.close()
        # Until no work is left: published events that never reached the inbox are work (the
        # relay's sweep owes them a redrive)
        await run_until_idle(settings, timeout_s=90)
        assert len(receiver.unique_ids()) == 20
        assert receiver.duplicates() == {}
        assert await conn.fetchval("SELECT min(redrives) FROM delivery.outbox") == 1
        # Each redrive is logged: by the relay's sweep, with the publish it gave up for lost
        log = await conn.fetch(
            "SELECT e->>'by' AS by, (e->>'published_at')::timestamptz < (e->>'at')::timestamptz"
            " AS ordered FROM delivery.outbox, jsonb_array_elements(redrive_log) e"
        )
        assert [tuple(r) for r in log] == [("sweep", True)] * 20
    await conn.close()


async def test_a_subscriber_gets_no_more_requests_than_its_slots_while_more_work_waits(settings):
    settings = settings.model_copy(
        update={
            "per_subscription_max_in_flight": 3,
            "per_subscription_max_queued": 9,
            "max_in_flight": 64,
        }
    )
    conn = await asyncpg.connect(settings.database_url)
    async with Receiver() as receiver:
        receiver.set_behaviour("/slow", Behaviour(delay_s=0.05))
        await subscriptions.add(conn, url=receiver.url("/slow"), patterns="*")
        events = [trade(i, account=f"acc_{i % 4}", id=f"evt_{i:03d}") for i in range(120)]
        await publish_many(conn, events)
        await run_until_idle(settings)
        assert receiver.unique_count("/slow") == 120
        assert receiver.duplicates() == {}
        # The process held up to 12 of this subscriber's deliveries, but only 3 went out at once.
        assert receiver.max_concurrent("/slow") == 3
    await conn.close()


async def test_a_lease_is_renewed_while_the_outcome_commit_waits_so_nobody_posts_twice(settings):
    settings = settings.model_copy(
        update={"delivery_lease_s": 2.0, "http_timeout_s": 0.2, "scheduler_poll_interval_s": 0.1}
    )
    conn = await asyncpg.connect(settings.database_url)
    blocker = await asyncpg.connect(settings.database_url)
    async with Receiver() as receiver:
        await subscriptions.add(conn, url=receiver.url("/ok"), patterns="*")
        async with running(settings):
            # Given the outcome's commit cannot go through (its INSERT into attempts waits)
            lock = blocker.transaction()
            await lock.start()
            await blocker.execute("LOCK TABLE delivery.attempts IN EXCLUSIVE MODE")
            await publish_many(conn, [trade(1, id="evt_slow_commit")])
            await receiver.wait_for(lambda r: len(r.arrivals) == 1, timeout_s=30, what="a POST")
            first = await conn.fetchval("SELECT lease_until FROM delivery.deliveries")
            # When it waits for twice the lease, then the lease keeps moving forward
            await wait_until(
                lambda: conn.fetchval(
                    "SELECT lease_until > $1::timestamptz + interval '4 seconds' FROM delivery.deliveries",
                    first,
                ),
                timeout_s=30,
                what="the lease renewed past twice its length",
            )
            # And nobody attempted the delivery again meanwhile
            assert len(receiver.arrivals) == 1
            await lock.rollback()
            await wait_until(
                lambda: conn.fetchval("SELECT state = 'delivered' FROM delivery.deliveries"),
                timeout_s=30,
                what="the outcome recorded",
            )
        assert len(receiver.arrivals) == 1
    await blocker.close()
    await conn.close()


async def test_a_pack_dead_lettered_past_the_delivery_limit_is_redriven_event_by_event(settings):
    """Connection flaps can push a healthy pack past x-delivery-limit: its events go back
    through the outbox, each in a message of its own, and are delivered; an event of the pack
    that had been dispatched already is not sent again; nothing is parked as poison."""
    settings = settings.model_copy(update={"amqp_delivery_limit": 1})
    conn = await asyncpg.connect(settings.database_url)
    async with Receiver() as receiver:
        await subscriptions.add(conn, url=receiver.url("/h"), patterns="*")
        ids = [f"evt_pack_{i}" for i in range(5)]
        # Given the first event dispatched and delivered already
        await publish_many(conn, [trade(0, id=ids[0])])
        await run_until_idle(settings)
        assert receiver.unique_ids() == {ids[0]}
        await publish_many(conn, [trade(i, id=ids[i]) for i in range(1, 5)])
        # and a pack of all five, confirmed (rows marked published), then returned to the
        # queue until the broker dead-letters it
        rows = await conn.fetch(_RELAY_CLAIM.replace("WHERE published_at IS NULL", ""), 100)
        (pack,) = pack_rows(rows, per_message=50)
        assert pack.pks == [r["pk"] for r in rows] and len(rows) == 5
        await conn.execute("UPDATE delivery.outbox SET published_at = clock_timestamp()")
        connection = await aio_pika.connect(settings.amqp_url)
        channel = await connection.channel()
        topology = await declare(channel, Names(settings.amqp_prefix), delivery_limit=1)
        await topology.events.publish(pack.message, routing_key=pack.routing_key)
        for _ in range(10):
            message = await topology.dispatch.get(timeout=5, fail=False)
            if message is None:
                break
            await message.nack(requeue=True)
        assert await topology.dispatch.get(timeout=5, fail=False) is None
        await connection.close()
        # When the platform runs until no work is left, then every event is delivered once
        # (the one dispatched before, too) and nothing is poison
        await run_until_idle(settings)
        assert receiver.unique_ids() == set(ids)
        assert receiver.duplicates() == {}
        assert await conn.fetchval("SELECT count(*) FROM delivery.poison_messages") == 0
        redrives = dict(await conn.fetch("SELECT event_id, redrives FROM delivery.outbox"))
        assert redrives == {ids[0]: 0} | {i: 1 for i in ids[1:]}
        by = dict(
            await conn.fetch(
                "SELECT event_id, redrive_log->0->>'by' FROM delivery.outbox"
                " WHERE redrive_log IS NOT NULL"
            )
        )
        assert by == {i: "poison" for i in ids[1:]}  # the dead-letter recorder's, not the sweep's
    await conn.close()
