"""The relay: outbox rows -> RabbitMQ, with publisher confirms, at least once.

One batch is one transaction: claim rows with ``FOR UPDATE SKIP LOCKED`` (so any number of relays
share the work), publish them persistent and ``mandatory``, packed several events of one type to
a message (``delivery.broker.wire``), and mark published only the rows whose message the broker
confirmed. A crash between the confirm and the commit republishes those rows: the
workers' inbox absorbs the duplicate. Wakes on LISTEN/NOTIFY; polls as a fallback because
notifications sent while the listener is disconnected are lost.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Sequence

import aio_pika
import asyncpg
import structlog
from aio_pika.abc import AbstractChannel, AbstractExchange, AbstractRobustConnection
from aiormq.exceptions import DeliveryError
from pamqp.commands import Basic

from delivery.aio import backoff_s, wait_any
from delivery.broker.connection import SETUP_TIMEOUT_S, connect, is_connected, watch_node
from delivery.broker.redrive import redrive_lost
from delivery.broker.topology import Names, declare
from delivery.broker.wire import Outgoing, pack_rows
from delivery.ops import metrics
from delivery.ops.health import Health
from delivery.settings import Settings, node_urls
from delivery.store.lag import DispatchFrontier, read_lag
from delivery.store.listen import Listener
from delivery.store.pool import is_connection_error
from delivery.store.status import outbox_backlog

log = structlog.get_logger("delivery.relay")

NOTIFY_CHANNEL = "delivery_outbox"

_CLAIM = """
SELECT pk, event_id, type, account_id, sequence, occurred_at, data::text AS data, traceparent,
       extract(epoch FROM created_at)::float8 AS created_at_s, redrives
