"""The failure paths, made to happen at the exact step instead of by a chaos run.

PostgreSQL is made to fail where a branch needs it: a trigger that raises on one event's insert
(a data error), a table lock whose waiting backends are terminated (a connection lost for longer
than the retry deadline), a trigger that makes the scheduler's claim fail. The broker's dispatch
queue is deleted under a running relay; a subscriber refuses or resets the connection. Each test
then checks what the platform holds, gives back, retries with the same webhook-id, and never
acks early. Components are wired by hand where a test has to see inside them (the deliverer's
free slots, a batch still held).
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import socket
import struct
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime

import aio_pika
import asyncpg
import orjson
import pytest
from aio_pika.abc import AbstractChannel, AbstractIncomingMessage

from delivery import publish_many
from delivery.broker import relay as relay_module
from delivery.broker.topology import Names, Topology, declare
from delivery.broker.wire import pack_rows
from delivery.ops.health import Health
from delivery.settings import Settings
from delivery.store import subscriptions
from delivery.store.pool import create_pool
from delivery.testing.factories import add_subscription, trade
from delivery.testing.metrics import counter_value
from delivery.testing.receiver import Receiver
from delivery.testing.waits import wait_until
from delivery.worker import dispatch as dispatch_module
from delivery.worker.deliverer import Deliverer
from delivery.worker.dispatch import Dispatcher
from delivery.worker.outcomes import AttemptOutcome, OutcomeRecorder
from delivery.worker.retry import Decision, Outcome, RetryPolicy, decide
from delivery.worker.scheduler import Scheduler
from delivery.worker.sender import AttemptResult, Sender
from tests.support import run_until_idle, running

pytestmark = pytest.mark.integration

# -- fault injection ----------------------------------------------------------------------------


async def install_fault(
    conn: asyncpg.Connection,
    name: str,
    *,
    table: str,
    when: str,
    on: str = "INSERT",
    times: int | None = None,
    errcode: str = "P0001",
) -> None:
    """A BEFORE ``on`` row trigger on ``table`` that raises ``errcode`` for rows matching
    ``when`` (the first ``times`` of them, or all). ``delivery.fault_<name>_hits`` counts the
    matching rows: a sequence, so the count survives the rollback of the failed statement."""
    limit = "true" if times is None else f"hits <= {times}"
    await conn.execute(
        f"""
        CREATE SEQUENCE delivery.fault_{name}_hits;
        CREATE FUNCTION delivery.fault_{name}() RETURNS trigger LANGUAGE plpgsql AS $fn$
        DECLARE hits bigint;
        BEGIN
            IF {when} THEN
                hits := nextval('delivery.fault_{name}_hits');
                IF {limit} THEN
                    RAISE EXCEPTION 'injected fault {name} (%)', hits USING ERRCODE = '{errcode}';
                END IF;
            END IF;
            RETURN NEW;
        END $fn$;
        CREATE TRIGGER fault_{name} BEFORE {on} ON {table}
            FOR EACH ROW EXECUTE FUNCTION delivery.fault_{name}();
        """
    )


async def fault_hits(conn: asyncpg.Connection, name: str) -> int:
    row = await conn.fetchrow(f"SELECT last_value, is_called FROM delivery.fault_{name}_hits")
    assert row is not None
    return int(row["last_value"]) if row["is_called"] else 0


async def remove_fault(conn: asyncpg.Connection, name: str, *, table: str) -> None:
    await conn.execute(f"DROP TRIGGER fault_{name} ON {table}")


# -- a worker wired by hand ---------------------------------------------------------------------


@dataclass
class Worker:
    settings: Settings
    pool: asyncpg.Pool
    health: Health
    deliverer: Deliverer
    scheduler: Scheduler
    dispatcher: Dispatcher
    stop: asyncio.Event
    tasks: list[asyncio.Task[None]] = field(default_factory=list)

    def ready(self, component: str) -> bool:
        return bool(self.health.report()["components"][component])  # type: ignore[index]


@contextlib.asynccontextmanager
async def worker(settings: Settings, *, scheduler: bool = False) -> AsyncIterator[Worker]:
    """The deliverer running (attempts start as they are submitted), the dispatcher driven by
    the test one batch at a time, and the scheduler running only when asked."""
    pool = await create_pool(settings.database_url, min_size=1, max_size=4)
    stop, force = asyncio.Event(), asyncio.Event()
    async with Sender(
        max_connections=16,
        connect_timeout_s=2,
        timeout_s=settings.http_timeout_s,
        excerpt_bytes=200,
        allow_private_targets=True,
    ) as sender:
        health = Health()
        deliverer = Deliverer(settings, pool, sender)
        sched = Scheduler(settings, pool, deliverer, health)
        dispatcher = Dispatcher(settings, pool, deliverer, sched, health)
        w = Worker(settings, pool, health, deliverer, sched, dispatcher, stop)
        w.tasks.append(asyncio.create_task(deliverer.run(stop, force)))
        if scheduler:
            w.tasks.append(asyncio.create_task(sched.run(stop)))
        await asyncio.sleep(0)  # the deliverer's task group exists: submitted jobs start
        try:
            yield w
        finally:
            stop.set()
            await asyncio.wait_for(asyncio.gather(*w.tasks), 30)
            await pool.close()


@contextlib.asynccontextmanager
async def broker(settings: Settings) -> AsyncIterator[tuple[AbstractChannel, Topology]]:
    connection = await aio_pika.connect(settings.amqp_url)
    try:
        channel = await connection.channel()
        topology = await declare(
            channel, Names(settings.amqp_prefix), delivery_limit=settings.amqp_delivery_limit
        )
        yield channel, topology
    finally:
        await connection.close()


async def relay_outbox(conn: asyncpg.Connection, topology: Topology) -> int:
    """Publish the outbox's rows as the relay would (packed), without a relay running."""
    rows = await conn.fetch(relay_module._CLAIM, 1000)
    packs = pack_rows(rows, 50)
    for out in packs:
        await topology.events.publish(out.message, routing_key=out.routing_key)
    return len(packs)


