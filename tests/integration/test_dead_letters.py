"""Rules that live in SQL, on the real database: what an attempt's outcome does to its
subscription (the circuit's count, disabling after 410 or a long outage) and to the deliveries
still waiting; that an event for a disabled subscription is kept as a dead letter; which events
the relay's sweep and the dead-letter consumer send again, and which they record as poison."""

from __future__ import annotations

import asyncio
import random
from datetime import UTC, datetime

import aio_pika
import asyncpg
import orjson
import pytest

from delivery import publish_many
from delivery.broker import relay as relay_module
from delivery.broker.topology import Names, declare
from delivery.broker.wire import decode, pack_rows
from delivery.settings import Settings
from delivery.store import subscriptions
from delivery.store.pool import create_pool
from delivery.testing.factories import trade
from delivery.testing.receiver import Receiver
from delivery.testing.waits import wait_until
from delivery.worker.outcomes import AttemptOutcome, OutcomeRecorder
from delivery.worker.retry import RetryPolicy, decide
from delivery.worker.sender import AttemptResult
from tests.support import running

pytestmark = pytest.mark.integration

_POLICY = RetryPolicy((5.0, 10.0, 20.0))


async def _deliveries(conn: asyncpg.Connection, sub_id: str, n: int) -> list[int]:
    """``n`` pending deliveries of ``sub_id``, as dispatch would have left them."""
    rows = await conn.fetch(
        "INSERT INTO delivery.deliveries (event_id, subscription_id)"
        " SELECT 'evt_' || $1 || '_' || g, $1 FROM generate_series(1, $2) g RETURNING id",
        sub_id,
        n,
    )
    return [r["id"] for r in rows]


def _outcome(delivery_id: int, sub_id: str, status: int, attempt: int = 1) -> AttemptOutcome:
    """The attempt's result turned into its decision by the real policy, as the deliverer does."""
    decision = decide(
        status=status,
        error=None,
        retry_after_s=None,
        attempt=attempt,
        policy=_POLICY,
        rng=random.Random(0),
    )
    return AttemptOutcome(
        delivery_id=delivery_id,
        subscription_id=sub_id,
        attempt=attempt,
        started_at=datetime.now(UTC),
        result=AttemptResult(status=status, error=None, duration_s=0.01),
        decision=decision,
    )


async def _recorder(settings: Settings) -> tuple[OutcomeRecorder, asyncpg.Pool]:
    pool = await create_pool(settings.database_url, min_size=1, max_size=2)
    return OutcomeRecorder(settings, pool), pool


async def test_only_failures_after_the_last_success_of_a_batch_count_toward_the_circuit(settings):
    settings = settings.model_copy(update={"circuit_failure_threshold": 3})
    conn = await asyncpg.connect(settings.database_url)
    sub = await subscriptions.add(conn, url="http://127.0.0.1:9/h", patterns="*")
    other = await subscriptions.add(conn, url="http://127.0.0.1:9/o", patterns="*")
    await conn.execute(
        "UPDATE delivery.subscriptions SET consecutive_failures = 1, failing_since = now()"
        " WHERE id = $1",
        sub.id,
    )
    d1, d2, d3, d4 = await _deliveries(conn, sub.id, 4)
    (warm,) = await _deliveries(conn, other.id, 1)
    recorder, pool = await _recorder(settings)
    # The first record's flush is in flight while the other four arrive: they are written
    # together, as one batch, in this order.
    await asyncio.gather(
        recorder.record(_outcome(warm, other.id, 200)),
        recorder.record(_outcome(d1, sub.id, 503)),
        recorder.record(_outcome(d2, sub.id, 503)),
        recorder.record(_outcome(d3, sub.id, 200)),
        recorder.record(_outcome(d4, sub.id, 503)),
    )
    row = await conn.fetchrow(
        "SELECT consecutive_failures, circuit_state, failing_since IS NOT NULL AS failing"
        " FROM delivery.subscriptions WHERE id = $1",
        sub.id,
    )
    # The success reset the count; only the failure after it is consecutive (three would have
    # opened the circuit at this threshold).
    assert dict(row) == {"consecutive_failures": 1, "circuit_state": "closed", "failing": True}
    states = dict(await conn.fetch("SELECT id, state FROM delivery.deliveries"))
    assert states == {
        warm: "delivered",
        d1: "pending",
        d2: "pending",
        d3: "delivered",
        d4: "pending",
    }
    await pool.close()
    await conn.close()


