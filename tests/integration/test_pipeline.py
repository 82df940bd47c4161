"""The happy path end to end on the real services: outbox -> relay -> RabbitMQ -> dispatch ->
signed webhook, and the idempotency promises around it."""

from __future__ import annotations

import asyncio
import collections

import aio_pika
import asyncpg
import orjson
import pytest

from delivery import publish, publish_many
from delivery.broker import relay as relay_module
from delivery.broker.relay import Relay
from delivery.broker.topology import Names, declare
from delivery.broker.wire import decode, pack_rows
from delivery.ops.health import Health
from delivery.store import subscriptions
from delivery.store.pool import create_pool
from delivery.testing.factories import add_subscription, balance, trade
from delivery.testing.metrics import counter_value
from delivery.testing.receiver import Receiver
from delivery.testing.waits import wait_until
from tests.support import hand_driven_dispatcher, run_until_idle, running

pytestmark = pytest.mark.integration


async def test_committed_event_reaches_each_matching_subscription_once_and_no_other(settings):
    conn = await asyncpg.connect(settings.database_url)
    async with Receiver() as receiver:
        await add_subscription(conn, receiver, "/trades", patterns="trade.*")
        await add_subscription(conn, receiver, "/all", patterns="*")
        await add_subscription(conn, receiver, "/acc2", patterns="*", account_id="acc_2")
        await add_subscription(conn, receiver, "/closed", patterns="account.closed")
        async with conn.transaction():
            result = await publish_many(conn, [trade(1, id="evt_a"), balance(2, id="evt_b")])
        assert result.as_dict() == {"published": 2, "duplicates": 0}
        # Until no work is left: whatever arrived by then is all that ever will.
        await run_until_idle(settings)
        assert collections.Counter((a.path, a.webhook_id) for a in receiver.arrivals) == {
            ("/trades", "evt_a"): 1,
            ("/all", "evt_a"): 1,
            ("/all", "evt_b"): 1,
        }
        assert all(a.signature_ok for a in receiver.arrivals)
        body = orjson.loads(
            next(a.body for a in receiver.delivered("/all") if a.webhook_id == "evt_a")
        )
        assert body["id"] == "evt_a" and body["sequence"] == 1 and body["account_id"] == "acc_1"
        assert body["data"]["price"] == "64000.50"
        assert set(body) == {"id", "type", "account_id", "sequence", "occurred_at", "data"}
    await conn.close()


async def test_rolled_back_event_is_never_delivered(settings):
    conn = await asyncpg.connect(settings.database_url)
    async with Receiver() as receiver:
        await add_subscription(conn, receiver, "/all", patterns="*")
        async with running(settings):
            with pytest.raises(RuntimeError):
                async with conn.transaction():
                    await publish(conn, trade(1, id="evt_rolled_back"))
                    raise RuntimeError("producer's business logic failed")
            await publish(conn, trade(2, id="evt_committed"))
            await receiver.wait_for(
                lambda r: "evt_committed" in r.unique_ids(), timeout_s=30, what="committed event"
            )
        assert receiver.unique_ids() == {"evt_committed"}
        assert await conn.fetchval("SELECT count(*) FROM delivery.outbox") == 1
        # The rolled-back event consumed no sequence number either.
        assert await conn.fetchval("SELECT sequence FROM delivery.outbox") == 1
    await conn.close()


async def test_duplicate_id_is_reported_and_delivered_once(settings):
    conn = await asyncpg.connect(settings.database_url)
    async with Receiver() as receiver:
        await add_subscription(conn, receiver, "/all", patterns="*")
        first = await publish(conn, balance(1, id="evt_dup"))
        again = await publish_many(conn, [balance(1, id="evt_dup"), balance(2, id="evt_other")])
        assert first.as_dict() == {"published": 1, "duplicates": 0}
        assert again.duplicates == ["evt_dup"] and again.published == ["evt_other"]
        async with running(settings):
            await receiver.wait_for(
                lambda r: r.unique_ids() == {"evt_dup", "evt_other"}, timeout_s=30, what="both"
            )
        assert [a.webhook_id for a in receiver.delivered()].count("evt_dup") == 1
    await conn.close()


async def test_sequences_are_per_account_and_gapless(settings):
    conn = await asyncpg.connect(settings.database_url)
    events = [trade(i, account=f"acc_{i % 3}") for i in range(30)]
    await publish_many(conn, events[:10])
    async with conn.transaction():
        await publish_many(conn, events[10:20])
    with pytest.raises(RuntimeError):
        async with conn.transaction():
            await publish_many(conn, [trade(99, account="acc_0")])
            raise RuntimeError
    # Concurrent producers on the same accounts serialise on the counter row.
    others = [await asyncpg.connect(settings.database_url) for _ in range(5)]

    async def produce(c: asyncpg.Connection, batch: list[dict[str, object]]) -> None:
        for event in batch:
            await publish_many(c, [event])

    await asyncio.gather(
        *(produce(c, events[20 + 2 * k : 22 + 2 * k]) for k, c in enumerate(others))
    )
    rows = await conn.fetch(
        "SELECT account_id, array_agg(sequence ORDER BY sequence) s FROM delivery.outbox GROUP BY 1"
    )
    for row in rows:
        assert row["s"] == list(range(1, len(row["s"]) + 1)), row
    assert sum(len(r["s"]) for r in rows) == 30
    for c in others:
        await c.close()
    await conn.close()


