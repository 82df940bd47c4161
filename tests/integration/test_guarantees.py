"""The README's guarantees, one test each, each written to fail when its promise breaks.

Every test here runs on the real PostgreSQL and RabbitMQ, injects its fault deterministically
(a table or row lock held from another connection, an unbound queue, a scripted subscriber) and
waits for conditions with deadlines; none bounds wall time from above. The mutants of
``tests/mutation/catalogue.py`` that each one kills are named in its docstring.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from datetime import UTC, datetime

import aio_pika
import asyncpg
import pytest
from aiohttp import web
from standardwebhooks.webhooks import Webhook, WebhookVerificationError

from delivery import publish, publish_many
from delivery.broker.relay import Relay
from delivery.broker.topology import Names, declare
from delivery.ops.health import Health
from delivery.settings import Settings
from delivery.store import subscriptions
from delivery.store.pool import create_pool
from delivery.testing.factories import balance, trade
from delivery.testing.metrics import counter_value
from delivery.testing.receiver import Arrival, Behaviour, Receiver, scripted_subscriber
from delivery.testing.waits import wait_until
from delivery.worker.deliverer import Deliverer
from delivery.worker.jobs import subscription_hold_cap
from delivery.worker.outcomes import AttemptOutcome, OutcomeRecorder
from delivery.worker.retry import Decision, Outcome
from delivery.worker.scheduler import Scheduler
from delivery.worker.sender import AttemptResult, Sender
from tests.support import hand_driven_dispatcher, running

pytestmark = pytest.mark.integration


# -- helpers ------------------------------------------------------------------------------------


async def backends_waiting_for_a_lock(conn: asyncpg.Connection) -> int:
    return int(
        await conn.fetchval(
            "SELECT count(*) FROM pg_stat_activity"
            " WHERE datname = current_database() AND wait_event_type = 'Lock'"
        )
    )


def standard_headers(arrival: Arrival) -> dict[str, str]:
    return {
        "webhook-id": arrival.webhook_id,
        "webhook-timestamp": arrival.webhook_timestamp,
        "webhook-signature": arrival.signature_header,
    }


@contextlib.asynccontextmanager
async def worker_parts(
    settings: Settings, pool: asyncpg.Pool, count: int = 1
) -> AsyncIterator[list[Scheduler]]:
    """``count`` schedulers, each with a running deliverer of its own (as in ``count`` worker
    processes), driven by the test through ``claim_once``."""
    stop, force = asyncio.Event(), asyncio.Event()
    async with Sender(
        max_connections=8,
        connect_timeout_s=2,
        timeout_s=10,
        excerpt_bytes=100,
        allow_private_targets=True,
    ) as sender:
        deliverers = [Deliverer(settings, pool, sender) for _ in range(count)]
        runs = [asyncio.create_task(d.run(stop, force)) for d in deliverers]
        await asyncio.sleep(0)  # each deliverer now owns its task group and takes jobs
        try:
            yield [Scheduler(settings, pool, d, Health()) for d in deliverers]
        finally:
            stop.set()
            await asyncio.wait_for(asyncio.gather(*runs), 30)


# -- dispatch: ack only after the commit ---------------------------------------------------------


async def test_a_message_is_acked_only_after_its_batch_commits_so_a_crash_in_between_loses_nothing(
    settings,
):
    """Kills dispatch-ack-before-commit: the dispatcher dies while its commit waits; the event
    must still be in the broker, and a worker started afterwards delivers it."""
    # The relay's redrive sweep must not be what brings a lost event back.
    settings = settings.model_copy(update={"redrive_after_s": 3600.0})
    conn = await asyncpg.connect(settings.database_url)
    async with Receiver() as receiver:
        await subscriptions.add(conn, url=receiver.url("/h"), patterns="*")
        await publish(conn, trade(1, id="evt_commit_blocked"))
        async with running(settings, worker=False):  # the event reaches the dispatch queue
            await wait_until(
                lambda: conn.fetchval("SELECT published_at IS NOT NULL FROM delivery.outbox"),
                timeout_s=30,
                what="the event published",
            )
        blocker = await asyncpg.connect(settings.database_url)
        async with hand_driven_dispatcher(settings) as (_deliverer, dispatcher):
            # Given the dispatch commit cannot go through (its inbox insert waits for a lock)
            await blocker.execute("BEGIN; LOCK TABLE delivery.inbox IN EXCLUSIVE MODE")
            dispatching = asyncio.create_task(dispatcher.run(asyncio.Event()))
            await wait_until(
                lambda: backends_waiting_for_a_lock(conn),
                timeout_s=30,
                what="the dispatch commit waiting for the inbox lock",
            )
            # When the dispatcher dies right there (its AMQP connection closes with it)
            dispatching.cancel()
            with pytest.raises(asyncio.CancelledError):
                await dispatching
            await blocker.execute("ROLLBACK")
        await blocker.close()
        assert await conn.fetchval("SELECT count(*) FROM delivery.inbox") == 0
        # Then the broker still has the event, and the next worker delivers it
        async with running(settings, relay=False):
            await receiver.wait_for(
                lambda r: "evt_commit_blocked" in r.unique_ids(),
                timeout_s=30,
                what="the event delivered by the next worker",
            )
    await conn.close()


# -- relay: only confirmed rows are marked published ---------------------------------------------


async def test_a_returned_publish_is_never_marked_published_and_goes_out_once_routable(settings):
    """Kills relay-not-mandatory (the broker confirms an unroutable message: marked published,
    dropped) and relay-marks-unconfirmed (a batch with one confirmed message marks all its
    rows): of a batch with a routable and an unroutable message, only the routable one's row
    is marked published, and the other goes out once the route is back."""
    settings = settings.model_copy(update={"redrive_after_s": 3600.0, "relay_concurrency": 1})
    conn = await asyncpg.connect(settings.database_url)
    blocker = await asyncpg.connect(settings.database_url)
    pool = await asyncpg.create_pool(settings.database_url, min_size=1, max_size=2)
    connection = await aio_pika.connect(settings.amqp_url)
    channel = await connection.channel()
    topology = await declare(channel, Names(settings.amqp_prefix), delivery_limit=20)
    health = Health()
    stop = asyncio.Event()

    def returned() -> float:
        return counter_value("delivery_relay_publish_failures_total", reason="returned")

    published = "SELECT published_at IS NOT NULL FROM delivery.outbox WHERE event_id = $1"

    async with asyncio.TaskGroup() as tg:
        tg.create_task(Relay(settings, pool, health).run(stop))
        await wait_until(lambda: health.ready, timeout_s=30, what="relay ready")
        # Given only trades have a route to the dispatch queue (an operator changed the binding)
        await topology.dispatch.bind(topology.events, routing_key="trade.*")
        await topology.dispatch.unbind(topology.events, routing_key="#")
        before = returned()
        # and one batch with a trade and a balance event (one message each: two event types)
        await publish_many(conn, [trade(1, id="evt_routed"), balance(1, id="evt_no_route")])

        async def returned_or_marked() -> bool:
            return returned() > before or bool(await conn.fetchval(published, "evt_no_route"))

        await wait_until(returned_or_marked, timeout_s=30, what="the balance event returned")
        # When the relay's batch is over: the row lock is ours once its transaction ends, and
        # while we hold it no later batch can claim the row (SKIP LOCKED)
        lock = blocker.transaction()
        await lock.start()
        marked = await blocker.fetchval(
            "SELECT published_at FROM delivery.outbox WHERE event_id = 'evt_no_route' FOR UPDATE"
        )
        # Then the confirmed row is marked published, the returned one is not
        assert await conn.fetchval(published, "evt_routed")
        assert marked is None, "an unroutable event was marked published"
        await lock.rollback()
        await topology.dispatch.bind(topology.events, routing_key="#")
        await wait_until(
            lambda: conn.fetchval(published, "evt_no_route"),
            timeout_s=30,
            what="published once the route is back",
        )
        stop.set()
    for _ in range(2):  # both reached the queue
        await (await topology.dispatch.get(timeout=10)).ack()
    await connection.close()
    await pool.close()
    await blocker.close()
    await conn.close()


# -- Retry-After ----------------------------------------------------------------------------------


async def test_a_retry_after_holds_the_next_attempt_back_at_least_that_long(settings):
    """Kills sender-drops-retry-after and deliverer-drops-retry-after: a 503 with
    ``Retry-After: 2`` on a 0.2 s schedule puts the next attempt at least 2 s later."""
    # The schedule's longest step (3 s) is above the Retry-After, so the cap does not hide it.
    settings = settings.model_copy(update={"retry_schedule_s": (0.2, 3.0)})
    conn = await asyncpg.connect(settings.database_url)
    async with Receiver() as receiver:
        receiver.set_behaviour("/busy", Behaviour(status=503, retry_after="2"))
        await subscriptions.add(conn, url=receiver.url("/busy"), patterns="*")
        async with running(settings):
            await publish(conn, trade(1, id="evt_busy"))
            await receiver.wait_for(lambda r: len(r.arrivals) == 1, timeout_s=30, what="a POST")
            receiver.set_behaviour("/busy", Behaviour())  # the next attempt succeeds
            wait_s: list[float] = []

            async def first_failure_recorded() -> bool:
                gap = await conn.fetchval(
                    "SELECT extract(epoch FROM next_attempt_at - last_attempt_at)::float8"
                    " FROM delivery.deliveries WHERE attempts = 1 AND state = 'pending'"
                )
                if gap is not None:
                    wait_s.append(gap)
                return gap is not None

            await wait_until(first_failure_recorded, timeout_s=30, what="the retry scheduled")
            assert wait_s[0] >= 2.0, f"next attempt scheduled {wait_s[0]:.2f}s after the 503"
            await receiver.wait_for(
                lambda r: len(r.delivered()) == 1, timeout_s=30, what="the retry delivered"
            )
        first, second = receiver.arrivals
        # Both times are this machine's clock: the retry came no earlier than asked.
        assert second.arrived_at - first.arrived_at >= 1.95
    await conn.close()


# -- secret rotation and Standard Webhooks signatures ----------------------------------------------


async def test_during_a_rotation_both_secrets_verify_and_after_its_grace_only_the_new_one(
    settings,
):
    """Verified with the official ``standardwebhooks`` library, not our own verifier. Kills
    rotation-new-secret-only, rotation-grace-never-ends, sign-content-without-dot and
    sign-joined-by-comma."""
    conn = await asyncpg.connect(settings.database_url)
    async with Receiver() as receiver:
        sub = await subscriptions.add(conn, url=receiver.url("/h"), patterns="*")
        old = sub.secret
        rotated = await subscriptions.rotate_secret(
            conn, sub.id, grace_s=settings.secret_rotation_grace_s
        )
        new = rotated.secret
        assert new != old
        async with running(settings):
            await publish(conn, trade(1, id="evt_in_grace"))
            await receiver.wait_for(lambda r: len(r.delivered()) == 1, timeout_s=30, what="one")
            in_grace = receiver.delivered()[0]
            # A subscriber still on the old secret and one already on the new both accept it.
            for secret in (old, new):
                payload = Webhook(secret).verify(in_grace.body, standard_headers(in_grace))
                assert payload["id"] == "evt_in_grace"

            # The grace period is over (as if a day had passed).
            await conn.execute(
                "UPDATE delivery.subscriptions"
                " SET previous_secret_expires_at = now() - interval '1 second' WHERE id = $1",
                sub.id,
            )
            await publish(conn, trade(2, id="evt_after_grace"))
            await receiver.wait_for(lambda r: len(r.delivered()) == 2, timeout_s=30, what="two")
            after = receiver.delivered()[1]
            assert after.webhook_id == "evt_after_grace"
            Webhook(new).verify(after.body, standard_headers(after))
            with pytest.raises(WebhookVerificationError):
                Webhook(old).verify(after.body, standard_headers(after))
    await conn.close()


# -- circuit breaker ----------------------------------------------------------------------------


async def test_the_circuit_opens_at_exactly_the_threshold_and_a_new_event_waits_for_the_probe(
    settings,
):
    """Kills circuit-opens-late (closed after N failures) and dispatch-ignores-open-circuit (a
    fresh event is POSTed at once although the circuit is open)."""
    settings = settings.model_copy(
        update={
            "circuit_failure_threshold": 3,
            # Long enough that a dispatch ignoring the open circuit POSTs well before the probe
            # even on a loaded machine (the mutant is caught by how early it came).
            "circuit_cooldown_s": 5.0,
            "retry_schedule_s": (60.0,),  # each failed event waits out of the way
        }
    )
    conn = await asyncpg.connect(settings.database_url)
    async with Receiver() as receiver:
        receiver.set_behaviour("/down", Behaviour(status=503))
        down = await subscriptions.add(conn, url=receiver.url("/down"), patterns="*")
        await subscriptions.add(conn, url=receiver.url("/up"), patterns="*")  # a fence
        circuit = (
            "SELECT circuit_state, consecutive_failures FROM delivery.subscriptions WHERE id = $1"
        )
        async with running(settings):
            for i in range(1, 4):
                await publish(conn, trade(i, id=f"evt_fail_{i}"))
                await wait_until(
                    lambda i=i: conn.fetchval(
                        "SELECT attempts = 1 FROM delivery.deliveries"
                        " WHERE subscription_id = $1 AND event_id = $2",
                        down.id,
                        f"evt_fail_{i}",
                    ),
                    timeout_s=30,
                    what=f"failure {i} recorded",
                )
                state, failures = await conn.fetchrow(circuit, down.id)
                assert failures == i
                assert state == ("open" if i == 3 else "closed"), f"after {i} failures: {state}"
            retry_at = await conn.fetchval(
                "SELECT circuit_retry_at FROM delivery.subscriptions WHERE id = $1", down.id
            )
            # A fresh event while the circuit is open: the healthy subscriber gets it at once,
            # the failing one only from the probe at the end of the cooldown.
            await publish(conn, trade(4, id="evt_while_open"))
            await receiver.wait_for(
                lambda r: "evt_while_open" in r.unique_ids("/up"), timeout_s=30, what="the fence"
            )
            await receiver.wait_for(
                lambda r: any(
                    a.path == "/down" and a.webhook_id == "evt_while_open" for a in r.arrivals
                ),
                timeout_s=30,
                what="the probe",
            )
        probe = next(
            a for a in receiver.arrivals if a.path == "/down" and a.webhook_id == "evt_while_open"
        )
        early_s = retry_at.timestamp() - probe.arrived_at
        assert early_s <= 0.05, f"POSTed {early_s:.2f}s before the circuit's cooldown ended"
    await conn.close()


async def test_only_one_worker_probes_an_open_circuit_per_cooldown(settings):
    """Two workers claim at the same moment, each one due delivery of an open circuit whose
    cooldown is over; only the one that takes the probe POSTs, the other hands its row back.
    Kills scheduler-ignores-circuit. The race is made certain by holding the subscription's
    row lock until both have claimed."""
    settings = settings.model_copy(update={"circuit_cooldown_s": 60.0})
    conn = await asyncpg.connect(settings.database_url)
    blocker = await asyncpg.connect(settings.database_url)
    pool = await create_pool(settings.database_url, min_size=1, max_size=6)
    async with Receiver() as receiver:
        sub = await subscriptions.add(conn, url=receiver.url("/h"), patterns="*")
        await publish_many(conn, [trade(1, id="evt_due_1"), trade(2, id="evt_due_2")])
        await conn.execute(
            "INSERT INTO delivery.deliveries (event_id, subscription_id)"
            " SELECT event_id, $1 FROM delivery.outbox",
            sub.id,
        )
        # Given the circuit is open and its cooldown is over
        await conn.execute(
            "UPDATE delivery.subscriptions SET circuit_state = 'open', consecutive_failures = 5,"
            " circuit_retry_at = clock_timestamp() - interval '1 second' WHERE id = $1",
            sub.id,
        )
        async with worker_parts(settings, pool, count=2) as schedulers:
            lock = blocker.transaction()
            await lock.start()
            await blocker.execute(
                "SELECT 1 FROM delivery.subscriptions WHERE id = $1 FOR UPDATE", sub.id
            )
            # When both workers claim before either has taken the probe
            claims = []
            for n, scheduler in enumerate(schedulers, start=1):
                claims.append(asyncio.create_task(scheduler.claim_once(10)))
                await wait_until(
                    lambda n=n: _waiting_at_least(conn, n),
                    timeout_s=30,
                    what="the claim waiting to take the probe",
                )
            await lock.rollback()
            assert await asyncio.gather(*claims) == [1, 1]  # each claimed a row
            await wait_until(
                lambda: conn.fetchval(
                    "SELECT count(*) FILTER (WHERE state = 'delivered') >= 1"
                    " AND count(*) FILTER (WHERE lease_until IS NOT NULL) = 0"
                    " FROM delivery.deliveries"
                ),
                timeout_s=30,
                what="the probe recorded and every lease settled",
            )
        # Then one POST went out; the other delivery waits, unattempted and not leased
        assert len(receiver.arrivals) == 1
        assert await conn.fetchval("SELECT sum(attempts) FROM delivery.deliveries") == 1
    await pool.close()
    await blocker.close()
    await conn.close()


async def _waiting_at_least(conn: asyncpg.Connection, n: int) -> bool:
    return await backends_waiting_for_a_lock(conn) >= n


# -- a recorded success is never POSTed again ----------------------------------------------------


async def test_a_late_outcome_never_turns_a_recorded_success_back_into_a_retry(settings):
    """A duplicate attempt (a lease taken over after a cut link) reports a 503 after the
    delivery was recorded delivered: the row stays delivered, so nobody POSTs it again.
    Kills outcome-overwrites-settled-row."""
    conn = await asyncpg.connect(settings.database_url)
    pool = await create_pool(settings.database_url, min_size=1, max_size=2)
    sub = await subscriptions.add(conn, url="http://127.0.0.1:9/h", patterns="*")
    await publish(conn, trade(1, id="evt_settled"))
    delivery_id = await conn.fetchval(
        "INSERT INTO delivery.deliveries (event_id, subscription_id, lease_until)"
        " VALUES ('evt_settled', $1, clock_timestamp() + interval '60 seconds') RETURNING id",
        sub.id,
    )
    recorder = OutcomeRecorder(settings, pool)
    now = datetime.now(UTC)
    await recorder.record(
        AttemptOutcome(
            delivery_id,
            sub.id,
            1,
            now,
            AttemptResult(status=200, error=None, duration_s=0.01),
            Decision(Outcome.DELIVERED),
        )
    )
    settled = "SELECT state, attempts, delivered_at, next_attempt_at FROM delivery.deliveries"
    before = dict(await conn.fetchrow(settled))
    assert before["state"] == "delivered"
    await recorder.record(
        AttemptOutcome(
            delivery_id,
            sub.id,
            2,
            now,
            AttemptResult(status=503, error=None, duration_s=0.01),
            Decision(Outcome.RETRY, delay_s=0.0),
        )
    )
    assert dict(await conn.fetchrow(settled)) == before
    await pool.close()
    await conn.close()


async def test_a_leased_delivery_is_not_claimed_by_another_worker_until_its_lease_ends(settings):
    """Kills scheduler-claims-leased."""
    conn = await asyncpg.connect(settings.database_url)
    pool = await create_pool(settings.database_url, min_size=1, max_size=4)
    async with Receiver() as receiver:
        sub = await subscriptions.add(conn, url=receiver.url("/h"), patterns="*")
        await publish(conn, trade(1, id="evt_leased"))
        # Given a due delivery leased to some worker for another minute
        await conn.execute(
            "INSERT INTO delivery.deliveries (event_id, subscription_id, lease_until)"
            " VALUES ('evt_leased', $1, clock_timestamp() + interval '60 seconds')",
            sub.id,
        )
        async with worker_parts(settings, pool) as (scheduler,):
            # Then another worker's claim leaves it alone
            assert await scheduler.claim_once(10) == 0
            # And once the lease is over (its worker died), it takes it and delivers
            await conn.execute(
                "UPDATE delivery.deliveries SET lease_until = clock_timestamp() - interval '1 second'"
            )
            assert await scheduler.claim_once(10) == 1
            await wait_until(
                lambda: conn.fetchval("SELECT state = 'delivered' FROM delivery.deliveries"),
                timeout_s=30,
                what="delivered after the lease ended",
            )
        assert [a.webhook_id for a in receiver.arrivals] == ["evt_leased"]
    await pool.close()
    await conn.close()


# -- bounded concurrency -------------------------------------------------------------------------


async def test_a_hanging_subscriber_holds_no_more_deliveries_than_its_share(settings):
    """Its request slots plus its queue, not one more, while the rest of its work waits in
    PostgreSQL. Kills capacity-cap-off-by-one."""
    settings = settings.model_copy(
        update={
            "per_subscription_max_in_flight": 1,
            "per_subscription_max_queued": 2,
            "max_in_flight": 64,
            "http_timeout_s": 30.0,
            "shutdown_timeout_s": 0.5,
        }
    )
    share = subscription_hold_cap(settings)
    assert share == 3
    conn = await asyncpg.connect(settings.database_url)
    async with Receiver() as receiver:
        receiver.set_behaviour("/hang", Behaviour(hang=True))
        await subscriptions.add(conn, url=receiver.url("/hang"), patterns="*")
        await publish_many(conn, [trade(i, id=f"evt_hold_{i}") for i in range(10)])
        async with running(settings):
            await wait_until(
                lambda: conn.fetchval("SELECT count(*) = 10 FROM delivery.deliveries"),
                timeout_s=30,
                what="every event dispatched",
            )
            await receiver.wait_for(lambda r: len(r.arrivals) == 1, timeout_s=30, what="a POST")
            held = await conn.fetchval(
                "SELECT count(*) FROM delivery.deliveries WHERE lease_until IS NOT NULL"
            )
            assert held == share
            assert len(receiver.arrivals) == 1
    await conn.close()


# -- the attempt's outcome is what the subscriber answered ----------------------------------------


@pytest.mark.parametrize("status", [302, 307])
async def test_a_redirect_is_the_attempts_outcome_and_is_never_followed(settings, status):
    """The signed body never goes where the subscriber's URL did not say. Kills
    sender-follows-redirects."""
    conn = await asyncpg.connect(settings.database_url)
    async with Receiver() as elsewhere:

        async def redirect(request: web.Request) -> web.Response:
            await request.read()
            return web.Response(status=status, headers={"Location": elsewhere.url("/target")})

        async with scripted_subscriber(redirect) as base:
            await subscriptions.add(conn, url=f"{base}/hook", patterns="*")
            async with running(settings):
                await publish(conn, trade(1, id="evt_redirected"))
                await wait_until(
                    lambda: conn.fetchval("SELECT state <> 'pending' FROM delivery.deliveries"),
                    timeout_s=30,
                    what="the delivery settled",
                )
        row = await conn.fetchrow("SELECT state, last_status, dead_reason FROM delivery.deliveries")
        assert dict(row) == {
            "state": "dead",
            "last_status": status,
            "dead_reason": f"HTTP {status}: not retryable",
        }
        assert await conn.fetchval("SELECT array_agg(status) FROM delivery.attempts") == [status]
        assert elsewhere.arrivals == []
    await conn.close()


async def test_only_an_excerpt_of_a_long_reply_is_stored(settings):
    """Kills sender-unbounded-excerpt."""
    settings = settings.model_copy(update={"response_excerpt_bytes": 100})
    reply = b"".join(b"line %05d of a very long error page\n" % i for i in range(5000))
    conn = await asyncpg.connect(settings.database_url)

    async def long_reply(request: web.Request) -> web.Response:
        await request.read()
        return web.Response(status=400, body=reply, content_type="text/plain")

    async with scripted_subscriber(long_reply) as base:
        await subscriptions.add(conn, url=f"{base}/hook", patterns="*")
        async with running(settings):
            await publish(conn, trade(1, id="evt_long_reply"))
            await wait_until(
                lambda: conn.fetchval("SELECT count(*) = 1 FROM delivery.attempts"),
                timeout_s=30,
                what="the attempt recorded",
            )
    excerpt = await conn.fetchval("SELECT response_excerpt FROM delivery.attempts")
    assert excerpt, "the reply's start is kept for on-call"
    assert len(excerpt.encode()) <= 100
    assert reply.startswith(excerpt.encode())
    await conn.close()
