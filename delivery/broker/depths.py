"""Queue depths, by passive declare: for ``delivery status``, the chaos suite's settle check and
burst mode (each on a connection of their own), and for the dashboard from a running worker."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Iterable

import aio_pika
import structlog
from aio_pika.abc import AbstractConnection, AbstractRobustConnection

from delivery.aio import wait_any
from delivery.broker.connection import is_connected, with_defaults
from delivery.broker.topology import Names
from delivery.errors import QueueMissingError
from delivery.ops import metrics
from delivery.settings import node_urls

log = structlog.get_logger("delivery.dispatch")

_DEPTHS_EVERY_S = 5.0


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
    connection = await _first_node(amqp_url)
    try:
        return await ready_counts(connection, (names.dispatch_queue, names.dead_queue))
    finally:
        await connection.close()


async def _first_node(amqp_url: str) -> AbstractConnection:
    """A plain connection to the first listed node that answers; the last error if none does."""
    urls = node_urls(amqp_url)
    for node in urls[:-1]:
        # Another node may answer: only the last one's error is reported (as "unreachable").
        with contextlib.suppress(Exception):
            return await aio_pika.connect(with_defaults(node), timeout=10)
    return await aio_pika.connect(with_defaults(urls[-1]), timeout=10)


async def queue_report(
    amqp_url: str | None, names: Names
) -> tuple[dict[str, int | None], str | None]:
    """The depths by queue name, and why they are unknown (``None``: they are known). The
    same queues either way, so ``status --json`` keeps one shape: when the broker cannot be
    asked, every depth is ``None`` and the reason is ``DELIVERY_AMQP_URL is not set`` or
    ``unreachable: ...``."""
    unknown: dict[str, int | None] = dict.fromkeys((names.dispatch_queue, names.dead_queue))
    if not amqp_url:
        return unknown, "DELIVERY_AMQP_URL is not set"
    try:
        return await queue_depths(amqp_url, names), None
    except Exception as exc:
        detail = str(exc).strip().splitlines()[0][:200] if str(exc).strip() else ""
        return unknown, f"unreachable: {type(exc).__name__}" + (f": {detail}" if detail else "")


async def watch_depths(
    connection: AbstractRobustConnection, names: Names, stop: asyncio.Event
) -> None:
    """The queue-depth gauges of the dashboard, every few seconds until ``stop``, on a channel
    of their own (a failed passive declare closes its channel). Raises ``QueueMissingError``
    when a queue was deleted at run time."""
    queues = {"dispatch": names.dispatch_queue, "dead": names.dead_queue}
    while not stop.is_set():
        if is_connected(connection):
            channel = await connection.channel()
            try:
                for label, name in queues.items():
                    queue = await channel.declare_queue(name, passive=True)
                    count = queue.declaration_result.message_count
                    metrics.QUEUE_DEPTH.labels(label).set(count or 0)
            except aio_pika.exceptions.ChannelNotFoundEntity:
                # Deleted at run time: our consumer went with it. Failing here makes the
                # supervisor start the dispatcher again, which declares and consumes anew.
                raise QueueMissingError(name) from None
            except Exception as exc:
                log.debug("queue_depth_failed", error=repr(exc)[:200])
            finally:
                with contextlib.suppress(Exception):
                    await channel.close()
        await wait_any(stop, timeout_s=_DEPTHS_EVERY_S)