async def test_a_410_disables_the_subscription_and_parks_its_waiting_deliveries_as_dead(settings):
    conn = await asyncpg.connect(settings.database_url)
    sub = await subscriptions.add(conn, url="http://127.0.0.1:9/gone", patterns="*")
    other = await subscriptions.add(conn, url="http://127.0.0.1:9/ok", patterns="*")
    attempted, waiting, later = await _deliveries(conn, sub.id, 3)
    (bystander,) = await _deliveries(conn, other.id, 1)
    recorder, pool = await _recorder(settings)
    await recorder.record(_outcome(attempted, sub.id, 410))
    row = await conn.fetchrow(
        "SELECT state, disabled_reason FROM delivery.subscriptions WHERE id = $1", sub.id
    )
    assert dict(row) == {
        "state": "disabled",
        "disabled_reason": "HTTP 410 Gone: subscription disabled",
    }
    rows = await conn.fetch(
        "SELECT id, state, dead_reason, dead_at IS NOT NULL AS has_dead_at, lease_until"
        " FROM delivery.deliveries WHERE subscription_id = $1",
        sub.id,
    )
    assert {r["id"] for r in rows} == {attempted, waiting, later}
    for r in rows:
        assert (r["state"], r["dead_reason"], r["has_dead_at"], r["lease_until"]) == (
            "dead",
            "HTTP 410 Gone: subscription disabled",
            True,
            None,
        ), r
    # Another subscription's work is untouched.
    assert (
        await conn.fetchval("SELECT state FROM delivery.deliveries WHERE id = $1", bystander)
        == "pending"
    )
    assert (
        await conn.fetchval("SELECT state FROM delivery.subscriptions WHERE id = $1", other.id)
        == "active"
    )
    await pool.close()
    await conn.close()


async def test_a_subscription_failing_for_longer_than_the_limit_is_disabled_with_its_backlog(
    settings,
):
    settings = settings.model_copy(
        update={"auto_disable_after_s": 600.0, "circuit_failure_threshold": 1000}
    )
    conn = await asyncpg.connect(settings.database_url)
    old = await subscriptions.add(conn, url="http://127.0.0.1:9/down", patterns="*")
    new = await subscriptions.add(conn, url="http://127.0.0.1:9/flaky", patterns="*")
    # Given one has been failing for an hour (past the 10 minute limit), the other for a minute
    await conn.execute(
        "UPDATE delivery.subscriptions SET consecutive_failures = 3,"
        " failing_since = clock_timestamp() - make_interval(secs => $2) WHERE id = $1",
        old.id,
        3600.0,
    )
    await conn.execute(
        "UPDATE delivery.subscriptions SET consecutive_failures = 3,"
        " failing_since = clock_timestamp() - make_interval(secs => $2) WHERE id = $1",
        new.id,
        60.0,
    )
    old_attempted, old_waiting = await _deliveries(conn, old.id, 2)
    new_attempted, new_waiting = await _deliveries(conn, new.id, 2)
    recorder, pool = await _recorder(settings)
    # When each fails once more (a retryable failure, attempts left)
    await recorder.record(_outcome(old_attempted, old.id, 503))
    await recorder.record(_outcome(new_attempted, new.id, 503))
    # Then the long-failing one is disabled and everything it had waiting is a dead letter
    reason = "failing for over 600s: auto-disabled"
    row = await conn.fetchrow(
        "SELECT state, disabled_reason FROM delivery.subscriptions WHERE id = $1", old.id
    )
    assert dict(row) == {"state": "disabled", "disabled_reason": reason}
    parked = dict(
        await conn.fetch(
            "SELECT id, dead_reason FROM delivery.deliveries"
            " WHERE subscription_id = $1 AND state = 'dead'",
            old.id,
        )
    )
    assert parked == {old_attempted: reason, old_waiting: reason}
    # and the one within the limit keeps retrying.
    assert (
        await conn.fetchval("SELECT state FROM delivery.subscriptions WHERE id = $1", new.id)
        == "active"
    )
    states = dict(
        await conn.fetch(
            "SELECT id, state FROM delivery.deliveries WHERE subscription_id = $1", new.id
        )
    )
    assert states == {new_attempted: "pending", new_waiting: "pending"}
    await pool.close()
    await conn.close()