async def ready_messages(settings: Settings, queue: str) -> int:
    """Messages ready in ``queue`` (not those delivered to a consumer and not yet settled)."""
    connection = await aio_pika.connect(settings.amqp_url)
    async with connection:
        channel = await connection.channel()
        declared = await channel.declare_queue(queue, passive=True)
        return declared.declaration_result.message_count or 0


async def get_message(topology: Topology) -> AbstractIncomingMessage:
    message = await topology.dispatch.get(timeout=5, fail=False)
    assert message is not None, "the dispatch queue has no message ready"
    return message


# -- 1. dispatch: the batch's commit fails ------------------------------------------------------


async def test_a_batch_whose_commit_fails_is_nacked_with_its_capacity_given_back(settings):
    conn = await asyncpg.connect(settings.database_url)
    async with Receiver() as receiver:
        await add_subscription(conn, receiver, "/h", patterns="*")
        await publish_many(conn, [trade(1, id="evt_refused"), trade(2, id="evt_bystander")])
        # Given the inbox refuses one event of the batch (a data error, not an outage)
        await install_fault(
            conn, "inbox", table="delivery.inbox", when="NEW.event_id = 'evt_refused'"
        )
        async with broker(settings) as (_channel, topology), worker(settings) as w:
            assert await relay_outbox(conn, topology) == 1  # both events in one message
            message = await get_message(topology)
            # When the batch is dispatched
            await w.dispatcher.dispatch_batch([message], w.stop)
            # Then the commit was tried once and nothing of the batch was written
            assert await fault_hits(conn, "inbox") == 1
            assert await conn.fetchval("SELECT count(*) FROM delivery.deliveries") == 0
            # and the deliverer has all of its capacity back (the batch had reserved two slots)
            assert w.deliverer.capacity.free_slots() == settings.max_in_flight
            assert w.deliverer.capacity.free_slots_by_subscription() == {}
            # and the message went back to the broker (nacked: neither acked nor held)
            again = await get_message(topology)
            assert again.redelivered
            assert again.body == message.body
            # When the fault is gone, the redelivered batch commits and both events go out once
            await remove_fault(conn, "inbox", table="delivery.inbox")
            await w.dispatcher.dispatch_batch([again], w.stop)
            await receiver.wait_for(
                lambda r: r.unique_ids() == {"evt_refused", "evt_bystander"},
                timeout_s=30,
                what="both events delivered",
            )
            await wait_until(
                lambda: w.deliverer.capacity.free_slots() == settings.max_in_flight,
                timeout_s=30,
                what="the slots of the finished attempts",
            )
            # and the message was acked after its commit: nothing is left for the broker to hand out
            assert await topology.dispatch.get(timeout=5, fail=False) is None
        assert receiver.duplicates() == {}
        assert all(a.signature_ok for a in receiver.arrivals)
        refused = next(a for a in receiver.delivered() if a.webhook_id == "evt_refused")
        assert orjson.loads(refused.body)["id"] == "evt_refused"
    assert await ready_messages(settings, Names(settings.amqp_prefix).dispatch_queue) == 0
    await conn.close()


