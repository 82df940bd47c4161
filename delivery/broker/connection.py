"""RabbitMQ connections: robust (they reconnect), named, with a short heartbeat so a dead link
is noticed in seconds rather than minutes, and a short reconnect interval so a cut link costs
about a second of work rather than aio-pika's default five."""

from __future__ import annotations

import asyncio
import random
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

import aio_pika
import structlog
from aio_pika.abc import AbstractRobustConnection
from aiormq.exceptions import AMQPConnectionError

from delivery.aio import backoff_s, wait_any
from delivery.errors import StoppedBeforeConnected

log = structlog.get_logger("delivery.amqp")

HEARTBEAT_S = 10
# Chaos (amqp-cut, links cut every 0.3-1.5 s) found the 5 s default left every link down most
# of the time, and the backlog grew through the whole run.
RECONNECT_INTERVAL_S = 1
# Opening a connection, or a component's channel, declarations and consumer, must answer within
# this: a broker can accept the socket and then never answer (a quorum queue that lost its
# leader; a link blackholed mid-handshake). The component then fails and its supervisor starts
# it again, instead of hanging not-ready for good (chaos "everything" saw a worker do that).
SETUP_TIMEOUT_S = 30.0
_CONNECT_BACKOFF_MAX_S = 5.0


def with_defaults(url: str) -> str:
    """Add ``heartbeat`` and ``reconnect_interval`` to the URL unless the operator chose them."""
    parts = urlsplit(url)
    query = dict(parse_qsl(parts.query))
    query.setdefault("heartbeat", str(HEARTBEAT_S))
    query.setdefault("reconnect_interval", str(RECONNECT_INTERVAL_S))
    return urlunsplit(parts._replace(query=urlencode(query)))


def is_connected(connection: AbstractRobustConnection | None) -> bool:
    """A robust connection's ``is_closed`` stays False while it is reconnecting; ``connected``
    is the truth about the link right now."""
    return connection is not None and connection.connected.is_set()


async def connect(url: str, *, name: str, stop: asyncio.Event) -> AbstractRobustConnection:
    """Connect, retrying the first connection with backoff until it succeeds or ``stop`` is
    set (a robust connection reconnects by itself only once it has connected once): a worker
    started before the broker waits for it, and still shuts down at once when told to."""
    failures = 0
    while True:
        try:
            return await aio_pika.connect_robust(
                with_defaults(url),
                client_properties={"connection_name": name},
                timeout=SETUP_TIMEOUT_S,
            )
        except (ConnectionError, OSError, AMQPConnectionError, TimeoutError) as exc:
            failures += 1
            delay_s = backoff_s(failures, base_s=0.2, max_s=_CONNECT_BACKOFF_MAX_S)
            log.warning(
                "amqp_connect_retry", connection=name, error=repr(exc)[:200], retry_in_s=delay_s
            )
            await wait_any(stop, timeout_s=delay_s * random.uniform(0.8, 1.2))
        if stop.is_set():
            raise StoppedBeforeConnected(name)
