"""Queue depths for ``delivery status`` (and the chaos suite's settle check): message counts by
passive declare, on a connection of their own."""

from __future__ import annotations

import aio_pika

from delivery.broker.connection import with_defaults
from delivery.broker.topology import Names


async def queue_depths(amqp_url: str, names: Names) -> dict[str, int | None]:
    """Message counts by passive declare; ``None`` for a queue that does not exist (yet)."""
    depths: dict[str, int | None] = {}
    connection = await aio_pika.connect(with_defaults(amqp_url), timeout=10)
    try:
        for name in (names.dispatch_queue, names.dead_queue):
            channel = await connection.channel()
            try:
                queue = await channel.declare_queue(name, passive=True)
                depths[name] = queue.declaration_result.message_count
            except aio_pika.exceptions.ChannelClosed:
                depths[name] = None
            finally:
                if not channel.is_closed:
                    await channel.close()
    finally:
        await connection.close()
    return depths


async def queue_report(amqp_url: str | None, names: Names) -> dict[str, int | None] | str:
    """The depths, or why there are none: ``DELIVERY_AMQP_URL not set`` or ``unreachable: ...``."""
    try:
        return await queue_depths(amqp_url, names) if amqp_url else "DELIVERY_AMQP_URL not set"
    except Exception as exc:
        return f"unreachable: {type(exc).__name__}"