async def test_a_batch_is_held_not_nacked_while_the_database_is_unreachable(settings, monkeypatch):
    # The commit's own retries give up quickly, so the outage outlasts them.
    monkeypatch.setattr(dispatch_module, "_DB_RETRY_DEADLINE_S", 0.3)
    monkeypatch.setattr(dispatch_module, "_DB_PAUSE_S", 0.1)
    names = Names(settings.amqp_prefix)
    conn = await asyncpg.connect(settings.database_url)
    blocker = await asyncpg.connect(settings.database_url)
    killer = await asyncpg.connect(settings.database_url)
    async with Receiver() as receiver:
        await add_subscription(conn, receiver, "/h", patterns="*")
        await publish_many(conn, [trade(1, id="evt_outage")])
        async with broker(settings) as (_channel, topology), worker(settings) as w:
            await relay_outbox(conn, topology)
            message = await get_message(topology)
            w.health.set("dispatch", True)  # as after start-up
            # Given every connection that tries to write the inbox is cut, again and again
            lock = blocker.transaction()
            await lock.start()
            await blocker.execute("LOCK TABLE delivery.inbox IN EXCLUSIVE MODE")
            cut = [0]
            outage = asyncio.Event()

            async def cut_writers() -> None:
                while not outage.is_set():
                    cut[0] += await killer.fetchval(
                        """
                        SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity
                        WHERE datname = current_database() AND pid <> pg_backend_pid()
                          AND wait_event_type = 'Lock' AND query LIKE '%INSERT INTO delivery.inbox%'
                        """
                    )
                    await asyncio.sleep(0.02)

            cutter = asyncio.create_task(cut_writers())
            batch = asyncio.create_task(w.dispatcher.dispatch_batch([message], w.stop))
            # When the outage outlasts the commit's retry deadline
            await wait_until(
                lambda: batch.done() or not w.ready("dispatch"),
                timeout_s=30,
                what="dispatch giving up on the commit's retries",
            )
            # Then the batch is held: not handed back, and dispatch says it is not ready
            assert not batch.done(), "the batch was given up during a database outage"
            assert not w.ready("dispatch")
            tried = cut[0]
            await wait_until(
                lambda: batch.done() or cut[0] >= tried + 2,
                timeout_s=30,
                what="the held batch trying again",
            )
            assert not batch.done()
            # and its message is not back in the queue (a nack would count toward the
            # x-delivery-limit and, over a long outage, make it poison)
            assert await ready_messages(settings, names.dispatch_queue) == 0
            assert await conn.fetchval("SELECT count(*) FROM delivery.inbox") == 0
            # When the database is back
            outage.set()
            await cutter
            await lock.rollback()
            await asyncio.wait_for(batch, 30)
            # Then the held batch commits, is delivered, and is acked
            await receiver.wait_for(
                lambda r: "evt_outage" in r.unique_ids(), timeout_s=30, what="the held event"
            )
            assert await topology.dispatch.get(timeout=5, fail=False) is None
            assert await conn.fetchval("SELECT redeliveries FROM delivery.inbox") == 0
        assert [a.webhook_id for a in receiver.arrivals] == ["evt_outage"]
    assert await ready_messages(settings, names.dispatch_queue) == 0
    assert await ready_messages(settings, names.dead_queue) == 0
    await killer.close()
    await blocker.close()
    await conn.close()


