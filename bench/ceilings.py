"""The machine's ceilings for the three things a delivered event costs (issue #17 item 7), each
measured alone with one client, so the scaling figures' CPU per event can be set against them:

    publishes   confirmed publishes/s of one aio-pika publisher to a quorum queue, in windows of
                ``PUBLISH_WINDOW`` (as the relay keeps several in flight), persistent and
                mandatory, for a one-event message and for a pack of 50 (the relay's default)
    posts       POSTs/s from one aiohttp client (``POST_CONCURRENCY`` in flight, as a worker's
                per-subscriber cap) to the bench receiver, signed, the receiver verifying
    rows        outbox rows/s written by ``delivery.publish_many`` in batches of 1,000 (one
                transaction each, the ``delivery.publish_events`` function) by one connection

Each reports its rate and the CPU per item of the client (this process) and of the server.
Run by ``python -m bench.scaling`` on its own servers before the scaling sessions.
"""

from __future__ import annotations

import asyncio
import secrets
import tempfile
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import aio_pika
import aiohttp
import asyncpg

from bench.measure import cpu_between, snapshot
from bench.receiver import ReceiverProcess
from bench.workload import Event, make_workload
from delivery.broker.topology import quorum_arguments
from delivery.outbox import publish_many
from delivery.signing import generate_secret, signing_key, webhook_headers
from delivery.store.migrations import migrate
from delivery.testing.services import create_database, drop_database

PUBLISH_WINDOW = 500
PACK_EVENTS = 50  # DELIVERY_RELAY_EVENTS_PER_MESSAGE's default
POST_CONCURRENCY = 16  # DELIVERY_PER_SUBSCRIPTION_MAX_IN_FLIGHT's default
ROW_BATCH = 1000


class _Cpu:
    """CPU seconds of this process and of a server's processes over a block."""

    def __init__(self, server: Iterable[int]) -> None:
        self._server = set(server)

    def __enter__(self) -> _Cpu:
        self._client0 = time.process_time()
        self._before = snapshot(self._server)
        self._t0 = time.perf_counter()
        return self

    def __exit__(self, *_exc: object) -> None:
        self.wall_s = time.perf_counter() - self._t0
        self.client_s = time.process_time() - self._client0
        self.server_s = cpu_between(self._before, snapshot(self._server))


def _rate(what: str, n: int, cpu: _Cpu, **extra: Any) -> dict[str, Any]:
    return {
        "what": what,
        "items": n,
        "wall_s": round(cpu.wall_s, 3),
        "per_s": round(n / cpu.wall_s, 1),
        "client_cpu_ms_per_item": round(cpu.client_s * 1000 / n, 4),
        "server_cpu_ms_per_item": round(cpu.server_s * 1000 / n, 4),
        **extra,
    }


async def confirmed_publishes(
    amqp_url: str, broker_pids: set[int], *, nodes: int, messages: int, events_per_message: int
) -> dict[str, Any]:
    """``messages`` persistent, mandatory publishes to a fresh quorum queue, confirmed."""
    body = make_workload(1, "ceiling")[0].body * events_per_message
    queue_name = f"bench_ceiling_{secrets.token_hex(3)}"
    connection = await aio_pika.connect(amqp_url)
    async with connection:
        channel = await connection.channel(publisher_confirms=True, on_return_raises=True)
        queue = await channel.declare_queue(
            queue_name, durable=True, arguments=quorum_arguments(nodes)
        )
        try:
            with _Cpu(broker_pids) as cpu:
                for start in range(0, messages, PUBLISH_WINDOW):
                    await asyncio.gather(
                        *(
                            channel.default_exchange.publish(
                                aio_pika.Message(
                                    body, delivery_mode=aio_pika.DeliveryMode.PERSISTENT
                                ),
                                routing_key=queue_name,
                                mandatory=True,
                            )
                            for _ in range(min(PUBLISH_WINDOW, messages - start))
                        )
                    )
        finally:
            await queue.delete(if_unused=False, if_empty=False)
    return _rate(
        f"confirmed publishes, {nodes} node(s), {events_per_message} event(s)/message",
        messages,
        cpu,
        bytes_per_message=len(body),
    )


async def posts(count: int) -> dict[str, Any]:
    """``count`` signed POSTs from one aiohttp session to a fresh bench receiver."""
    secret = generate_secret()
    events = make_workload(count, f"c{secrets.token_hex(2)}")
    with tempfile.TemporaryDirectory(prefix="bench-ceiling-") as logs:
        return await _posts(secret, events, Path(logs))


async def _posts(secret: str, events: list[Event], logs: Path) -> dict[str, Any]:
    keys = [signing_key(secret)]
    count = len(events)
    receiver = ReceiverProcess(secret, logs)
    await receiver.start(["/s0"])
    try:
        url = receiver.url("/s0")
        connector = aiohttp.TCPConnector(limit=POST_CONCURRENCY)
        async with aiohttp.ClientSession(connector=connector) as http:
            semaphore = asyncio.Semaphore(POST_CONCURRENCY)

            async def post(i: int) -> None:
                e = events[i]
                async with semaphore:
                    headers = webhook_headers(keys, e.id, int(time.time()), e.body)
                    async with http.post(url, data=e.body, headers=headers) as r:
                        r.raise_for_status()

            with _Cpu({receiver.pid}) as cpu:
                async with asyncio.TaskGroup() as tg:
                    for i in range(count):
                        tg.create_task(post(i))
        stats = await receiver.stats()
    finally:
        await receiver.stop()
    return _rate(
        f"POSTs, one aiohttp client, {POST_CONCURRENCY} in flight",
        count,
        cpu,
        bad_signatures=stats["bad_signatures"],
    )


async def outbox_rows(admin_db_url: str, postgres_pids: set[int], rows: int) -> dict[str, Any]:
    """``rows`` events into a fresh outbox through ``publish_many``, ``ROW_BATCH`` at a time."""
    name = f"bench_ceiling_{secrets.token_hex(3)}"
    url = await create_database(admin_db_url, name)
    try:
        await migrate(url)
        raw = [e.raw for e in make_workload(rows, f"r{secrets.token_hex(2)}")]
        conn = await asyncpg.connect(url)
        try:
            with _Cpu(postgres_pids) as cpu:
                for start in range(0, rows, ROW_BATCH):
                    async with conn.transaction():
                        await publish_many(conn, raw[start : start + ROW_BATCH])
            stored = await conn.fetchval("SELECT count(*) FROM delivery.outbox")
        finally:
            await conn.close()
    finally:
        await drop_database(admin_db_url, name)
    return _rate(f"outbox rows, batches of {ROW_BATCH}", rows, cpu, stored=stored)
