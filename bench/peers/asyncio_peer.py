"""The hand-written asyncio peer: aio-pika + aiohttp + asyncpg on uvloop, prefetch 100, at most
``BENCH_CONCURRENCY`` messages in progress (a semaphore; one pooled connection each).

    python -m bench.peers.asyncio_peer      (configured by the BENCH_* variables)

SIGTERM stops consuming, lets in-flight messages finish, and exits 0.
"""

from __future__ import annotations

import asyncio
import signal

import aio_pika
import uvloop
from aio_pika.abc import AbstractIncomingMessage

from bench.peers.async_job import AsyncJob
from bench.peers.common import PeerConfig


class Worker:
    def __init__(self, config: PeerConfig, job: AsyncJob) -> None:
        self._config = config
        self._job = job
        self._slots = asyncio.Semaphore(config.concurrency)

    async def handle(self, message: AbstractIncomingMessage) -> None:
        try:
            # Ack on success; on any exception (cancellation included) nack with requeue.
            async with message.process(requeue=True):
                await self._job(message.message_id or "", message.body)
        finally:
            self._slots.release()

    async def consume(self, stop: asyncio.Event) -> None:
        connection = await aio_pika.connect_robust(self._config.amqp_url)
        async with connection:
            channel = await connection.channel()
            await channel.set_qos(prefetch_count=self._config.prefetch)
            queue = await channel.declare_queue(self._config.queue, durable=True)
            async with asyncio.TaskGroup() as tg:
                inbox: asyncio.Queue[AbstractIncomingMessage] = asyncio.Queue()
                tag = await queue.consume(inbox.put)
                while not stop.is_set():
                    getter = asyncio.ensure_future(inbox.get())
                    stopper = asyncio.ensure_future(stop.wait())
                    done, _ = await asyncio.wait(
                        {getter, stopper}, return_when=asyncio.FIRST_COMPLETED
                    )
                    stopper.cancel()
                    if getter not in done:
                        getter.cancel()
                        break
                    await self._slots.acquire()
                    tg.create_task(self.handle(getter.result()))
                await queue.cancel(tag)
                while not inbox.empty():  # taken from the broker but not started: hand back
                    await inbox.get_nowait().nack(requeue=True)


async def main() -> None:
    config = PeerConfig.from_env()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    async with AsyncJob.open(config, config.concurrency) as job:
        await Worker(config, job).consume(stop)


if __name__ == "__main__":
    uvloop.run(main())
