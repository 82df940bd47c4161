"""Broker topology: every exchange and queue name is derived here, and declared idempotently.

relay --publish(routing key = event type)--> {prefix}.events (topic)
    --#--> {prefix}.dispatch (quorum queue)  --consumed by--> workers
             | rejected or over x-delivery-limit
             v
    {prefix}.dead (fanout) --> {prefix}.dispatch.dead (quorum queue) --> poison recorder
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import aio_pika
from aio_pika.abc import AbstractChannel, AbstractConnection, AbstractExchange, AbstractQueue
from pamqp.common import FieldTable


@dataclass(frozen=True)
class Names:
    prefix: str = "delivery"

    @property
    def events_exchange(self) -> str:
        return f"{self.prefix}.events"

    @property
    def dispatch_queue(self) -> str:
        return f"{self.prefix}.dispatch"

    @property
    def dead_exchange(self) -> str:
        return f"{self.prefix}.dead"

    @property
    def dead_queue(self) -> str:
        return f"{self.prefix}.dispatch.dead"


@dataclass(frozen=True)
class Topology:
    events: AbstractExchange
    dispatch: AbstractQueue
    dead: AbstractQueue


GROUP_SIZE_ARGUMENT = "x-quorum-initial-group-size"
# Replicas of each quorum queue: three survive the loss of one node and cost a third of what five
# do. RabbitMQ's default is every node of the cluster.
QUORUM_GROUP_SIZE = 3


def quorum_arguments(nodes: int) -> FieldTable:
    """A quorum queue's type and, when the cluster has room for it (``nodes``: the nodes listed
    in DELIVERY_AMQP_URL), its initial group size; never more members than nodes, so one node
    stays one node."""
    arguments: FieldTable = {"x-queue-type": "quorum"}
    if nodes >= QUORUM_GROUP_SIZE:
        arguments[GROUP_SIZE_ARGUMENT] = QUORUM_GROUP_SIZE
    return arguments


def dispatch_queue_arguments(names: Names, delivery_limit: int, nodes: int = 1) -> FieldTable:
    return {
        **quorum_arguments(nodes),
        # 3.10 has no default: without a limit a poison message loops forever.
        "x-delivery-limit": delivery_limit,
        "x-dead-letter-exchange": names.dead_exchange,
        # At-least-once dead-lettering needs reject-publish overflow (drop-head silently
        # degrades to at-most-once).
        "x-dead-letter-strategy": "at-least-once",
        "x-overflow": "reject-publish",
    }


async def declare(
    channel: AbstractChannel, names: Names, *, delivery_limit: int, nodes: int = 1
) -> Topology:
    """Declare everything; safe to call from every process at every start and reconnect.
    ``nodes``: how many cluster nodes DELIVERY_AMQP_URL lists (``quorum_arguments``)."""
    events = await channel.declare_exchange(
        names.events_exchange, aio_pika.ExchangeType.TOPIC, durable=True
    )
    dead_exchange = await channel.declare_exchange(
        names.dead_exchange, aio_pika.ExchangeType.FANOUT, durable=True
    )
    dead = await _declare_quorum(channel, names.dead_queue, quorum_arguments(nodes))
    await dead.bind(dead_exchange, routing_key="")
    dispatch = await _declare_quorum(
        channel, names.dispatch_queue, dispatch_queue_arguments(names, delivery_limit, nodes)
    )
    await dispatch.bind(events, routing_key="#")
    return Topology(events=events, dispatch=dispatch, dead=dead)


async def _declare_quorum(
    channel: AbstractChannel, name: str, arguments: FieldTable
) -> AbstractQueue:
    """Declare a quorum queue. One declared while another number of nodes was listed (a
    single node that grew into a cluster) differs only in its initial group size, which
    RabbitMQ refuses as inequivalent (406, closing the channel): it is used as it is, declared
    passively on the channel reopened (its members grow with ``rabbitmq-queues grow``)."""
    try:
        return await channel.declare_queue(name, durable=True, arguments=arguments)
    except aio_pika.exceptions.ChannelPreconditionFailed as exc:
        if GROUP_SIZE_ARGUMENT not in str(exc):
            raise
    await channel.reopen()
    return await channel.declare_queue(name, passive=True)


async def delete(connection: AbstractConnection, names: Names) -> None:
    """Remove every queue and exchange of a prefix (tests, demos, chaos runs tidy up with it).
    Each on a channel of its own: deleting something absent closes the channel."""
    for queue in (names.dispatch_queue, names.dead_queue):
        channel = await connection.channel()
        with contextlib.suppress(Exception):
            await channel.queue_delete(queue)
    for exchange in (names.events_exchange, names.dead_exchange):
        channel = await connection.channel()
        with contextlib.suppress(Exception):
            await channel.exchange_delete(exchange)
