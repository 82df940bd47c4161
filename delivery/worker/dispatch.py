"""Dispatch: consume events from RabbitMQ and fan each out to its matching subscriptions.

A batch of messages is one statement: the inbox row (idempotency: a redelivered event finds its
row and creates nothing), and one delivery row per (event, subscription). Messages are acked only
after it commits, so the outcome is durable first. Deliveries this process has capacity
for are leased to it in the same insert and attempted at once; the rest wait in PostgreSQL for
the scheduler. The capacity is reserved before the statement (whose retries keep it) and given
back by the reservations' ``with`` block unless the deliverer took it over.

The broker is a doorbell, not the truth: a message only says which events to dispatch. Each
event's body, type, account, trace context and creation time are read from its outbox row
(with the subscriptions' version, on one pooled connection), so anyone able to publish on the
events exchange cannot have a webhook signed. A message naming an event the outbox does not hold was
not sent by a relay: it is rejected as poison, and the dead-letter consumer records it with
that reason. The outbox row also says whose event it is: it is matched only to subscriptions
of its own tenant, from this process's in-memory index (``delivery.worker.feed``), brought up
to date with every subscription change committed before the outbox rows were read.
"""

from __future__ import annotations

import asyncio
import contextlib
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import asyncpg
import structlog
from aio_pika.abc import AbstractIncomingMessage, AbstractQueue, AbstractRobustConnection
from aio_pika.exceptions import ChannelInvalidStateError

from delivery.aio import wait_any
from delivery.broker.connection import SETUP_TIMEOUT_S, connect, is_connected, watch_node
from delivery.broker.depths import watch_depths
from delivery.broker.topology import Names, declare
from delivery.broker.wire import WireEvent, decode, event_count
from delivery.errors import PoisonMessageError
from delivery.events import RoutingFacts, envelope_from_row, render_body
from delivery.ops import metrics
from delivery.ops.health import Health
from delivery.settings import Settings, node_urls
from delivery.store.pool import is_connection_error, with_retries
from delivery.store.states import SubscriptionState
from delivery.store.subscriptions import Subscription
from delivery.worker.capacity import Reservation, Reservations
from delivery.worker.deliverer import Deliverer
from delivery.worker.feed import SubscriptionFeed
from delivery.worker.index import SubscriptionIndex
from delivery.worker.jobs import Job, lease_for
from delivery.worker.scheduler import Scheduler

log = structlog.get_logger("delivery.dispatch")

_DB_RETRY_DEADLINE_S = 30.0
_DB_PAUSE_S = 2.0

# The events a batch names, as the outbox holds them (what dispatch delivers), and the version of
# the subscriptions as of this read: the index is brought to it before matching (see feed.py).
_OUTBOX_ROWS = """
SELECT v.version AS subscriptions_version, o.event_id, o.tenant_id, o.type, o.account_id,
       o.sequence, o.occurred_at, o.data::text AS data, o.traceparent,
       extract(epoch FROM o.created_at)::float8 AS created_at_s
FROM delivery.subscriptions_version v
LEFT JOIN delivery.outbox o ON o.event_id = ANY($1::text[])
"""
# The inbox rows and the deliveries of the events that were new to it, in one statement (atomic
# on its own: no BEGIN and COMMIT round trips). A redelivered event finds its inbox row, counts
# the redelivery and creates nothing. $7: each event's further copies in this very batch (a
# redriven copy next to its original), redeliveries as well. $8, $9: the account and sequence of
# an ordered subscription's delivery (NULL otherwise): it is created held (never due) and
# migration 0022's trigger releases it when it is its account's head.
_RECORD = """
WITH inbox AS (
    INSERT INTO delivery.inbox (event_id, redeliveries)
    SELECT * FROM unnest($1::text[], $7::int[])
    ON CONFLICT (event_id)
    DO UPDATE SET redeliveries = delivery.inbox.redeliveries + 1 + excluded.redeliveries
    RETURNING event_id, (xmax = 0) AS fresh
),
created AS (
    INSERT INTO delivery.deliveries
        (event_id, subscription_id, state, lease_until, dead_at, dead_reason, next_attempt_at,
         account_id, sequence)
    SELECT e, s, CASE WHEN dead THEN 'dead' ELSE 'pending' END,
           CASE WHEN leased THEN clock_timestamp() + make_interval(secs => lease_s) END,
           CASE WHEN dead THEN clock_timestamp() END,
           CASE WHEN dead THEN 'subscription disabled' END,
           CASE WHEN account IS NOT NULL AND NOT dead THEN 'infinity' ELSE clock_timestamp() END,
           account, seq
    FROM unnest($2::text[], $3::text[], $4::bool[], $5::bool[], $6::float8[], $8::text[],
                $9::bigint[])
         AS t(e, s, leased, dead, lease_s, account, seq)
    JOIN inbox ON inbox.event_id = t.e AND inbox.fresh
    ON CONFLICT (event_id, subscription_id) DO NOTHING
    RETURNING id, event_id, subscription_id
)
SELECT event_id, fresh, NULL::bigint AS id, NULL::text AS subscription_id FROM inbox
UNION ALL
SELECT event_id, NULL, id, subscription_id FROM created
"""


