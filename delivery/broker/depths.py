"""Queue depths for ``delivery status``, the chaos suite's settle check and burst mode: message
counts by passive declare."""

from __future__ import annotations

from collections.abc import Iterable

import aio_pika
from aio_pika.abc import AbstractConnection

from delivery.broker.connection import with_defaults
from delivery.broker.topology import Names


async def ready_counts(
    connection: AbstractConnection, queues: Iterable[str]
) -> dict[str, int | None]:
    """Messages ready in each queue (not those delivered to a consumer and not yet settled);
    ``None`` for a queue that does not exist (yet). Each declare has a channel of its own: a
    failed passive declare closes its channel."""
    depths: dict[str, int | None] = {}
    for name in queues:
        channel = await connection.channel()
        try:
            queue = await channel.declare_queue(name, passive=True)
            depths[name] = queue.declaration_result.message_count
        except aio_pika.exceptions.ChannelClosed:
            depths[name] = None
        finally:
            if not channel.is_closed:
                await channel.close()
    return depths


async def queue_depths(amqp_url: str, names: Names) -> dict[str, int | None]:
    """Message counts by passive declare, on a connection of their own; ``None`` for a queue
    that does not exist (yet)."""
    connection = await aio_pika.connect(with_defaults(amqp_url), timeout=10)
    try:
        return await ready_counts(connection, (names.dispatch_queue, names.dead_queue))
    finally:
        await connection.close()


async def queue_report(amqp_url: str | None, names: Names) -> dict[str, int | None] | str:
    """The depths, or why there are none: ``DELIVERY_AMQP_URL not set`` or ``unreachable: ...``."""
    try:
        return await queue_depths(amqp_url, names) if amqp_url else "DELIVERY_AMQP_URL not set"
    except Exception as exc:
        return f"unreachable: {type(exc).__name__}"
