"""Several nodes in DELIVERY_AMQP_URL on the shared broker (a node that refuses stands for a
dead one): connections and `status` go to the first node that answers; a queue declared while
one node was listed keeps working when the list grows (RabbitMQ refuses the new group size as
inequivalent; the platform uses the queue as it is). A real three-node cluster:
test_broker_failover.py."""

from __future__ import annotations

import asyncio
from urllib.parse import urlsplit

import aio_pika
import pytest

from delivery.broker.connection import connect
from delivery.broker.depths import queue_report
from delivery.broker.nodes import reaches
from delivery.broker.topology import Names, declare
from delivery.settings import Settings
from delivery.testing.processes import free_port

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


async def test_the_first_node_that_answers_is_used_by_processes_and_status(settings: Settings):
    dead = f"amqp://guest:guest@127.0.0.1:{free_port()}/"
    listed = f"{dead},{settings.amqp_url}"
    names = Names(settings.amqp_prefix)
    # Given the first listed node does not answer
    assert not await reaches(dead, timeout_s=2)
    assert await reaches(settings.amqp_url)
    # When a component connects, then it is on the second node
    connection = await connect(listed, name="t-nodes", stop=asyncio.Event())
    async with connection:
        assert urlsplit(str(connection)).port == urlsplit(settings.amqp_url).port
        await declare(await connection.channel(), names, delivery_limit=20, nodes=2)
    # And status reads the queue depths there
    depths, error = await queue_report(listed, names)
    assert error is None
    assert depths == {names.dispatch_queue: 0, names.dead_queue: 0}