def _from_outbox(row: Any) -> WireEvent:
    """An event as its outbox row holds it: the body every attempt sends, byte for byte."""
    facts = RoutingFacts(id=row["event_id"], type=row["type"], account_id=row["account_id"])
    body = render_body(envelope_from_row(row))
    return WireEvent(facts, body, row["created_at_s"], row["traceparent"])


@dataclass(frozen=True, slots=True)
class _Pair:
    event: WireEvent
    subscription: Subscription
    reservation: Reservation | None  # attempted at once: leased to this process
    dead: bool  # the subscription is disabled: kept as a dead letter, never attempted


@dataclass(frozen=True, slots=True)
class _Committed:
    pairs: list[_Pair]
    created: dict[tuple[str, str], int]  # the delivery rows this batch created, by pair
    fresh: int  # events new to the inbox
    events: int  # events of the messages that were ours, copies included
    not_ours: dict[int, str]  # index of a message naming an event the outbox lacks: that event


class Dispatcher:
    def __init__(
        self,
        settings: Settings,
        pool: asyncpg.Pool,
        deliverer: Deliverer,
        scheduler: Scheduler,
        health: Health,
    ) -> None:
        self._settings = settings
        self._pool = pool
        self._deliverer = deliverer
        self._capacity = deliverer.capacity
        self._scheduler = scheduler
        self._health = health
        self._names = Names(settings.amqp_prefix)
        self._received: asyncio.Queue[AbstractIncomingMessage] = asyncio.Queue()
        self._dispatching = 0  # messages of the batch being dispatched
        self._arrived = asyncio.Event()
        self._connection: AbstractRobustConnection | None = None
        self._queue: AbstractQueue | None = None
        self._feed = SubscriptionFeed(
            settings.database_url, deliverer.box, resync_s=settings.subscription_resync_s
        )
        health.register("dispatch")

    async def run(self, stop: asyncio.Event) -> None:
        # After a restart by the supervisor, messages of the old channel cannot be acked; the
        # broker has requeued them already.
        while not self._received.empty():
            self._received.get_nowait()
        url = self._settings.amqp_url
        self._connection = await connect(url, name="delivery-worker", stop=stop)
        try:
            async with asyncio.timeout(SETUP_TIMEOUT_S):
                channel = await self._connection.channel()
                await channel.set_qos(prefetch_count=self._settings.worker_prefetch)
                topology = await declare(
                    channel,
                    self._names,
                    delivery_limit=self._settings.amqp_delivery_limit,
                    nodes=len(node_urls(url)),
                )
                self._queue = topology.dispatch
                tag = await topology.dispatch.consume(self._on_message)
            self._health.set("dispatch", True)
            async with asyncio.TaskGroup() as tg:
                depths = tg.create_task(watch_depths(self._connection, self._names, stop))
                # Raises when the node is lost and others are listed: the batch in progress is
                # cancelled (its reservations given back, its messages requeued by the broker)
                # and the supervisor starts dispatch again on another node.
                watch = tg.create_task(
                    watch_node(self._connection, url, name="delivery-worker", stop=stop)
                )
                listen = tg.create_task(self._feed.listen(stop))
                await self._loop(stop)
                depths.cancel()
                watch.cancel()
                listen.cancel()
            # Drain: stop taking work, hand back what we hold but have not dispatched.
            with contextlib.suppress(Exception):
                await asyncio.wait_for(topology.dispatch.cancel(tag), 5)
            await self._hand_back_unprocessed()
        finally:
            self._health.set("dispatch", False)
            await self._connection.close()

    async def _on_message(self, message: AbstractIncomingMessage) -> None:
        self._received.put_nowait(message)
        self._arrived.set()

    async def _loop(self, stop: asyncio.Event) -> None:
        while not stop.is_set():
            self._arrived.clear()
            if self._received.empty():
                self._health.set("dispatch", is_connected(self._connection))
                await wait_any(stop, self._arrived, timeout_s=1.0)
                continue
            # A batch is up to dispatch_batch_size events, whether they came one per message or
            # packed (a pack is never split: it is acked as one).
            batch: list[AbstractIncomingMessage] = []
            events = 0
            while not self._received.empty() and events < self._settings.dispatch_batch_size:
                message = self._received.get_nowait()
                batch.append(message)
                events += event_count(message)
            self._dispatching = len(batch)
            try:
                await self.dispatch_batch(batch, stop)
            finally:
                self._dispatching = 0

    def held(self) -> int:
        """Messages received from the broker and not answered yet (acked, nacked, rejected)."""
        return self._received.qsize() + self._dispatching

    async def dispatch_batch(
        self, messages: list[AbstractIncomingMessage], stop: asyncio.Event
    ) -> None:
        parsed: list[WireEvent] = []
        accepted: list[AbstractIncomingMessage] = []
        named: list[list[str]] = []  # the event ids each accepted message names
        for message in messages:
            try:
                events = decode(message)
            except PoisonMessageError as exc:
                await self._reject_poison(message, str(exc), "unparseable")
            else:
                parsed.extend(events)
                accepted.append(message)
                named.append([e.facts.id for e in events])
        if not parsed:
            return
        if self._settings.dangerous_ack_before_commit:
            for message in accepted:
                await _settle(message.ack())
        while True:
            # Whatever the deliverer did not take over is given back at the end of the block:
            # after a failed commit, a cancellation (the supervisor restarts dispatch when its
            # AMQP connection dies mid-batch), or for a pair that created no delivery.
            with self._capacity.reservations() as held:
                try:
                    done = await self._commit(named, held)
                except Exception as exc:
                    if not await self._hold_for_database(exc, parsed, accepted, stop):
                        return
                else:
                    await self._answer(accepted, done.not_ours)
                    metrics.EVENTS_DISPATCHED.inc(done.fresh)
                    metrics.DUPLICATES_ABSORBED.inc(done.events - done.fresh)
                    self._start_attempts(done.pairs, done.created, held)
                    return
            await wait_any(stop, timeout_s=_DB_PAUSE_S)

    async def _answer(
        self, accepted: list[AbstractIncomingMessage], not_ours: dict[int, str]
    ) -> None:
        """After the commit: ack the batch's messages, and reject as poison each one that named
        an event the outbox lacks."""
        if self._settings.dangerous_ack_before_commit:
            return  # acked before the commit
        for index, message in enumerate(accepted):
            if (event_id := not_ours.get(index)) is None:
                await _settle(message.ack())
            else:
                reason = f"event {event_id} has no outbox row: no relay sent it"
                await self._reject_poison(message, reason, "no_outbox_row")

    async def _hold_for_database(
        self,
        exc: Exception,
        parsed: list[WireEvent],
        messages: list[AbstractIncomingMessage],
        stop: asyncio.Event,
    ) -> bool:
        """After a failed commit: ``True`` to hold the batch and try again, ``False`` once it
        was handed back to the broker."""
        if not (is_connection_error(exc) and not stop.is_set()):
            # Not acked: the broker redelivers them (to us or another worker) later.
            log.exception("dispatch_failed", messages=len(messages), events=len(parsed))
            if not self._settings.dangerous_ack_before_commit:
                for message in messages:
                    await _settle(message.nack(requeue=True))
            return False
        # PostgreSQL is away: hold the batch (unacked, bounded by the prefetch) and keep
        # trying. A nack would count toward x-delivery-limit, and a long outage would turn
        # healthy events into poison messages.
        self._health.set("dispatch", False)
        log.warning("dispatch_waiting_for_database", error=repr(exc)[:200])
        return True

    async def _commit(self, named: list[list[str]], held: Reservations) -> _Committed:
        """Read the events the messages name from the outbox, match them to the subscriptions,
        reserve capacity for the deliveries to attempt at once, and commit the inbox and
        delivery rows (a retry keeps the reservations). Pairs of an event the inbox has seen
        before create nothing; a message naming an event the outbox lacks dispatches nothing."""
        ids = sorted({i for message in named for i in message})

        async def read(conn: asyncpg.Connection) -> tuple[list[Any], SubscriptionIndex]:
            rows = await conn.fetch(_OUTBOX_ROWS, ids)
            version = rows[0]["subscriptions_version"]
            known = await self._feed.current(conn, version)
            return [r for r in rows if r["event_id"] is not None], known

        outbox_rows, known = await with_retries(
            self._pool, read, what="dispatch", deadline_s=_DB_RETRY_DEADLINE_S, transaction=False
        )
        now = datetime.now(UTC)
        stored = {r["event_id"]: r for r in outbox_rows}
        not_ours: dict[int, str] = {}
        copies: dict[str, int] = {}  # a repeat inside the batch is the same event
        for index, message in enumerate(named):
            if missing := [i for i in message if i not in stored]:
                not_ours[index] = missing[0]
                continue
            for event_id in message:
                copies[event_id] = copies.get(event_id, 0) + 1
        events = [_from_outbox(stored[i]) for i in copies]
        pairs: list[_Pair] = []
        for event in events:
            facts = event.facts
            # Tenant isolation: only the event's own tenant's subscriptions are candidates.
            tenant_id = stored[facts.id]["tenant_id"]
            for sub in known.match(tenant_id, facts.type, facts.account_id):
                active = sub.state == SubscriptionState.ACTIVE
                # An open circuit's deliveries wait in PostgreSQL for the scheduler's probe,
                # a paused subscriber's (429) for the end of its pause, and an operator's
                # paused subscription's for its resume.
                paused = sub.paced(now) or self._deliverer.pacer.paused(sub.id)
                # An ordered subscription's delivery is never attempted here: whether it is
                # its account's head is for the trigger to say, in the commit.
                attempt_now = active and not sub.circuit_open and not paused and not sub.ordered
                reservation = held.reserve(sub.id) if attempt_now else None
                dead = sub.state == SubscriptionState.DISABLED
                pairs.append(_Pair(event, sub, reservation, dead=dead))
        arrays = (
            [e.facts.id for e in events],
            [p.event.facts.id for p in pairs],
            [p.subscription.id for p in pairs],
            [p.reservation is not None for p in pairs],
            [p.dead for p in pairs],
            [lease_for(self._settings, p.subscription) for p in pairs],
            [copies[e.facts.id] - 1 for e in events],
            [p.event.facts.account_id if p.subscription.ordered else None for p in pairs],
            [stored[p.event.facts.id]["sequence"] if p.subscription.ordered else None
             for p in pairs],
        )
        rows = await with_retries(
            self._pool,
            lambda conn: conn.fetch(_RECORD, *arrays),
            what="dispatch",
            deadline_s=_DB_RETRY_DEADLINE_S,
            transaction=False,
        )
        return _Committed(
            pairs=pairs,
            created={
                (r["event_id"], r["subscription_id"]): r["id"] for r in rows if r["id"] is not None
            },
            fresh=sum(1 for r in rows if r["fresh"]),
            events=sum(copies.values()),
            not_ours=not_ours,
        )

    def _start_attempts(
        self, pairs: list[_Pair], created: dict[tuple[str, str], int], held: Reservations
    ) -> None:
        """Attempt the deliveries leased to us now; tell the scheduler about the others."""
        backlog = False
        for pair in pairs:
            delivery_id = created.get((pair.event.facts.id, pair.subscription.id))
            if pair.dead:
                continue
            if pair.reservation is None:
                backlog = backlog or delivery_id is not None
                continue
            if delivery_id is None:
                continue  # its reservation is given back with the batch's
            job = Job(
                delivery_id=delivery_id,
                event_id=pair.event.facts.id,
                subscription=pair.subscription,
                body=pair.event.body,
                attempt=1,
                created_at_s=pair.event.created_at_s,
                traceparent=pair.event.traceparent,
            )
            self._deliverer.submit(job, held.hand_over(pair.reservation))
        if backlog:
            self._scheduler.note_backlog()

    async def _reject_poison(
        self, message: AbstractIncomingMessage, reason: str, kind: str
    ) -> None:
        # Not requeued: the dead-letter exchange routes it to the dead-letter queue, where it is
        # kept with the reason instead of blocking this queue.
        metrics.POISON_MESSAGES.labels(kind).inc()
        log.warning("poison_message", reason=reason, kind=kind, message_id=message.message_id)
        await _settle(message.reject(requeue=False))

    async def _hand_back_unprocessed(self) -> None:
        while not self._received.empty():
            await _settle(self._received.get_nowait().nack(requeue=True))


async def _settle(answer: object) -> None:
    """Ack/nack/reject, tolerating a channel that died meanwhile: the broker has already
    requeued the message, and the redelivery is absorbed by the inbox."""
    try:
        await answer  # type: ignore[misc]
    except ChannelInvalidStateError as exc:
        log.info("settle_on_closed_channel", error=str(exc))
    except Exception as exc:
        log.warning("settle_failed", error=repr(exc)[:200])