async def test_an_event_for_a_disabled_subscription_is_a_dead_letter_at_once(settings):
    conn = await asyncpg.connect(settings.database_url)
    async with Receiver() as receiver:
        off = await subscriptions.add(conn, url=receiver.url("/off"), patterns="*")
        await subscriptions.set_state(conn, off.id, "disabled", reason="by the operator")
        await subscriptions.add(conn, url=receiver.url("/on"), patterns="*")
        async with running(settings):
            await publish_many(conn, [trade(1, id="evt_to_disabled")])
            # The active subscription's delivery is created in the same statement as the
            # disabled one's: once it arrived, both rows exist.
            await receiver.wait_for(
                lambda r: "evt_to_disabled" in r.unique_ids("/on"), timeout_s=30, what="the /on one"
            )
            row = await conn.fetchrow(
                "SELECT state, dead_reason, dead_at IS NOT NULL AS has_dead_at, attempts"
                " FROM delivery.deliveries WHERE subscription_id = $1",
                off.id,
            )
        assert dict(row) == {
            "state": "dead",
            "dead_reason": "subscription disabled",
            "has_dead_at": True,
            "attempts": 0,
        }
        assert receiver.unique_ids("/off") == set()
    await conn.close()


async def test_the_redrive_sweep_sends_again_only_lost_events_with_redrives_left(
    settings, monkeypatch
):
    settings = settings.model_copy(update={"redrive_after_s": 1.0, "max_redrives": 2})
    monkeypatch.setattr(relay_module, "_REDRIVE_EVERY_S", 0.1)
    conn = await asyncpg.connect(settings.database_url)
    ids = ["evt_lost", "evt_dispatched", "evt_spent"]
    await publish_many(conn, [trade(i, id=event_id) for i, event_id in enumerate(ids)])
    # Given three events published an hour ago that never came back from the broker: one lost,
    # one a worker did dispatch (its inbox row), one sent again max_redrives times already
    await conn.execute(
        "UPDATE delivery.outbox SET published_at = clock_timestamp() - interval '1 hour'"
    )
    await conn.execute("INSERT INTO delivery.inbox (event_id) VALUES ('evt_dispatched')")
    await conn.execute("UPDATE delivery.outbox SET redrives = 2 WHERE event_id = 'evt_spent'")
    # When the relay sweeps (one statement looks at all three) and publishes what it took back
    async with running(settings, worker=False):
        await wait_until(
            lambda: conn.fetchval(
                "SELECT redrives = 1 AND published_at > clock_timestamp() - interval '1 minute'"
                " FROM delivery.outbox WHERE event_id = 'evt_lost'"
            ),
            timeout_s=30,
            what="the lost event redriven and published again",
        )
    # Then only the lost one was taken back
    rows = await conn.fetch(
        "SELECT event_id, redrives,"
        " published_at < clock_timestamp() - interval '30 minutes' AS untouched"
        " FROM delivery.outbox"
    )
    assert {r["event_id"]: (r["redrives"], r["untouched"]) for r in rows} == {
        "evt_lost": (1, False),
        "evt_dispatched": (0, True),
        "evt_spent": (2, True),
    }
    # and it is the only event in the dispatch queue.
    connection = await aio_pika.connect(settings.amqp_url)
    channel = await connection.channel()
    topology = await declare(
        channel, Names(settings.amqp_prefix), delivery_limit=settings.amqp_delivery_limit
    )
    queued: list[str] = []
    while (message := await topology.dispatch.get(timeout=5, fail=False)) is not None:
        queued.extend(e.facts.id for e in decode(message))
        await message.ack()
    assert queued == ["evt_lost"]
    await connection.close()
    await conn.close()


