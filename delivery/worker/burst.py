"""Burst mode: run until no work is left, then drain and stop (arq's ``burst``, dramatiq's
``Worker.join``), so that a test can publish, run the platform until idle, and then assert
exactly what arrived.

No work is left when, for the parts the process runs, all of this holds on two polls in a row:

- relay: no outbox row waits to be published (redriven rows included);
- worker:
    - the dispatch and dead-letter queues have no message ready, and this process's
      dispatcher holds none that it received and has not answered yet;
    - every event published within the relay's redrive window, with redrives left, has
      reached the inbox. One that has not is on its way (on the wire to a consumer, held by
      another worker), or the broker lost it and the relay's sweep owes it a redrive;
    - no pending delivery is leased (an attempt in flight, here or in another worker, or the
      lease of a crashed worker, not yet over) or due before the deadline. A retry due within
      the deadline is waited for; one due after it stays pending in PostgreSQL for a later
      run. The deliveries of an open circuit count only while its probe is due: the probe's
      outcome decides, and a circuit that stays open waits for its subscriber, not for us.
      The deliveries of a paused subscription wait for its resume, not for us.

The deadline is ``timeout_s`` after the start: then the burst ends anyway, and says what was
left. Not seen: a message that is not an event (it has no outbox row) while the poison recorder
holds it unacked.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from dataclasses import astuple, dataclass, fields

import asyncpg
import structlog
from aio_pika.abc import AbstractRobustConnection

from delivery.aio import wait_any
from delivery.broker.connection import SETUP_TIMEOUT_S, connect
from delivery.broker.depths import ready_counts
from delivery.broker.relay import _REDRIVE_WINDOW_S
from delivery.broker.topology import Names
from delivery.ops.health import Health
from delivery.settings import Settings

log = structlog.get_logger("delivery.burst")

POLL_S = 0.05
_IDLE_POLLS = 2  # idle on this many polls in a row: nothing was on its way between two reads

# $1 the redrive window (s), $2 max redrives, $3 seconds left until the deadline.
_REMAINING = """
SELECT
    (SELECT count(*) FROM delivery.outbox WHERE published_at IS NULL) AS unpublished,
    (SELECT count(*) FROM delivery.outbox o
     WHERE o.published_at > clock_timestamp() - make_interval(secs => $1)
       AND o.redrives < $2
       AND NOT EXISTS (SELECT 1 FROM delivery.inbox i WHERE i.event_id = o.event_id)
    ) AS undispatched,
    (SELECT count(*) FROM delivery.deliveries d
     JOIN delivery.subscriptions s ON s.id = d.subscription_id
     WHERE d.state = 'pending' AND (
        d.lease_until > clock_timestamp()
        OR (s.state <> 'paused' AND s.circuit_state <> 'open'
            AND d.next_attempt_at <= clock_timestamp() + make_interval(secs => $3))
        OR (s.state <> 'paused' AND s.circuit_state = 'open'
            AND s.circuit_retry_at <= clock_timestamp()
            AND d.next_attempt_at <= clock_timestamp())
     )) AS deliveries
"""


@dataclass(frozen=True)
class Remaining:
    """The work left; all zero is idle."""

    unpublished: int = 0  # outbox rows the relay has still to publish
    undispatched: int = 0  # published events not in the inbox yet
    queued: int = 0  # messages ready in a queue (or a queue missing), or held by dispatch
    deliveries: int = 0  # pending deliveries leased, or due before the deadline

    @property
    def idle(self) -> bool:
        return not any(astuple(self))

    def __str__(self) -> str:
        left = [f"{getattr(self, f.name)} {f.name}" for f in fields(self) if getattr(self, f.name)]
        return ", ".join(left) or "nothing"


async def remaining(
    pool: asyncpg.Pool,
    connection: AbstractRobustConnection | None,
    settings: Settings,
    *,
    relay: bool,
    held: Callable[[], int] | None,
    horizon_s: float,
) -> Remaining:
    """The work left for a process running the relay (``relay``) and a worker (``held`` is
    its dispatcher's count of messages received and not answered; ``None``: no worker)."""
    row = await pool.fetchrow(_REMAINING, _REDRIVE_WINDOW_S, settings.max_redrives, horizon_s)
    assert row is not None
    unpublished = row["unpublished"] if relay else 0
    if held is None or connection is None:
        return Remaining(unpublished=unpublished)
    names = Names(settings.amqp_prefix)
    depths = await ready_counts(connection, (names.dispatch_queue, names.dead_queue))
    # A queue that does not exist (yet) is not known to be empty.
    queued = sum(1 if n is None else n for n in depths.values()) + held()
    return Remaining(unpublished, row["undispatched"], queued, row["deliveries"])


async def stop_when_idle(
    settings: Settings,
    pool: asyncpg.Pool,
    health: Health,
    *,
    relay: bool,
    held: Callable[[], int] | None,
    timeout_s: float,
    stop: asyncio.Event,
) -> str | None:
    """Set ``stop`` once no work is left (polling every ``POLL_S`` once the process is ready),
    or at the deadline; ``None`` when the process was idle (or stopped by someone else), else
    what was still left at the deadline."""
    deadline = time.monotonic() + timeout_s
    connection: AbstractRobustConnection | None = None
    left = "the process never became ready"
    idle_polls = 0
    try:
        while not stop.is_set():
            to_go_s = deadline - time.monotonic()
            if to_go_s <= 0:
                log.warning("burst_deadline_passed", timeout_s=timeout_s, left=left)
                return left
            if health.ready:
                try:
                    if held is not None and connection is None:
                        connection = await asyncio.wait_for(
                            connect(settings.amqp_url, name="delivery-burst", stop=stop),
                            min(to_go_s, SETUP_TIMEOUT_S),
                        )
                    found = await remaining(
                        pool, connection, settings, relay=relay, held=held, horizon_s=to_go_s
                    )
                except Exception as exc:  # a service away for a moment: not known to be idle
                    left = f"not known ({type(exc).__name__}: {exc})"
                    idle_polls = 0
                else:
                    left = str(found)
                    idle_polls = idle_polls + 1 if found.idle else 0
                    if idle_polls >= _IDLE_POLLS:
                        log.info("burst_idle")
                        return None
            await wait_any(stop, timeout_s=POLL_S)
        return None
    finally:
        stop.set()
        if connection is not None:
            await connection.close()
