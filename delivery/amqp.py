"""RabbitMQ connections: robust (they reconnect), named, with a short heartbeat so a dead link
is noticed in seconds rather than minutes."""

from __future__ import annotations

from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

import aio_pika
import structlog
from aio_pika.abc import AbstractRobustConnection
from aiormq.exceptions import AMQPConnectionError
from tenacity import (
    AsyncRetrying,
    retry_if_exception_type,
    stop_after_delay,
    wait_exponential_jitter,
)

log = structlog.get_logger("delivery.amqp")

HEARTBEAT_S = 10


def with_defaults(url: str) -> str:
    """Add ``heartbeat`` to the URL unless the operator chose one."""
    parts = urlsplit(url)
    query = dict(parse_qsl(parts.query))
    query.setdefault("heartbeat", str(HEARTBEAT_S))
    return urlunsplit(parts._replace(query=urlencode(query)))


def is_connected(connection: AbstractRobustConnection | None) -> bool:
    """A robust connection's ``is_closed`` stays False while it is reconnecting; ``connected``
    is the truth about the link right now."""
    return connection is not None and connection.connected.is_set()


async def connect(
    url: str, *, name: str, first_try_deadline_s: float = 3600.0
) -> AbstractRobustConnection:
    """Connect, retrying the first connection with backoff (a robust connection reconnects by
    itself only once it has connected once): a worker started before the broker waits for it."""
    async for attempt in AsyncRetrying(
        retry=retry_if_exception_type((ConnectionError, OSError, AMQPConnectionError)),
        wait=wait_exponential_jitter(multiplier=0.2, max=5.0),
        stop=stop_after_delay(first_try_deadline_s),
        before_sleep=lambda state: log.warning(
            "amqp_connect_retry",
            connection=name,
            error=repr(state.outcome.exception())[:200] if state.outcome else None,
        ),
        reraise=True,
    ):
        with attempt:
            return await aio_pika.connect_robust(
                with_defaults(url), client_properties={"connection_name": name}
            )
    raise AssertionError("unreachable")