async def test_a_batch_committed_after_the_drain_began_hands_its_leases_back(settings):
    conn = await asyncpg.connect(settings.database_url)
    blocker = await asyncpg.connect(settings.database_url)
    async with Receiver() as receiver:
        await add_subscription(conn, receiver, "/h", patterns="*")
        await publish_many(conn, [trade(1, id="evt_late")])
        async with broker(settings) as (_channel, topology), worker(settings) as w:
            await relay_outbox(conn, topology)
            message = await get_message(topology)
            capacity = w.deliverer.capacity
            # Given a batch that reserved its capacity and waits for its commit (the inbox is
            # locked)
            lock = blocker.transaction()
            await lock.start()
            await blocker.execute("LOCK TABLE delivery.inbox IN EXCLUSIVE MODE")
            batch = asyncio.create_task(w.dispatcher.dispatch_batch([message], asyncio.Event()))
            await wait_until(lambda: capacity.held == 1, timeout_s=30, what="the reservation")
            # When the drain begins before the commit, and the commit then goes through
            w.stop.set()
            await wait_until(lambda: capacity.closed, timeout_s=30, what="the drain")
            await lock.rollback()
            await asyncio.wait_for(batch, 30)
            # Then the leased delivery goes back to PostgreSQL at once, unattempted (not held
            # until its lease ends)
            await wait_until(
                lambda: conn.fetchval(
                    "SELECT lease_until IS NULL FROM delivery.deliveries"
                    " WHERE event_id = 'evt_late'"
                ),
                timeout_s=30,
                what="the lease handed back",
            )
            row = await conn.fetchrow("SELECT state, attempts FROM delivery.deliveries")
            assert row is not None and (row["state"], row["attempts"]) == ("pending", 0)
            await wait_until(capacity.idle.is_set, timeout_s=30, what="drained")
            # and the message was acked after its commit
            assert await topology.dispatch.get(timeout=5, fail=False) is None
        assert receiver.arrivals == []
    await blocker.close()
    await conn.close()


# -- 2. an attempt whose outcome cannot be recorded ---------------------------------------------

_EVENT_OF_ATTEMPT = (
    "(SELECT event_id FROM delivery.deliveries WHERE id = NEW.delivery_id) = '{event_id}'"
)


async def test_an_attempt_whose_outcome_cannot_be_recorded_is_handed_back_and_sent_again(settings):
    conn = await asyncpg.connect(settings.database_url)
    async with Receiver() as receiver:
        await add_subscription(conn, receiver, "/h", patterns="*")
        await publish_many(conn, [trade(1, id="evt_unrecorded")])
        # Given the outcome of this event's attempts cannot be committed
        await install_fault(
            conn,
            "attempts",
            table="delivery.attempts",
            when=_EVENT_OF_ATTEMPT.format(event_id="evt_unrecorded"),
        )
        async with broker(settings) as (_channel, topology), worker(settings) as w:
            await relay_outbox(conn, topology)
            delivered_before = counter_value("delivery_attempts_total", outcome="delivered")
            # When it is dispatched and attempted (the subscriber answers 200)
            await w.dispatcher.dispatch_batch([await get_message(topology)], w.stop)
            await receiver.wait_for(lambda r: len(r.arrivals) == 1, timeout_s=30, what="a POST")
            await wait_until(
                lambda: w.deliverer.capacity.free_slots() == settings.max_in_flight,
                timeout_s=30,
                what="the crashed attempt to finish",
            )
            assert await fault_hits(conn, "attempts") == 1
            # Then the delivery is handed back at once: pending, lease cleared, nothing recorded
            row = await conn.fetchrow(
                "SELECT state, lease_until, attempts FROM delivery.deliveries"
            )
            assert dict(row) == {"state": "pending", "lease_until": None, "attempts": 0}
            assert await conn.fetchval("SELECT count(*) FROM delivery.attempts") == 0
            # and the attempt is not counted as delivered anywhere
            assert counter_value("delivery_attempts_total", outcome="delivered") == delivered_before
            # When the fault is gone, the scheduler takes it at once (its lease is free)
            await remove_fault(conn, "attempts", table="delivery.attempts")
            assert await w.scheduler.claim_once(10) == 1
            await wait_until(
                lambda: conn.fetchval("SELECT state = 'delivered' FROM delivery.deliveries"),
                timeout_s=30,
                what="the second attempt recorded",
            )
        # Then the subscriber saw the same webhook-id and the same bytes twice, and one attempt
        # (the recorded one) is on file
        first, second = receiver.arrivals
        assert first.webhook_id == second.webhook_id == "evt_unrecorded"
        assert first.body == second.body
        assert first.signature_ok and second.signature_ok
        attempts = await conn.fetch("SELECT attempt, outcome, status FROM delivery.attempts")
        assert [tuple(a) for a in attempts] == [(1, "delivered", 200)]
    await conn.close()


