"""The hand-written asyncio peer: aio-pika + aiohttp + asyncpg on uvloop, prefetch 100, at most
``BENCH_CONCURRENCY`` messages in progress (a semaphore; one pooled connection each).

    python -m bench.peers.asyncio_peer      (configured by the BENCH_* variables)

SIGTERM stops consuming, lets in-flight messages finish, and exits 0.
"""

from __future__ import annotations

import asyncio
import signal
import time

import aio_pika
import aiohttp
import asyncpg
import uvloop
from aio_pika.abc import AbstractIncomingMessage

from bench.peers.common import (
    HTTP_TIMEOUT_S,
    INBOX_SQL,
    RECORD_SQL,
    DeliveryFailed,
    PeerConfig,
)
from delivery.signing import secret_key, webhook_headers


def _asyncpg(sql: str) -> str:
    n = 0
    while "%s" in sql:
        n += 1
        sql = sql.replace("%s", f"${n}", 1)
    return sql


_INBOX = _asyncpg(INBOX_SQL)
_RECORD = _asyncpg(RECORD_SQL)


class Worker:
    def __init__(self, config: PeerConfig, pool: asyncpg.Pool, http: aiohttp.ClientSession) -> None:
        self._config = config
        self._pool = pool
        self._http = http
        self._keys = [secret_key(config.secret)]
        self._slots = asyncio.Semaphore(config.concurrency)

    async def handle(self, message: AbstractIncomingMessage) -> None:
        try:
            # Ack on success; on any exception (cancellation included) nack with requeue.
            async with message.process(requeue=True):
                await self._deliver(message.message_id or "", message.body)
        finally:
            self._slots.release()

    async def _deliver(self, event_id: str, body: bytes) -> None:
        async with self._pool.acquire() as conn, conn.transaction():
            if await conn.execute(_INBOX, event_id) == "INSERT 0 0":
                return  # already delivered: ack without a second POST
            headers = webhook_headers(self._keys, event_id, int(time.time()), body)
            started = time.perf_counter()
            async with self._http.post(self._config.target_url, data=body, headers=headers) as r:
                await r.read()
                status = r.status
            if not 200 <= status < 300:
                raise DeliveryFailed(f"HTTP {status}")
            await conn.execute(_RECORD, event_id, status, (time.perf_counter() - started) * 1000)

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
    pool = await asyncpg.create_pool(config.database_url, min_size=1, max_size=config.concurrency)
    assert pool is not None
    connector = aiohttp.TCPConnector(limit=config.concurrency)
    timeout = aiohttp.ClientTimeout(total=HTTP_TIMEOUT_S)
    try:
        async with aiohttp.ClientSession(connector=connector, timeout=timeout) as http:
            await Worker(config, pool, http).consume(stop)
    finally:
        await pool.close()


if __name__ == "__main__":
    uvloop.run(main())
