"""The peers as systems under test: how the asyncio, FastStream, taskiq, Celery and Dramatiq
peers are started, fed, counted and stopped. Their entry point is their RabbitMQ queue; each is
published to with its framework's own client (aio-pika, ``RabbitBroker.publish``, ``kiq``,
``send_task``, ``broker.enqueue``)."""

from __future__ import annotations

import asyncio
import contextlib
import sys
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import replace
from typing import Any

import aio_pika

from bench.peers.common import SCHEMA, PeerConfig
from bench.processes import env, spawn
from bench.system import System
from bench.workload import Event


async def _paced(
    events: Sequence[Event], rate: float, publish_one: Callable[[Event], Awaitable[None]]
) -> dict[str, float]:
    published: dict[str, float] = {}
    started = time.time()
    for i, event in enumerate(events):
        if rate:
            delay = started + i / rate - time.time()
            if delay > 0:
                await asyncio.sleep(delay)
        await publish_one(event)
        published[event.id] = time.time()
    return published


def _paced_sync(
    events: Sequence[Event], rate: float, publish_one: Callable[[Event], None]
) -> dict[str, float]:
    published: dict[str, float] = {}
    started = time.time()
    for i, event in enumerate(events):
        if rate:
            delay = started + i / rate - time.time()
            if delay > 0:
                time.sleep(delay)
        publish_one(event)
        published[event.id] = time.time()
    return published


class _Peer(System):
    def config(self) -> PeerConfig:
        return PeerConfig(
            database_url=self.db_url,
            amqp_url=self.amqp_url,
            queue=f"{self.prefix}.queue",
            target_url=self.receiver.url(self.subscriber_path(0)),
            secret=self.secret,
            concurrency=32,
            prefetch=100,
        )

    async def prepare_database(self) -> None:
        assert self.conn is not None
        await self.conn.execute(SCHEMA)

    async def recorded(self) -> int:
        assert self.conn is not None
        return int(await self.conn.fetchval("SELECT count(*) FROM bench_deliveries"))

    def queues(self) -> list[str]:
        return [self.config().queue]


class AsyncioPeer(_Peer):
    name = "asyncio"
    label = "hand-written asyncio (aio-pika + aiohttp + asyncpg)"

    async def start_processes(self, processes: int) -> None:
        config = self.config()
        self._amqp = await aio_pika.connect(self.amqp_url)
        self._channel = await self._amqp.channel(publisher_confirms=False)
        await self._channel.declare_queue(config.queue, durable=True)
        self.procs.append(
            await spawn(
                [sys.executable, "-m", "bench.peers.asyncio_peer"],
                env(config.env()),
                self.log_dir / "asyncio.log",
            )
        )

    async def publish(self, events: Sequence[Event], rate: float) -> dict[str, float]:
        exchange = self._channel.default_exchange
        queue = self.config().queue

        async def one(event: Event) -> None:
            await exchange.publish(
                aio_pika.Message(
                    event.body,
                    message_id=event.id,
                    content_type="application/json",
                    delivery_mode=aio_pika.DeliveryMode.PERSISTENT,
                ),
                routing_key=queue,
            )

        return await _paced(events, rate, one)

    async def teardown(self, *, keep_logs: bool = False) -> None:
        if getattr(self, "_amqp", None) is not None:
            with contextlib.suppress(Exception):
                await self._amqp.close()
        await super().teardown(keep_logs=keep_logs)