@pytest.mark.parametrize("outcome", [Outcome.DELIVERED, Outcome.RETRY])
async def test_an_outcome_that_cannot_be_committed_is_raised_to_its_attempt(settings, outcome):
    # Both statements: all successes (one statement) and the general path (a transaction).
    conn = await asyncpg.connect(settings.database_url)
    sub = await subscriptions.add(conn, url="http://127.0.0.1:9/h", patterns="*", secret=None)
    ids = {}
    for event_id in ("evt_fails", "evt_fine"):
        ids[event_id] = await conn.fetchval(
            "INSERT INTO delivery.deliveries (event_id, subscription_id, lease_until)"
            " VALUES ($1, $2, clock_timestamp() + interval '1 minute') RETURNING id",
            event_id,
            sub.id,
        )
    await install_fault(
        conn,
        "attempts",
        table="delivery.attempts",
        when=_EVENT_OF_ATTEMPT.format(event_id="evt_fails"),
    )
    pool = await create_pool(settings.database_url, min_size=1, max_size=2)
    recorder = OutcomeRecorder(settings, pool)
    decision = (
        Decision(Outcome.DELIVERED)
        if outcome is Outcome.DELIVERED
        else Decision(Outcome.RETRY, delay_s=1.0)
    )
    status = 200 if outcome is Outcome.DELIVERED else 503

    def item(event_id: str) -> AttemptOutcome:
        result = AttemptResult(status=status, error=None, duration_s=0.01)
        return AttemptOutcome(ids[event_id], sub.id, 1, datetime.now(UTC), result, decision)

    with pytest.raises(asyncpg.RaiseError, match="injected fault attempts"):
        await recorder.record(item("evt_fails"))
    await recorder.record(item("evt_fine"))  # the recorder goes on with the next flush
    rows = {
        r["event_id"]: (r["state"], r["attempts"], r["leased"])
        for r in await conn.fetch(
            "SELECT event_id, state, attempts, lease_until IS NOT NULL AS leased"
            " FROM delivery.deliveries"
        )
    }
    state = "delivered" if outcome is Outcome.DELIVERED else "pending"
    assert rows == {"evt_fails": ("pending", 0, True), "evt_fine": (state, 1, False)}
    assert await conn.fetchval("SELECT count(*) FROM delivery.attempts") == 1
    await pool.close()
    await conn.close()


# -- 3. the scheduler's claim fails -------------------------------------------------------------


def _claims_with_backoff(elapsed_s: float) -> int:
    """Claims the scheduler may start within ``elapsed_s`` after a failed one: it waits
    min(0.1 * 2**failures, 5) seconds after each failure."""
    claims, waited, failures = 0, 0.0, 1
    while True:
        waited += min(0.1 * 2**failures, 5.0)
        if waited > elapsed_s:
            return claims
        claims += 1
        failures += 1