async def test_producers_racing_on_the_same_ids_leave_no_gap(settings):
    # Eight producers publish the same event, one statement each, at once: each id is inserted
    # by exactly one of them, and a loser that had counted a sequence for it rolls back (the
    # function fails with serialization_failure and the producer runs it again).
    conns = [await asyncpg.connect(settings.database_url) for _ in range(8)]
    events = [trade(i, account=f"acc_{i % 2}", id=f"evt_race_{i}") for i in range(40)]
    published: collections.Counter[str] = collections.Counter()
    for event in events:  # in lockstep, so that they race on every event
        for result in await asyncio.gather(*(publish(c, event) for c in conns)):
            published.update(result.published)
    assert published == collections.Counter({e["id"]: 1 for e in events})
    rows = await conns[0].fetch(
        "SELECT account_id, array_agg(sequence ORDER BY sequence) s FROM delivery.outbox GROUP BY 1"
    )
    assert {r["account_id"]: r["s"] for r in rows} == {
        "acc_0": list(range(1, 21)),
        "acc_1": list(range(1, 21)),
    }
    # The function's plan setting does not leak into the producer's session.
    assert await conns[0].fetchval("SHOW plan_cache_mode") == "auto"
    for c in conns:
        await c.close()


async def test_the_platform_never_jit_compiles(settings):
    # A claim against a 1,000,000-row table spent 400-600 ms in JIT compiling per 2 ms query.
    pool = await create_pool(settings.database_url, min_size=1, max_size=1)
    assert await pool.fetchval("SHOW jit") == "off"
    await pool.close()
    conn = await asyncpg.connect(settings.database_url)
    # Every signature (the tenant's, and the previous release's kept for `default`).
    assert await conn.fetchval(
        "SELECT bool_and(coalesce('jit=off' = ANY(proconfig), false)) AND count(*) = 2"
        " FROM pg_proc WHERE proname = 'publish_events'"
    )
    await conn.close()


async def test_a_large_batch_publishes_in_order(settings):
    # Past the function's small-batch size it plans for the real row count.
    conn = await asyncpg.connect(settings.database_url)
    events = [trade(i, account=f"acc_{i % 300}", id=f"evt_big_{i}") for i in range(3000)]
    result = await publish_many(conn, events)
    assert len(result.published) == 3000 and not result.duplicates
    rows = await conn.fetch(
        "SELECT account_id, array_agg(event_id ORDER BY sequence) ids FROM delivery.outbox"
        " GROUP BY 1"
    )
    assert len(rows) == 300
    for row in rows:
        k = int(row["account_id"].removeprefix("acc_"))
        assert row["ids"] == [f"evt_big_{i}" for i in range(k, 3000, 300)]
    await conn.close()


async def test_two_relays_at_once_publish_every_row(settings):
    conn = await asyncpg.connect(settings.database_url)
    ids = [f"evt_{i:05d}" for i in range(2000)]
    await publish_many(conn, [balance(i, account=f"acc_{i % 7}", id=ids[i]) for i in range(2000)])
    pool = await asyncpg.create_pool(settings.database_url, min_size=2, max_size=4)
    small = settings.model_copy(update={"relay_batch_size": 50})
    # A consumer that records what reached the broker.
    connection = await aio_pika.connect(settings.amqp_url)
    channel = await connection.channel()
    topology = await declare(channel, Names(settings.amqp_prefix), delivery_limit=20)
    seen: collections.Counter[str] = collections.Counter()

    async def on_message(message: aio_pika.abc.AbstractIncomingMessage) -> None:
        for event in decode(message):  # one event, or a pack of them
            seen[event.facts.id] += 1
        await message.ack()

    await topology.dispatch.consume(on_message)
    stop = asyncio.Event()
    relays = [Relay(small, pool, Health()), Relay(small, pool, Health())]
    async with asyncio.TaskGroup() as tg:
        for relay in relays:
            tg.create_task(relay.run(stop))
        await wait_until(lambda: len(seen) == 2000, timeout_s=60, what="2000 events at the broker")
        stop.set()
    assert set(seen) == set(ids)
    assert (
        await conn.fetchval("SELECT count(*) FROM delivery.outbox WHERE published_at IS NULL") == 0
    )
    await connection.close()
    await pool.close()
    await conn.close()


