"""How many of the RabbitMQ nodes listed in ``DELIVERY_AMQP_URL`` this process reaches: each
is asked for an AMQP handshake every few seconds (no management plugin needed), and the
answers feed two gauges and readiness.

A process that reaches only half of the listed nodes or fewer may be on the minority side of a
partition, where quorum queues have no leader: it reports not ready (component
``amqp_nodes``), so traffic and on-call go to the processes that see the majority. A single
lost node is only an alert (``DeliveryBrokerNodeUnreachable``): the majority still works."""

from __future__ import annotations

import asyncio
import contextlib

import aio_pika
import structlog

from delivery.aio import wait_any
from delivery.broker.connection import with_defaults
from delivery.ops import metrics
from delivery.ops.health import Health
from delivery.settings import node_urls, safe_url

log = structlog.get_logger("delivery.amqp.nodes")

COMPONENT = "amqp_nodes"
# A connection opened and closed per node and process each time: not much more often, or the
# probes themselves become the connection churn RabbitMQ advises against.
PROBE_EVERY_S = 10.0
PROBE_TIMEOUT_S = 5.0


def has_majority(reachable: int, listed: int) -> bool:
    """More than half of the listed nodes answer (quorum queues need a majority)."""
    return 2 * reachable > listed


async def reaches(url: str, *, timeout_s: float = PROBE_TIMEOUT_S) -> bool:
    """The node answers an AMQP handshake within ``timeout_s``."""
    try:
        connection = await aio_pika.connect(with_defaults(url), timeout=timeout_s)
    except Exception as exc:
        log.debug("amqp_node_unreachable", node=safe_url(url), error=repr(exc)[:200])
        return False
    with contextlib.suppress(Exception):
        await asyncio.wait_for(connection.close(), timeout_s)
    return True


async def watch_nodes(url: str, health: Health, stop: asyncio.Event) -> None:
    """Probe every listed node until ``stop``; with one node listed, only set the gauges (its
    loss is already every component's not-ready)."""
    urls = node_urls(url)
    metrics.AMQP_NODES_LISTED.set(len(urls))
    if len(urls) == 1:
        metrics.AMQP_NODES_REACHABLE.set(1)
        await stop.wait()
        return
    health.register(COMPONENT)
    unreachable: set[str] = set()
    while not stop.is_set():
        answers = await asyncio.gather(*(reaches(node) for node in urls))
        count = sum(answers)
        metrics.AMQP_NODES_REACHABLE.set(count)
        health.set(COMPONENT, has_majority(count, len(urls)))
        now_unreachable = {safe_url(n) for n, ok in zip(urls, answers, strict=True) if not ok}
        if now_unreachable != unreachable:
            log.warning("amqp_nodes_changed", reachable=count, listed=len(urls),
                        unreachable=sorted(now_unreachable))  # fmt: skip
            unreachable = now_unreachable
        await wait_any(stop, timeout_s=PROBE_EVERY_S)