async def test_a_failing_claim_backs_off_reports_not_ready_and_recovers(settings):
    conn = await asyncpg.connect(settings.database_url)
    async with Receiver() as receiver:
        sub = await add_subscription(conn, receiver, "/h", patterns="*")
        await publish_many(conn, [trade(1, id="evt_due")])
        async with worker(settings, scheduler=True) as w:
            await wait_until(lambda: w.ready("scheduler"), timeout_s=30, what="scheduler ready")
            # Given the claim of a due retry fails (a trigger refuses to lease it)
            await install_fault(
                conn,
                "claim",
                table="delivery.deliveries",
                on="UPDATE",
                when="NEW.event_id = 'evt_due' AND OLD.lease_until IS NULL"
                " AND NEW.lease_until IS NOT NULL",
            )
            await conn.execute(
                "INSERT INTO delivery.deliveries (event_id, subscription_id, attempts, last_status)"
                " VALUES ('evt_due', $1, 1, 503)",
                sub.id,
            )
            await wait_until(lambda: fault_hits(conn, "claim"), timeout_s=30, what="a failed claim")
            # Then the scheduler says it is not ready
            await wait_until(
                lambda: not w.ready("scheduler"), timeout_s=30, what="scheduler not ready"
            )
            # and backs off instead of claiming again at once
            first, started = await fault_hits(conn, "claim"), time.monotonic()
            await wait_until(
                lambda: time.monotonic() - started > 1.0, timeout_s=30, what="a second"
            )
            claims = await fault_hits(conn, "claim") - first
            elapsed = time.monotonic() - started
            assert claims <= _claims_with_backoff(elapsed) + 1, (
                f"{claims} claims in {elapsed:.2f}s while every claim fails"
            )
            assert await conn.fetchval("SELECT lease_until FROM delivery.deliveries") is None
            # When the fault is gone, the due retry is claimed and delivered, and it is ready
            await remove_fault(conn, "claim", table="delivery.deliveries")
            await receiver.wait_for(
                lambda r: "evt_due" in r.unique_ids(), timeout_s=30, what="the due retry"
            )
            await wait_until(lambda: w.ready("scheduler"), timeout_s=30, what="ready again")
            await wait_until(
                lambda: conn.fetchval("SELECT state = 'delivered' FROM delivery.deliveries"),
                timeout_s=30,
                what="the retry recorded",
            )
        assert await conn.fetchval("SELECT attempts FROM delivery.deliveries") == 2
    await conn.close()


# -- 4. the relay and a deleted dispatch queue --------------------------------------------------


async def test_a_deleted_dispatch_queue_is_declared_again_when_publishes_come_back(
    settings, monkeypatch
):
    # Only the returned publishes may lead the relay to the missing queue (the redrive sweep's
    # check for it does not come round during this test).
    monkeypatch.setattr(relay_module, "_REDRIVE_EVERY_S", 3600.0)
    names = Names(settings.amqp_prefix)
    conn = await asyncpg.connect(settings.database_url)
    ids = {f"evt_requeued_{i}" for i in range(10)}
    async with Receiver() as receiver:
        await add_subscription(conn, receiver, "/h", patterns="*")
        async with running(settings, worker=False):
            # Given the dispatch queue is deleted under the running relay
            connection = await aio_pika.connect(settings.amqp_url)
            async with connection:
                channel = await connection.channel()
                await channel.queue_delete(names.dispatch_queue)
            returned_before = counter_value("delivery_relay_publish_failures_total", reason="returned")
            # When events are published
            await publish_many(conn, [trade(i, id=e) for i, e in enumerate(sorted(ids))])
            # Then their first publish comes back unroutable, and they are published once the
            # relay has declared the queue again
            await wait_until(
                lambda: (
                    counter_value("delivery_relay_publish_failures_total", reason="returned")
                    > returned_before
                ),
                timeout_s=30,
                what="a returned publish",
            )
            await wait_until(
                lambda: conn.fetchval(
                    "SELECT count(*) = 0 FROM delivery.outbox WHERE published_at IS NULL"
                ),
                timeout_s=30,
                what="every row published",
            )
        # and every row marked published is in the queue: a worker alone (no relay, no
        # redrive) delivers them all, once (it runs until every published event is in the inbox)
        await run_until_idle(settings, relay=False, timeout_s=30)
        assert receiver.unique_ids() == ids
        assert receiver.duplicates() == {}
        assert await conn.fetchval("SELECT max(redrives) FROM delivery.outbox") == 0
    await conn.close()