FROM delivery.outbox
WHERE published_at IS NULL
ORDER BY pk
LIMIT $1
FOR UPDATE SKIP LOCKED
"""
# The mark need not wait for its fsync: if a crash loses it, the rows are simply published again
# and the workers' inbox absorbs the copies. It saves a disk flush per batch on the latency path
# of every event; the setting rides in the statement (a SET would be one more round trip) and
# lasts until this transaction's end.
_MARK = """
UPDATE delivery.outbox SET published_at = clock_timestamp()
FROM (SELECT set_config('synchronous_commit', 'off', true)) AS async_commit
WHERE pk = ANY($1::bigint[])
"""
_REDRIVE_EVERY_S = 15.0
# Batches in a row with rows to publish and not one confirm (a blocked broker, a queue without
# a leader) make the relay not ready: connected, but not doing its job.
_NOT_READY_AFTER_BATCHES = 2
# Only rows published within this window are considered: the sweep stays an index range scan.
_REDRIVE_WINDOW_S = 86_400.0


class Relay:
    def __init__(self, settings: Settings, pool: asyncpg.Pool, health: Health) -> None:
        self._settings = settings
        self._pool = pool
        self._health = health
        self._names = Names(settings.amqp_prefix)
        self._wake = asyncio.Event()
        self._connection: AbstractRobustConnection | None = None
        self._exchange: AbstractExchange | None = None
        self._channel: AbstractChannel | None = None
        self._last_backlog_s = 0.0
        self._frontier = DispatchFrontier()
        self._last_redrive_s = time.monotonic()
        # Shared by the relay's loops: batches with rows and no confirm since the last confirm.
        self._batches_unconfirmed = 0
        self._last_unconfirmed_s = 0.0
        health.register("relay")

    async def run(self, stop: asyncio.Event) -> None:
        """Relay until ``stop`` is set; the batch in progress finishes first."""
        url = self._settings.amqp_url
        self._connection = await connect(url, name="delivery-relay", stop=stop)
        try:
            async with asyncio.timeout(SETUP_TIMEOUT_S):
                channel = await self._connection.channel(
                    publisher_confirms=True, on_return_raises=True
                )
                self._channel = channel
                await self._declare()
            async with asyncio.TaskGroup() as tg:
                # Wakes a loop at each commit; each (re)connection wakes one too, for what was
                # committed while none listened.
                listen = Listener(
                    self._settings.database_url,
                    {NOTIFY_CHANNEL: lambda _payload: self._wake.set()},
                    resync=lambda _reason: self._wake.set(),
                    name="relay",
                )
                listener = tg.create_task(listen.run(stop))
                # Raises when the node is lost and others are listed: the supervisor then
                # starts the relay again on another node (a batch in flight is cancelled, its
                # rows stay unpublished and go out again).
                watch = tg.create_task(
                    watch_node(self._connection, url, name="delivery-relay", stop=stop)
                )
                # Several batches in flight: while one waits for its confirms (a quorum queue's
                # fsync), another claims what was committed meanwhile (SKIP LOCKED keeps their
                # rows apart), so an event waits for one confirm, not for a queue of batches.
                loops = [
                    tg.create_task(self._loop(stop))
                    for _ in range(self._settings.relay_concurrency)
                ]
                await asyncio.gather(*loops)
                listener.cancel()
                watch.cancel()
        finally:
            self._health.set("relay", False)
            await self._connection.close()

    async def _loop(self, stop: asyncio.Event) -> None:
        failures = 0
        while not stop.is_set():
            self._wake.clear()
            try:
                claimed, published = await self.relay_batch()
                await self._maybe_update_backlog()
            except Exception as exc:
                if not (
                    is_connection_error(exc) or isinstance(exc, DeliveryError | ConnectionError)
                ):
                    log.exception("relay_batch_failed")
                failures += 1
                self._health.set("relay", False)
                # The backlog gauges matter most while publishing fails: keep them fresh.
                with contextlib.suppress(Exception):
                    await self._maybe_update_backlog()
                delay = backoff_s(failures)
                log.warning("relay_backoff", error=repr(exc)[:300], delay_s=round(delay, 2))
                await wait_any(stop, timeout_s=delay)
                continue
            failures = 0
            self._note_confirms(claimed, published)
            stalled = self._batches_unconfirmed >= _NOT_READY_AFTER_BATCHES
            if stalled and self._batches_unconfirmed == _NOT_READY_AFTER_BATCHES:
                log.warning("relay_publishes_unconfirmed", batches=self._batches_unconfirmed)
            self._health.set("relay", not stalled and not self._connection_broken())
            if claimed and published < claimed:
                # Some rows were not confirmed (returned: the route may have been deleted):
                # declare the topology again, and back off a little instead of spinning.
                # Bounded: a broker under a memory or disk alarm stops reading this connection,
                # and the loop must keep going (the backlog gauges are how on-call sees it).
                with contextlib.suppress(Exception):
                    async with asyncio.timeout(self._settings.publish_timeout_s):
                        await self._declare()
                await wait_any(stop, timeout_s=0.5)
                continue
            with contextlib.suppress(Exception):
                async with asyncio.timeout(self._settings.publish_timeout_s):
                    await self._maybe_redrive()
            if claimed < self._settings.relay_batch_size:
                await wait_any(stop, self._wake, timeout_s=self._settings.relay_poll_interval_s)

    def _note_confirms(self, claimed: int, published: int) -> None:
        now = time.monotonic()
        if published:
            self._batches_unconfirmed = 0
        elif claimed:
            self._batches_unconfirmed += 1
            self._last_unconfirmed_s = now
        elif now - self._last_unconfirmed_s > 2 * self._settings.publish_timeout_s + 1:
            # Nothing to publish and no failed batch lately (another loop's empty claim while
            # this one's rows time out does not count): the stall, if any, is over.
            self._batches_unconfirmed = 0

    async def _declare(self) -> None:
        assert self._channel is not None
        topology = await declare(
            self._channel,
            self._names,
            delivery_limit=self._settings.amqp_delivery_limit,
            nodes=len(node_urls(self._settings.amqp_url)),
        )
        self._exchange = topology.events

    async def _maybe_redrive(self) -> None:
        """Put back events the broker lost after confirming them. Only when the dispatch queue
        is empty: then an event published minutes ago with no inbox row is not waiting in line,
        it is gone (deleted queue, dead-lettered by connection flaps)."""
        now = time.monotonic()
        if now - self._last_redrive_s < _REDRIVE_EVERY_S or self._connection is None:
            return
        self._last_redrive_s = now
        channel = await self._connection.channel()
        try:
            queue = await channel.declare_queue(self._names.dispatch_queue, passive=True)
            ready = queue.declaration_result.message_count
        except aio_pika.exceptions.ChannelClosed:
            # The queue itself is gone (deleted by hand): declare everything again.
            log.warning("dispatch_queue_missing_redeclaring")
            await self._declare()
            return
        finally:
            if not channel.is_closed:
                await channel.close()
        if ready:
            return
        redriven = await redrive_lost(
            self._pool,
            published_before_s=self._settings.redrive_after_s,
            window_s=_REDRIVE_WINDOW_S,
            max_redrives=self._settings.max_redrives,
        )
        if redriven:
            metrics.EVENTS_REDRIVEN.inc(len(redriven))
            log.warning("events_redriven", count=len(redriven), example=redriven[0])
            self._wake.set()

    def _connection_broken(self) -> bool:
        return not is_connected(self._connection)

    async def relay_batch(self) -> tuple[int, int]:
        """One claim-publish-mark transaction; returns (rows claimed, rows confirmed)."""
        assert self._exchange is not None
        async with self._pool.acquire() as conn, conn.transaction():
            rows = await conn.fetch(_CLAIM, self._settings.relay_batch_size)
            if not rows:
                return 0, 0
            metrics.RELAY_BATCH_SIZE.observe(len(rows))
            started = time.perf_counter()
            outgoing = pack_rows(rows, self._settings.relay_events_per_message)
            confirmed = await self._publish_all(self._exchange, outgoing)
            metrics.RELAY_PUBLISH_SECONDS.observe(time.perf_counter() - started)
            if confirmed:
                await conn.execute(_MARK, confirmed)
        metrics.EVENTS_PUBLISHED.inc(len(confirmed))
        return len(rows), len(confirmed)

    async def _publish_all(
        self, exchange: AbstractExchange, outgoing: Sequence[Outgoing]
    ) -> list[int]:
        # All publishes of a batch are in flight together; confirms arrive as a window, not
        # one round trip per message. Each has its own timeout: a blocked broker (memory alarm)
        # must not hang the relay, and the rows simply stay in the outbox.
        timeout_s = self._settings.publish_timeout_s
        results = await asyncio.gather(
            *(
                asyncio.wait_for(
                    exchange.publish(o.message, routing_key=o.routing_key, mandatory=True),
                    timeout_s,
                )
                for o in outgoing
            ),
            return_exceptions=True,
        )
        confirmed: list[int] = []
        for out, result in zip(outgoing, results, strict=True):
            if isinstance(result, Basic.Ack):
                confirmed.extend(out.pks)
                continue
            reason = _failure_reason(result)
            metrics.RELAY_PUBLISH_FAILURES.labels(reason).inc()
            if isinstance(result, asyncio.CancelledError):
                raise result
        rows = sum(len(o.pks) for o in outgoing)
        if len(confirmed) < rows:
            log.warning(
                "relay_unconfirmed",
                unconfirmed=rows - len(confirmed),
                reason=_failure_reason(next(r for r in results if not isinstance(r, Basic.Ack))),
            )
        return confirmed

    async def _maybe_update_backlog(self) -> None:
        now = time.monotonic()
        if now - self._last_backlog_s < self._settings.backlog_gauges_interval_s:
            return
        self._last_backlog_s = now
        backlog = await outbox_backlog(self._pool)
        metrics.OUTBOX_PENDING.set(backlog.pending)
        metrics.OUTBOX_OLDEST_AGE.set(backlog.oldest_s)
        await self._update_lag()

    async def _update_lag(self) -> None:
        # Its own failure is not the relay's: a lag read that fails leaves the gauges as they
        # were (Prometheus still has the last value) and never makes the relay not ready.
        try:
            lag = await read_lag(self._pool, self._frontier)
        except Exception as exc:
            log.debug("lag_read_failed", error=repr(exc)[:200])
            return
        for stage, age_s in lag.by_stage().items():
            if age_s is not None:  # unknown: the walk goes on at the next read
                metrics.LAG.labels(stage).set(round(age_s, 3))


def _failure_reason(result: object) -> str:
    if isinstance(result, TimeoutError):
        return "timeout"
    if isinstance(result, DeliveryError):
        return "returned" if "Return" in type(result.frame).__name__ else "nack"
    return type(result).__name__