class FastStreamPeer(_Peer):
    name = "faststream"
    label = "FastStream (RabbitBroker, 2 processes x prefetch 16, NACK_ON_ERROR)"
    requires = "faststream"

    def config(self) -> PeerConfig:
        from bench.peers.faststream_peer import WORKERS

        # Per process: aio-pika runs every prefetched message at once, so prefetch is the
        # concurrency; 2 x 16 = the 32 in flight of every other peer.
        per_process = 32 // WORKERS
        return replace(super().config(), concurrency=per_process, prefetch=per_process)

    async def start_processes(self, processes: int) -> None:
        from bench.peers.faststream_peer import WORKERS, make_broker, queue

        config = self.config()
        self._broker = make_broker(self.amqp_url, config.prefetch)
        await self._broker.start()
        await self._broker.declare_queue(queue(config.queue))
        self.procs.append(
            await spawn(
                [
                    sys.executable,
                    "-m",
                    "faststream",
                    "run",
                    "bench.peers.faststream_peer:app",
                    "--workers",
                    str(WORKERS),
                    "--log-level",
                    "warning",
                ],
                env(config.env()),
                self.log_dir / "faststream.log",
            )
        )

    async def publish(self, events: Sequence[Event], rate: float) -> dict[str, float]:
        from bench.peers.faststream_peer import queue

        target = queue(self.config().queue)

        async def one(event: Event) -> None:
            await self._broker.publish(
                event.body, target, message_id=event.id, persist=True, mandatory=True
            )

        return await _paced(events, rate, one)

    async def teardown(self, *, keep_logs: bool = False) -> None:
        if getattr(self, "_broker", None) is not None:
            with contextlib.suppress(Exception):
                await self._broker.stop()
        await super().teardown(keep_logs=keep_logs)


class TaskiqPeer(_Peer):
    name = "taskiq"
    label = "taskiq (taskiq-aio-pika, 2 processes x 16 async tasks, when_executed)"
    requires = "taskiq_aio_pika"

    def config(self) -> PeerConfig:
        from bench.peers.taskiq_peer import MAX_ASYNC_TASKS, QOS

        return replace(super().config(), concurrency=MAX_ASYNC_TASKS, prefetch=QOS)

    async def start_processes(self, processes: int) -> None:
        from bench.peers.taskiq_peer import (
            MAX_ASYNC_TASKS,
            MAX_PREFETCH,
            WORKERS,
            make_broker,
        )

        config = self.config()
        # Its startup declares the exchange and queues the workers will consume, so nothing
        # published before they are up is lost.
        self._broker = make_broker(self.amqp_url, self.prefix)
        await self._broker.startup()
        self.procs.append(
            await spawn(
                [
                    sys.executable,
                    "-m",
                    "taskiq",
                    "worker",
                    "bench.peers.taskiq_peer:broker",
                    "--workers",
                    str(WORKERS),
                    "--max-async-tasks",
                    str(MAX_ASYNC_TASKS),
                    "--max-prefetch",
                    str(MAX_PREFETCH),
                    "--ack-type",
                    "when_executed",
                    "--log-level",
                    "WARNING",
                ],
                env(config.env()),
                self.log_dir / "taskiq.log",
            )
        )

    async def publish(self, events: Sequence[Event], rate: float) -> dict[str, float]:
        from taskiq.kicker import AsyncKicker

        from bench.peers.taskiq_peer import TASK_NAME

        kicker: AsyncKicker[Any, Any] = AsyncKicker(TASK_NAME, self._broker, {})

        async def one(event: Event) -> None:
            await kicker.kiq(event.id, event.body.decode())

        return await _paced(events, rate, one)

    def queues(self) -> list[str]:
        from bench.peers.taskiq_peer import names

        n = names(self.prefix)
        return [n["queue"], n["dead_letter"]]

    def exchanges(self) -> list[str]:
        return [self.prefix]

    async def teardown(self, *, keep_logs: bool = False) -> None:
        if getattr(self, "_broker", None) is not None:
            with contextlib.suppress(Exception):
                await self._broker.shutdown()
        await super().teardown(keep_logs=keep_logs)