async def test_the_redrive_sweep_declares_a_deleted_dispatch_queue_again(settings, monkeypatch):
    monkeypatch.setattr(relay_module, "_REDRIVE_EVERY_S", 0.2)
    names = Names(settings.amqp_prefix)
    conn = await asyncpg.connect(settings.database_url)

    async def queue_exists() -> bool:
        try:
            await ready_messages(settings, names.dispatch_queue)
        except aio_pika.exceptions.ChannelNotFoundEntity:
            return False
        return True

    async with running(settings, worker=False):
        # Given the dispatch queue is deleted while the relay has nothing to publish
        connection = await aio_pika.connect(settings.amqp_url)
        async with connection:
            channel = await connection.channel()
            await channel.queue_delete(names.dispatch_queue)
        # Then the relay's sweep finds it missing and declares it again
        await wait_until(queue_exists, timeout_s=30, what="the queue declared again")
        # and what is published next reaches it
        await publish_many(conn, [trade(1, id="evt_after_sweep")])
        await wait_until(
            lambda: ready_messages(settings, names.dispatch_queue),
            timeout_s=30,
            what="the event in the queue",
        )
    assert await conn.fetchval("SELECT published_at IS NOT NULL FROM delivery.outbox")
    await conn.close()


# -- 5. a subscriber that refuses or resets the connection --------------------------------------


def _reset(writer: asyncio.StreamWriter) -> None:
    """Close with an RST instead of a FIN (SO_LINGER 0)."""
    sock = writer.get_extra_info("socket")
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    writer.transport.abort()


async def _read_request(reader: asyncio.StreamReader) -> tuple[dict[str, str], bytes]:
    head = await reader.readuntil(b"\r\n\r\n")
    headers = {}
    for line in head.decode("latin-1").split("\r\n")[1:]:
        if ":" in line:
            key, value = line.split(":", 1)
            headers[key.strip().lower()] = value.strip()
    body = await reader.readexactly(int(headers.get("content-length", "0")))
    return headers, body


Handler = Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]