async def test_an_unparseable_message_is_dead_lettered_at_once_not_requeued(settings):
    conn = await asyncpg.connect(settings.database_url)
    async with running(settings):
        connection = await aio_pika.connect(settings.amqp_url)
        channel = await connection.channel()
        names = Names(settings.amqp_prefix)
        await declare(channel, names, delivery_limit=settings.amqp_delivery_limit)
        # Straight into the dispatch queue, past the exchange.
        await channel.default_exchange.publish(
            aio_pika.Message(b"\x00 not an envelope", message_id="poison-direct"),
            routing_key=names.dispatch_queue,
        )
        await wait_until(
            lambda: conn.fetchval("SELECT count(*) = 1 FROM delivery.poison_messages"),
            timeout_s=30,
            what="the poison message recorded",
        )
        await connection.close()
    row = await conn.fetchrow(
        "SELECT message_id, reason, death_count, headers, body FROM delivery.poison_messages"
    )
    assert row["message_id"] == "poison-direct"
    assert row["reason"].startswith("unprocessable: ")
    assert row["body"] == b"\x00 not an envelope"
    # Rejected by the first worker that saw it, once: a requeue would have looped it through
    # the workers until the broker's delivery limit dead-lettered it.
    (death, *_) = orjson.loads(row["headers"])["x-death"]
    assert (death["reason"], death["count"], row["death_count"]) == ("rejected", 1, 1)
    await conn.close()


async def _dead_letter_past_the_limit(settings: Settings, conn: asyncpg.Connection, redrives: int):
    """One event in the outbox, published (its message confirmed) after ``redrives`` redrives,
    whose message came back to the dispatch queue until the broker dead-lettered it past
    x-delivery-limit (1 here), as connection flaps or a crashing worker do."""
    await publish_many(conn, [trade(1, id="evt_past_limit")])
    rows = await conn.fetch(relay_module._CLAIM, 10)
    (out,) = pack_rows(rows, per_message=50)
    await conn.execute(
        "UPDATE delivery.outbox SET published_at = clock_timestamp(), redrives = $1", redrives
    )
    connection = await aio_pika.connect(settings.amqp_url)
    channel = await connection.channel()
    topology = await declare(channel, Names(settings.amqp_prefix), delivery_limit=1)
    await topology.events.publish(out.message, routing_key=out.routing_key)
    for _ in range(10):
        message = await topology.dispatch.get(timeout=5, fail=False)
        if message is None:
            break
        await message.nack(requeue=True)
    assert await topology.dispatch.get(timeout=5, fail=False) is None
    await connection.close()


# Either way the dead letter goes: recorded as poison, or sent through the outbox again.
_HANDLED = """
SELECT (SELECT count(*) FROM delivery.poison_messages) > 0
    OR (SELECT redrives <> $1 OR published_at IS NULL FROM delivery.outbox)
"""


async def test_an_event_past_the_delivery_limit_with_redrives_left_is_sent_again_not_poison(
    settings,
):
    settings = settings.model_copy(update={"amqp_delivery_limit": 1, "max_redrives": 2})
    conn = await asyncpg.connect(settings.database_url)
    await _dead_letter_past_the_limit(settings, conn, redrives=1)
    async with running(settings, relay=False):
        await wait_until(
            lambda: conn.fetchval(_HANDLED, 1), timeout_s=30, what="the dead letter handled"
        )
    row = await conn.fetchrow("SELECT redrives, published_at FROM delivery.outbox")
    # Back in the relay's path (no relay runs here, so it waits there unpublished)
    assert (row["redrives"], row["published_at"]) == (2, None)
    assert await conn.fetchval("SELECT count(*) FROM delivery.poison_messages") == 0
    await conn.close()


async def test_an_event_past_the_delivery_limit_with_no_redrives_left_is_recorded_as_poison(
    settings,
):
    settings = settings.model_copy(update={"amqp_delivery_limit": 1, "max_redrives": 2})
    conn = await asyncpg.connect(settings.database_url)
    await _dead_letter_past_the_limit(settings, conn, redrives=2)
    async with running(settings, relay=False):
        await wait_until(
            lambda: conn.fetchval(_HANDLED, 2), timeout_s=30, what="the dead letter handled"
        )
    # Not sent through the outbox once more
    row = await conn.fetchrow("SELECT redrives, published_at FROM delivery.outbox")
    assert row["redrives"] == 2 and row["published_at"] is not None
    # but recorded as poison, with the reason
    reasons = [r["reason"] for r in await conn.fetch("SELECT reason FROM delivery.poison_messages")]
    assert reasons == ["redelivered past x-delivery-limit (crash loop?)"]
    assert await conn.fetchval("SELECT count(*) FROM delivery.inbox") == 0
    await conn.close()
