"""The dead-letter queue's consumer: messages our workers could not process at all (unparseable,
or redelivered past ``x-delivery-limit`` by a crash loop) are recorded in PostgreSQL with the
reason, then acked, so they never block the dispatch queue and never vanish."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from enum import Enum
from typing import Any

import asyncpg
import orjson
import structlog
from aio_pika.abc import AbstractIncomingMessage

from delivery.aio import wait_any
from delivery.broker.connection import SETUP_TIMEOUT_S, connect, is_connected, watch_node
from delivery.broker.redrive import redrive_events
from delivery.broker.topology import Names, declare
from delivery.broker.wire import decode
from delivery.errors import PoisonMessageError
from delivery.ops import metrics
from delivery.ops.health import Health
from delivery.settings import Settings, node_urls
from delivery.store.pool import with_retries

log = structlog.get_logger("delivery.poison")

_HEALTH_EVERY_S = 1.0
_RECORD = """
INSERT INTO delivery.poison_messages (message_id, routing_key, reason, death_count, headers, body)
VALUES ($1, $2, $3, $4, $5::jsonb, $6)
"""


class Cause(Enum):
    """Why a message reached the dead-letter queue; it decides what the recorder does."""

    UNPROCESSABLE = "unprocessable"  # not ours: recorded as poison
    DELIVERY_LIMIT = "delivery_limit"  # ours, redelivered past the limit: redriven if it can be
    BROKER = "broker"  # ours, dead-lettered by the broker for another reason: recorded


@dataclass(frozen=True, slots=True)
class Death:
    cause: Cause
    reason: str  # in words an operator can act on, recorded with the message
    count: int | None  # the broker's count of deaths, if it gave one


def describe(message: AbstractIncomingMessage) -> Death:
    """Why the broker dead-lettered it."""
    deaths = (message.headers or {}).get("x-death")
    first = deaths[0] if isinstance(deaths, list) and deaths else None
    latest: dict[str, Any] = first if isinstance(first, dict) else {}
    broker_reason = str(latest.get("reason", "unknown"))
    raw_count = latest.get("count")
    count = raw_count if isinstance(raw_count, int) else None
    try:
        decode(message)
    except PoisonMessageError as exc:
        return Death(Cause.UNPROCESSABLE, f"unprocessable: {exc}", count)
    if broker_reason == "delivery_limit":
        return Death(Cause.DELIVERY_LIMIT, "redelivered past x-delivery-limit (crash loop?)", count)
    return Death(Cause.BROKER, f"dead-lettered by the broker: {broker_reason}", count)


# Events of a dead-lettered pack that reached the inbox anyway need nothing more.
_DISPATCHED = "SELECT count(*) FROM delivery.inbox WHERE event_id = ANY($1::text[])"
# The first event a message names that the outbox does not hold (dispatch rejects such a
# message: no relay sent it).
_NOT_IN_OUTBOX = """
SELECT i FROM unnest($1::text[]) i
WHERE NOT EXISTS (SELECT 1 FROM delivery.outbox o WHERE o.event_id = i)
LIMIT 1
"""


def _jsonable(value: Any) -> Any:
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_jsonable(v) for v in value]
    if isinstance(value, bytes):
        return value.decode("utf-8", "replace")
    if isinstance(value, str | int | float | bool) or value is None:
        return value
    return str(value)


class PoisonRecorder:
    def __init__(self, settings: Settings, pool: asyncpg.Pool, health: Health) -> None:
        self._settings = settings
        self._pool = pool
        self._health = health
        health.register("poison")

    async def run(self, stop: asyncio.Event) -> None:
        url = self._settings.amqp_url
        connection = await connect(url, name="delivery-poison", stop=stop)
        try:
            async with asyncio.timeout(SETUP_TIMEOUT_S):
                channel = await connection.channel()
                await channel.set_qos(prefetch_count=16)
                topology = await declare(
                    channel,
                    Names(self._settings.amqp_prefix),
                    delivery_limit=self._settings.amqp_delivery_limit,
                    nodes=len(node_urls(url)),
                )
                await topology.dead.consume(self._on_message)
            async with asyncio.TaskGroup() as tg:
                # Raises when the node is lost and others are listed: started again elsewhere.
                watch = tg.create_task(
                    watch_node(connection, url, name="delivery-poison", stop=stop)
                )
                while not stop.is_set():
                    self._health.set("poison", is_connected(connection))
                    await wait_any(stop, timeout_s=_HEALTH_EVERY_S)
                watch.cancel()
        finally:
            self._health.set("poison", False)
            await connection.close()

    async def _redrive(self, message: AbstractIncomingMessage) -> bool:
        """Valid events over x-delivery-limit are usually victims of connection flaps (each
        one counts as a delivery), not poison: put them back in the relay's path through the
        outbox, a bounded number of times (the relay sends a redriven event alone, never in a
        pack), so a message that really crashes workers still ends here. True when every event
        of the message went back or had been dispatched already (nothing is missing then, and
        recording it would only be noise for on-call)."""
        try:
            event_ids = [e.facts.id for e in decode(message)]
            redriven = await redrive_events(
                self._pool, event_ids, max_redrives=self._settings.max_redrives
            )
            dispatched = int(await self._pool.fetchval(_DISPATCHED, event_ids))
        except Exception as exc:
            log.warning("redrive_failed", error=repr(exc)[:200])
            return False
        if redriven:
            metrics.EVENTS_REDRIVEN.inc(len(redriven))
            log.warning(
                "events_redriven_from_dead_letters",
                count=len(redriven),
                example=redriven[0],
            )
        elif dispatched:
            log.info("dead_letter_already_dispatched", events=len(event_ids))
        return len(redriven) + dispatched >= len(event_ids)

    async def _not_ours(self, message: AbstractIncomingMessage, death: Death) -> Death:
        """The death of a message that parses: unprocessable if it names an event the outbox
        lacks (whatever the broker said), as it was."""
        try:
            event_ids = [e.facts.id for e in decode(message)]
            missing = await self._pool.fetchval(_NOT_IN_OUTBOX, event_ids)
        except Exception as exc:
            log.warning("outbox_check_failed", error=repr(exc)[:200])
            return death
        if missing is None:
            return death
        reason = f"unprocessable: event {missing} has no outbox row: no relay sent it"
        return Death(Cause.UNPROCESSABLE, reason, death.count)

    async def _on_message(self, message: AbstractIncomingMessage) -> None:
        death = describe(message)
        if death.cause is not Cause.UNPROCESSABLE:
            death = await self._not_ours(message, death)
        if death.cause is Cause.DELIVERY_LIMIT and await self._redrive(message):
            await message.ack()
            return
        headers = orjson.dumps(_jsonable(dict(message.headers or {}))).decode()
        try:
            await with_retries(
                self._pool,
                lambda conn: conn.execute(
                    _RECORD,
                    message.message_id,
                    message.routing_key,
                    death.reason,
                    death.count,
                    headers,
                    message.body,
                ),
                deadline_s=30,
                what="record_poison",
            )
        except Exception:
            log.exception("poison_record_failed", message_id=message.message_id)
            await message.nack(requeue=True)
            return
        metrics.POISON_MESSAGES.labels("recorded").inc()
        # (a healthy event redelivered past the limit by connection flaps never gets here:
        # _redrive sends it through the outbox again, up to DELIVERY_MAX_REDRIVES times)
        log.warning("poison_recorded", message_id=message.message_id, reason=death.reason)
        await message.ack()
