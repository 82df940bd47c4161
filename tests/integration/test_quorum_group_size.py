"""Quorum queues spread over three nodes once three are listed, and a queue declared while one
node was listed keeps working when the list grows (RabbitMQ refuses the new group size as
inequivalent; the platform uses the queue as it is)."""

from __future__ import annotations

import aio_pika
import pytest

from delivery.broker.topology import Names, declare
from delivery.settings import Settings

pytestmark = pytest.mark.integration


async def test_a_queue_declared_for_one_node_is_declared_again_for_three(settings: Settings):
    names = Names(settings.amqp_prefix)
    connection = await aio_pika.connect_robust(settings.amqp_url)
    async with connection:
        channel = await connection.channel()
        # Given the topology declared while DELIVERY_AMQP_URL listed one node
        await declare(channel, names, delivery_limit=20, nodes=1)
        # When a process that lists three nodes declares it again
        channel = await connection.channel()
        topology = await declare(channel, names, delivery_limit=20, nodes=3)
        # Then it gets the same queues, and they carry messages
        await topology.events.publish(aio_pika.Message(b"x"), routing_key="trade.executed")
        message = await topology.dispatch.get(timeout=5, fail=True)
        assert message is not None and message.body == b"x"
        await message.ack()
        # And the other way round: a queue made for three, declared by a one-node process
        await channel.queue_delete(names.dispatch_queue)
        await declare(channel, names, delivery_limit=20, nodes=3)
        topology = await declare(await connection.channel(), names, delivery_limit=20, nodes=1)
        assert topology.dispatch.name == names.dispatch_queue