async def test_unroutable_publish_is_an_error_and_the_row_stays(settings):
    """``mandatory``: with the queue binding gone, the broker returns the message; the relay
    must not count the confirm as success."""
    conn = await asyncpg.connect(settings.database_url)
    pool = await asyncpg.create_pool(settings.database_url, min_size=1, max_size=2)
    names = Names(settings.amqp_prefix)
    connection = await aio_pika.connect(settings.amqp_url)
    channel = await connection.channel()
    topology = await declare(channel, names, delivery_limit=20)
    health = Health()
    relay = Relay(settings, pool, health)
    stop = asyncio.Event()
    returned_before = counter_value("delivery_relay_publish_failures_total", reason="returned")
    async with asyncio.TaskGroup() as tg:
        tg.create_task(relay.run(stop))
        await wait_until(lambda: health.ready, timeout_s=30, what="relay ready")
        # The route disappears at run time (an operator deleted the binding).
        await topology.dispatch.unbind(topology.events, routing_key="#")
        await publish(conn, trade(1, id="evt_unroutable"))
        await wait_until(
            lambda: (
                counter_value("delivery_relay_publish_failures_total", reason="returned")
                > returned_before
            ),
            timeout_s=30,
            what="a returned publish",
        )
        assert await conn.fetchval("SELECT published_at FROM delivery.outbox") is None
        await topology.dispatch.bind(topology.events, routing_key="#")
        await wait_until(
            lambda: conn.fetchval("SELECT published_at IS NOT NULL FROM delivery.outbox"),
            timeout_s=30,
            what="published after the binding returns",
        )
        stop.set()
    await connection.close()
    await pool.close()
    await conn.close()


async def test_a_dispatch_cancelled_mid_batch_gives_its_capacity_back(settings):
    # The supervisor restarts dispatch when its AMQP connection dies, cancelling the batch in
    # flight. Its reservations of the deliverer's capacity must come back: chaos's "everything"
    # scenario (cuts every second) stalled with 74,000 deliveries pending once they had leaked.
    conn = await asyncpg.connect(settings.database_url)
    await subscriptions.add(conn, url="http://127.0.0.1:9/never", patterns="*", secret=None)
    await publish_many(conn, [trade(i, id=f"evt_cancel_{i}") for i in range(5)])
    rows = await conn.fetch(relay_module._CLAIM, 100)
    connection = await aio_pika.connect(settings.amqp_url)
    channel = await connection.channel()
    topology = await declare(channel, Names(settings.amqp_prefix), delivery_limit=20)
    for out in pack_rows(rows, 50):
        await topology.events.publish(out.message, routing_key=out.routing_key)
    message = await topology.dispatch.get(timeout=5)
    async with hand_driven_dispatcher(settings) as (deliverer, dispatcher):
        free = deliverer.capacity.free_slots()
        blocker = await asyncpg.connect(settings.database_url)
        await blocker.execute("BEGIN; LOCK TABLE delivery.inbox IN EXCLUSIVE MODE")
        batch = asyncio.create_task(dispatcher.dispatch_batch([message], asyncio.Event()))
        await wait_until(
            lambda: deliverer.capacity.free_slots() == free - 5,
            timeout_s=10,
            what="the batch's reservations",
        )
        batch.cancel()
        with pytest.raises(asyncio.CancelledError):
            await batch
        assert deliverer.capacity.free_slots() == free
        await blocker.execute("ROLLBACK")
        await blocker.close()
    await connection.close()
    await conn.close()


async def test_copies_of_an_event_in_one_batch_count_as_redeliveries(settings):
    # A redriven copy can reach a worker in the same batch as its original (both held, then
    # handed back by a crash): the inbox absorbs it and counts it, as it counts a copy that
    # comes in a later batch. The chaos checker tells a redrive that healed a lost message
    # from a spare copy by this count.
    conn = await asyncpg.connect(settings.database_url)
    await publish_many(conn, [trade(1, id="evt_twice"), trade(2, id="evt_once")])
    rows = await conn.fetch(relay_module._CLAIM, 100)
    connection = await aio_pika.connect(settings.amqp_url)
    channel = await connection.channel()
    topology = await declare(channel, Names(settings.amqp_prefix), delivery_limit=20)
    # The original pack of both events, and a copy of one of them alone (as a redrive sends it)
    for out in pack_rows(rows, 50) + pack_rows([rows[0]], 1) * 3:
        await topology.events.publish(out.message, routing_key=out.routing_key)
    pack, copy, *later = [await topology.dispatch.get(timeout=5) for _ in range(4)]
    async with hand_driven_dispatcher(settings) as (_deliverer, dispatcher):
        await dispatcher.dispatch_batch([pack, copy], asyncio.Event())
        counts = dict(await conn.fetch("SELECT event_id, redeliveries FROM delivery.inbox"))
        assert counts == {"evt_twice": 1, "evt_once": 0}
        # Two more copies in a later batch: both counted
        await dispatcher.dispatch_batch(later, asyncio.Event())
        assert (
            await conn.fetchval(
                "SELECT redeliveries FROM delivery.inbox WHERE event_id = 'evt_twice'"
            )
            == 3
        )
    await connection.close()
    await conn.close()