class CeleryPeer(_Peer):
    name = "celery"
    label = "Celery (prefork, acks_late, concurrency 4)"
    requires = "celery"

    async def start_processes(self, processes: int) -> None:
        from bench.peers.celery_peer import make_app

        config = self.config()
        self._app = make_app(self.amqp_url, config.queue)
        self._app.conf.worker_enable_remote_control = False
        environ = env({**config.env(), "CELERY_WORKER_ENABLE_REMOTE_CONTROL": "false"})
        self.procs.append(
            await spawn(
                [
                    sys.executable,
                    "-m",
                    "celery",
                    "-A",
                    "bench.peers.celery_peer",
                    "worker",
                    "-P",
                    "prefork",
                    "-c",
                    "4",
                    "-Q",
                    config.queue,
                    "-l",
                    "warning",
                    "--without-gossip",
                    "--without-mingle",
                    "--without-heartbeat",
                    "-n",
                    f"{self.prefix}@%h",
                ],
                environ,
                self.log_dir / "celery.log",
            )
        )

    async def publish(self, events: Sequence[Event], rate: float) -> dict[str, float]:
        from bench.peers.celery_peer import TASK_NAME

        queue = self.config().queue
        app = self._app

        def run() -> dict[str, float]:
            with app.producer_or_acquire() as producer:

                def one(event: Event) -> None:
                    app.send_task(
                        TASK_NAME,
                        args=[event.id, event.body.decode()],
                        queue=queue,
                        producer=producer,
                    )

                return _paced_sync(events, rate, one)

        return await asyncio.to_thread(run)

    def exchanges(self) -> list[str]:
        return [self.config().queue]

    async def teardown(self, *, keep_logs: bool = False) -> None:
        await super().teardown(keep_logs=keep_logs)
        if getattr(self, "_app", None) is not None:
            with contextlib.suppress(Exception):
                self._app.close()


class DramatiqPeer(_Peer):
    name = "dramatiq"
    label = "Dramatiq (RabbitmqBroker, 4 processes x 8 threads)"
    requires = "dramatiq"

    async def start_processes(self, processes: int) -> None:
        config = self.config()
        self.procs.append(
            await spawn(
                [
                    sys.executable,
                    "-m",
                    "dramatiq",
                    "bench.peers.dramatiq_peer",
                    "--processes",
                    "4",
                    "--threads",
                    "8",
                    "--queues",
                    config.queue,
                ],
                env(config.env()),
                self.log_dir / "dramatiq.log",
            )
        )
        self._executor_broker = None

    def _broker(self) -> Any:
        if self._executor_broker is None:
            from dramatiq.brokers.rabbitmq import RabbitmqBroker

            self._executor_broker = RabbitmqBroker(url=self.amqp_url)
        return self._executor_broker

    async def publish(self, events: Sequence[Event], rate: float) -> dict[str, float]:
        from dramatiq import Message

        from bench.peers.dramatiq_peer import ACTOR_NAME

        queue = self.config().queue

        def run() -> dict[str, float]:
            broker = self._broker()

            def one(event: Event) -> None:
                broker.enqueue(
                    Message(
                        queue_name=queue,
                        actor_name=ACTOR_NAME,
                        args=(event.id, event.body.decode()),
                        kwargs={},
                        options={},
                    )
                )

            return _paced_sync(events, rate, one)

        # Dramatiq's broker keeps a channel per thread: always publish from the same one.
        return await asyncio.get_running_loop().run_in_executor(self._executor(), run)

    def _executor(self) -> Any:
        from concurrent.futures import ThreadPoolExecutor

        if getattr(self, "_pool", None) is None:
            self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="dramatiq-pub")
        return self._pool

    def queues(self) -> list[str]:
        q = self.config().queue
        return [q, f"{q}.DQ", f"{q}.XQ"]

    async def teardown(self, *, keep_logs: bool = False) -> None:
        broker = getattr(self, "_executor_broker", None)
        if broker is not None:
            with contextlib.suppress(Exception):
                await asyncio.get_running_loop().run_in_executor(self._executor(), broker.close)
        if getattr(self, "_pool", None) is not None:
            self._pool.shutdown(wait=False)
        await super().teardown(keep_logs=keep_logs)
