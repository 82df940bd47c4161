"""A RabbitMQ node killed under load (issue #16): with DELIVERY_AMQP_URL listing the three
nodes of a cluster, the running process is connected to the first; ``kill -9`` that node and
the process fails over to another node by itself, without a restart, and every event is
delivered. The quorum queues have three members, so they keep a majority on the two left;
with a second node gone the process is on the minority side and says it is not ready."""

from __future__ import annotations

import asyncio
import contextlib
import time

import asyncpg
import pytest

from delivery.outbox import publish_many
from delivery.settings import Settings
from delivery.testing.env import IN_CI
from delivery.testing.factories import add_subscription, trade
from delivery.testing.metrics import counter_value
from delivery.testing.processes import ProvisionError
from delivery.testing.rabbitmq import LocalRabbitMQ
from delivery.testing.rabbitmq_cluster import LocalRabbitCluster
from delivery.testing.receiver import Receiver
from delivery.testing.waits import wait_until
from tests.support import running

pytestmark = pytest.mark.integration

EVENTS = 300
BATCH = 10


async def _produce(url: str, first: int, last: int) -> None:
    """Events ``first`` to ``last - 1``, BATCH a transaction, as a steady trickle."""
    conn = await asyncpg.connect(url)
    try:
        for start in range(first, last, BATCH):
            await publish_many(
                conn, [trade(i, account=f"acc_bf_{i % 5}") for i in range(start, start + BATCH)]
            )
            await asyncio.sleep(0.05)  # a steady trickle rather than one burst
    finally:
        await conn.close()


def _queue_line(node: LocalRabbitMQ, queue: str) -> str:
    """``name consumers members`` of one queue as ``node`` lists it."""
    out = node.ctl("list_queues", "-q", "--no-table-headers", "name", "consumers", "members")
    return next((line for line in out.splitlines() if line.startswith(queue + "\t")), "")


def _consumers(node: LocalRabbitMQ, queue: str) -> str:
    """The consumers of ``queue`` whose channels are on ``node`` (list_consumers is per node
    where list_queues' count of a quorum queue's consumers lagged behind after a failover)."""
    out = node.ctl("list_consumers", "-q", "--no-table-headers", "queue_name", "consumer_tag")
    return "\n".join(line for line in out.splitlines() if line.startswith(queue + "\t"))


def _connections(node: LocalRabbitMQ) -> str:
    return node.ctl("list_connections", "-q", "--no-table-headers", "client_properties")


async def test_a_killed_node_fails_the_process_over_to_another_and_every_event_arrives(
    settings: Settings,
):
    cluster = LocalRabbitCluster(size=3)
    try:
        try:
            await asyncio.to_thread(cluster.start)
        except ProvisionError as exc:
            if IN_CI:
                pytest.fail(f"cannot start a throwaway RabbitMQ cluster: {exc}")
            pytest.skip(f"cannot start a throwaway RabbitMQ cluster: {exc}")
        first, second, third = cluster.nodes
        settings = settings.model_copy(update={"amqp_url": cluster.url})
        dispatch_queue = f"{settings.amqp_prefix}.dispatch"
        async with Receiver() as receiver:
            conn = await asyncpg.connect(settings.database_url)
            try:
                await add_subscription(conn, receiver, "/hook", patterns="*")
            finally:
                await conn.close()
            async with running(settings) as health:
                # Given a process connected to the first listed node, its queue on all three
                assert "delivery-worker" in await asyncio.to_thread(_connections, first)
                line = await asyncio.to_thread(_queue_line, first, dispatch_queue)
                assert line.count("@localhost") == 3, line
                # and a steady stream of events going out
                half = EVENTS // 2
                await _produce(settings.database_url, 0, half)
                await receiver.wait_for(
                    lambda r: r.unique_count() >= EVENTS // 4, 60, "a quarter delivered"
                )
                # When that node is killed while events are in flight, and more are published
                killed = time.monotonic()
                await asyncio.to_thread(first.kill)
                await _produce(settings.database_url, half, EVENTS)
                # Then every event arrives, through the nodes left (the relay published the
                # second half through one of them)
                await receiver.wait_for(
                    lambda r: r.unique_count() >= EVENTS, 90, "every event delivered"
                )
                delivered_after_s = time.monotonic() - killed
                assert all(a.signature_ok for a in receiver.delivered())
                # And the same process consumes from another node (it was never restarted)
                seen: list[str] = []

                def consumed() -> bool:
                    seen[:] = [_consumers(n, dispatch_queue) for n in (second, third)]
                    return any(seen)

                try:
                    await wait_until(
                        lambda: asyncio.to_thread(consumed), timeout_s=30, what="a consumer"
                    )
                except TimeoutError:
                    pytest.fail(f"no consumer of {dispatch_queue} on the nodes left: {seen}")
                assert "delivery-worker" in await asyncio.to_thread(_connections, second) + (
                    await asyncio.to_thread(_connections, third)
                )
                # And it knows one node is lost, and stays ready: two of three are a majority
                await wait_until(
                    lambda: counter_value("delivery_amqp_nodes_reachable") == 2,
                    timeout_s=30,
                    what="two nodes reachable",
                )
                await wait_until(lambda: health.ready, timeout_s=30, what="ready")
                # When a second node dies, then it reaches a minority and says it is not ready
                await asyncio.to_thread(third.kill)
                await wait_until(
                    lambda: not health.ready and not health.report()["components"]["amqp_nodes"],
                    timeout_s=30,
                    what="not ready on the minority side",
                )
                print(
                    f"\n[broker failover] every event delivered {delivered_after_s:.1f} s after"
                    f" the kill; {len(receiver.duplicates())} duplicates"
                )
    finally:
        with contextlib.suppress(Exception):
            await asyncio.to_thread(cluster.close)
