"""RabbitMQ connections: robust (they reconnect), named, with a short heartbeat so a dead link
is noticed in seconds rather than minutes, and a short reconnect interval so a cut link costs
about a second of work rather than aio-pika's default five.

``DELIVERY_AMQP_URL`` may list the nodes of one cluster, comma-separated. A robust connection
reconnects to the one URL it was made with, so failing over to another node is ours, and lives
here only: ``connect`` tries the nodes in turn (after a loss, from the node after the lost one)
and ``watch_node`` ends the component whose node stayed unreachable, so its supervisor starts
it again through ``connect``. With one node nothing changes: the robust connection waits for
it."""

from __future__ import annotations

import asyncio
import random
import time
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

import aio_pika
import structlog
from aio_pika.abc import AbstractConnection, AbstractRobustConnection
from aiormq.exceptions import AMQPConnectionError

from delivery.aio import backoff_s, wait_any
from delivery.errors import BrokerNodeLostError, StoppedBeforeConnected
from delivery.settings import node_urls, safe_url

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
# With several nodes, one that does not answer is skipped after this, not after the full
# SETUP_TIMEOUT_S: a dead host (no RST, a dropped SYN) must not hold up the failover.
NODE_CONNECT_TIMEOUT_S = 10.0
# With several nodes, a connection down this long is given up for another node. Long enough
# that a blip (a cut link, a node restarting in a second) is mended by the robust reconnect
# on the same node, short enough that a dead node costs seconds.
FAILOVER_AFTER_S = 3.0
_CONNECT_BACKOFF_MAX_S = 5.0
_WATCH_EVERY_S = 0.5
# The node each named connection lost last: its next connect starts after it.
_lost: dict[str, str] = {}


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


def _in_turn(urls: list[str], lost: str | None) -> list[str]:
    """The nodes in the order to try them: as listed, or starting after the one lost last."""
    if lost in urls:
        start = urls.index(lost) + 1
        return urls[start:] + urls[:start]
    return urls


async def connect(url: str, *, name: str, stop: asyncio.Event) -> AbstractRobustConnection:
    """Connect to the first node that answers, retrying rounds with backoff until one does or
    ``stop`` is set (a robust connection reconnects by itself only once it has connected
    once): a worker started before the broker waits for it, and still shuts down at once when
    told to. After ``watch_node`` gave a node up, this connection starts with the next one."""
    urls = node_urls(url)
    timeout_s = SETUP_TIMEOUT_S if len(urls) == 1 else NODE_CONNECT_TIMEOUT_S
    failures = 0
    error = ""  # the last node's, in the retry line
    while True:
        for node in _in_turn(urls, _lost.get(name)):
            try:
                connection = await aio_pika.connect_robust(
                    with_defaults(node),
                    client_properties={"connection_name": name},
                    timeout=timeout_s,
                )
            except (ConnectionError, OSError, AMQPConnectionError, TimeoutError) as exc:
                error = repr(exc)[:200]
                if len(urls) > 1:
                    log.warning("amqp_connect_failed", connection=name, node=safe_url(node),
                                error=error)  # fmt: skip
                if stop.is_set():
                    raise StoppedBeforeConnected(name) from None
                continue
            if len(urls) > 1:
                log.info("amqp_connected", connection=name, node=safe_url(node))
            return connection
        failures += 1
        delay_s = backoff_s(failures, base_s=0.2, max_s=_CONNECT_BACKOFF_MAX_S)
        log.warning("amqp_connect_retry", connection=name, nodes=len(urls), error=error,
                    retry_in_s=delay_s)  # fmt: skip
        await wait_any(stop, timeout_s=delay_s * random.uniform(0.8, 1.2))
        if stop.is_set():
            raise StoppedBeforeConnected(name)


def node_of(connection: AbstractConnection) -> str:
    """The URL of the node a connection was made to, as listed (without our defaults)."""
    parts = urlsplit(str(connection))  # aio-pika's str() is its URL, password masked
    query = [(k, v) for k, v in parse_qsl(parts.query) if k not in _DEFAULT_KEYS]
    return urlunsplit(parts._replace(query=urlencode(query)))


_DEFAULT_KEYS = frozenset({"heartbeat", "reconnect_interval"})


async def watch_node(
    connection: AbstractRobustConnection, url: str, *, name: str, stop: asyncio.Event
) -> None:
    """Until ``stop``: with several nodes listed, raise ``BrokerNodeLostError`` once the
    connection has been down ``FAILOVER_AFTER_S`` (the component fails, its supervisor starts
    it again, ``connect`` tries the other nodes). With one node, just wait for ``stop``."""
    urls = node_urls(url)
    if len(urls) == 1:
        await stop.wait()
        return
    down_since: float | None = None
    while not stop.is_set():
        if is_connected(connection):
            down_since = None
        elif down_since is None:
            down_since = time.monotonic()
        elif time.monotonic() - down_since >= FAILOVER_AFTER_S:
            lost = _match(node_of(connection), urls)
            _lost[name] = lost
            log.warning("amqp_node_lost", connection=name, node=safe_url(lost),
                        down_s=round(time.monotonic() - down_since, 1))  # fmt: skip
            raise BrokerNodeLostError(f"{name}: node {safe_url(lost)} unreachable; failing over")
        await wait_any(stop, timeout_s=_WATCH_EVERY_S)


def _match(node: str, urls: list[str]) -> str:
    """The listed URL of ``node`` (the connection's URL went through yarl and our defaults)."""
    want = urlsplit(node)
    for url in urls:
        have = urlsplit(url)
        if (have.hostname, have.port or 5672) == (want.hostname, want.port or 5672):
            return url
    return node