async def _reset_after_request(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    await _read_request(reader)
    _reset(writer)


async def _close_without_reply(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    await _read_request(reader)
    writer.close()


async def _close_mid_reply(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    await _read_request(reader)
    writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\n")
    await writer.drain()
    await asyncio.sleep(0.1)  # the head of the reply is out; its body never comes
    writer.close()


async def _reset_mid_reply(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    await _read_request(reader)
    writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\n")
    await writer.drain()
    await asyncio.sleep(0.1)
    _reset(writer)


@contextlib.asynccontextmanager
async def tcp_server(handler: Handler) -> AsyncIterator[int]:
    server = await asyncio.start_server(handler, "127.0.0.1", 0)
    try:
        yield server.sockets[0].getsockname()[1]
    finally:
        server.close()


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


async def _post(port: int) -> AttemptResult:
    async with Sender(
        max_connections=4,
        connect_timeout_s=2,
        timeout_s=5,
        excerpt_bytes=100,
        allow_private_targets=True,
    ) as sender:
        return await sender.post(f"http://127.0.0.1:{port}/h", {"webhook-id": "evt_x"}, b"{}")


def _is_retried(result: AttemptResult) -> bool:
    decision = decide(
        status=result.status,
        error=result.error,
        retry_after_s=result.retry_after_s,
        attempt=1,
        policy=RetryPolicy((1.0,)),
        rng=random.Random(0),
    )
    return decision.outcome is Outcome.RETRY


async def test_a_refused_connection_is_an_attempt_without_status_and_is_retried():
    result = await _post(_free_port())  # nothing listens there
    assert result.status is None
    assert result.error is not None and result.error.startswith("ClientConnectorError")
    assert _is_retried(result)


@pytest.mark.parametrize(
    ("handler", "error"),
    [
        (_reset_after_request, "ClientOSError: [Errno 104] Connection reset by peer"),
        (_close_without_reply, "ServerDisconnectedError"),
        (_close_mid_reply, "ClientPayloadError"),
        # (an RST that overtakes the head of the reply is a reset before any answer)
        (_reset_mid_reply, ("ClientPayloadError", "ClientOSError")),
    ],
    ids=["reset", "closed-without-answer", "closed-mid-body", "reset-mid-body"],
)
async def test_a_connection_cut_before_the_whole_answer_is_an_attempt_without_status(
    handler, error
):
    async with tcp_server(handler) as port:
        result = await _post(port)
    assert result.status is None
    assert result.error is not None and result.error.startswith(error), result.error
    assert _is_retried(result)


async def test_a_subscriber_that_never_answers_is_a_timeout_without_status_and_is_retried():
    async def hang(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await _read_request(reader)
        await reader.read()  # until the client gives up and closes

    async with (
        tcp_server(hang) as port,
        Sender(
            max_connections=4,
            connect_timeout_s=2,
            timeout_s=0.2,
            excerpt_bytes=100,
            allow_private_targets=True,
        ) as sender,
    ):
        result = await sender.post(f"http://127.0.0.1:{port}/h", {}, b"{}")
    assert result.status is None
    assert result.error == "timeout after 0.2s"
    assert _is_retried(result)


async def test_a_subscriber_that_resets_every_connection_gets_the_retries_then_a_dead_letter(
    settings,
):
    seen: list[tuple[dict[str, str], bytes]] = []

    async def record_and_reset(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        seen.append(await _read_request(reader))
        _reset(writer)

    conn = await asyncpg.connect(settings.database_url)
    async with tcp_server(record_and_reset) as port:
        await subscriptions.add(conn, url=f"http://127.0.0.1:{port}/h", patterns="*")
        async with running(settings):
            await publish_many(conn, [trade(1, id="evt_reset")])
            await wait_until(
                lambda: conn.fetchval("SELECT state = 'dead' FROM delivery.deliveries"),
                timeout_s=30,
                what="the dead letter",
            )
    # Every attempt of the schedule (one, then three retries), each the same webhook-id and body
    attempts = len(settings.retry_schedule_s) + 1
    assert [h["webhook-id"] for h, _b in seen] == ["evt_reset"] * attempts
    assert len({b for _h, b in seen}) == 1
    row = await conn.fetchrow(
        "SELECT attempts, last_status, last_error, dead_reason FROM delivery.deliveries"
    )
    assert row["attempts"] == attempts and row["last_status"] is None
    assert "Connection reset by peer" in row["last_error"]
    assert row["dead_reason"] == f"{row['last_error']}: gave up after {attempts} attempts"
    recorded = await conn.fetch(
        "SELECT outcome, status, error FROM delivery.attempts ORDER BY attempt"
    )
    assert [r["outcome"] for r in recorded] == ["retry"] * (attempts - 1) + ["exhausted"]
    assert all(r["status"] is None and "reset" in r["error"] for r in recorded)
    await conn.close()


# -- the poison recorder cannot record ----------------------------------------------------------


async def test_a_poison_message_whose_record_fails_is_kept_in_the_dead_queue_until_recorded(
    settings,
):
    conn = await asyncpg.connect(settings.database_url)
    # Given recording this poison message fails its first three times
    await install_fault(
        conn,
        "poison",
        table="delivery.poison_messages",
        when="NEW.message_id = 'poison-kept'",
        times=3,
    )
    async with running(settings), broker(settings) as (_channel, topology):
        # When an unparseable message reaches dispatch (rejected to the dead-letter queue)
        await topology.events.publish(
            aio_pika.Message(b"{not an envelope", message_id="poison-kept"),
            routing_key="trade.executed",
        )
        # Then it goes back to the dead queue after each failed record, and is recorded
        await wait_until(
            lambda: conn.fetchval("SELECT count(*) = 1 FROM delivery.poison_messages"),
            timeout_s=30,
            what="the poison message recorded",
        )
    assert await fault_hits(conn, "poison") == 4  # three refused, then the one that went in
    row = await conn.fetchrow("SELECT message_id, reason, body FROM delivery.poison_messages")
    assert row["message_id"] == "poison-kept"
    assert row["reason"].startswith("unprocessable")
    assert row["body"] == b"{not an envelope"
    names = Names(settings.amqp_prefix)
    assert await ready_messages(settings, names.dead_queue) == 0
    await conn.close()
