"""The peers' job written the way an asyncio consumer does it: asyncpg + aiohttp, one pooled
connection per message in progress. The hand-written asyncio, FastStream and taskiq peers all
run this one class, so they differ only in how their framework consumes and acks."""

from __future__ import annotations

import contextlib
import time
from collections.abc import AsyncIterator

import aiohttp
import asyncpg

from bench.peers.common import HTTP_TIMEOUT_S, INBOX_SQL, RECORD_SQL, DeliveryFailed, PeerConfig
from delivery.signing import secret_key, webhook_headers


def _asyncpg(sql: str) -> str:
    n = 0
    while "%s" in sql:
        n += 1
        sql = sql.replace("%s", f"${n}", 1)
    return sql


_INBOX = _asyncpg(INBOX_SQL)
_RECORD = _asyncpg(RECORD_SQL)


class AsyncJob:
    def __init__(self, config: PeerConfig, pool: asyncpg.Pool, http: aiohttp.ClientSession) -> None:
        self._config = config
        self._pool = pool
        self._http = http
        self._keys = [secret_key(config.secret)]

    @classmethod
    @contextlib.asynccontextmanager
    async def open(cls, config: PeerConfig, size: int) -> AsyncIterator[AsyncJob]:
        """The job with a pool of ``size`` connections and as many HTTP connections."""
        pool = await asyncpg.create_pool(config.database_url, min_size=1, max_size=size)
        assert pool is not None
        connector = aiohttp.TCPConnector(limit=size)
        timeout = aiohttp.ClientTimeout(total=HTTP_TIMEOUT_S)
        try:
            async with aiohttp.ClientSession(connector=connector, timeout=timeout) as http:
                yield cls(config, pool, http)
        finally:
            await pool.close()

    async def __call__(self, event_id: str, body: bytes) -> None:
        """Raises (and rolls back) unless the subscriber answered 2xx: the caller must then
        leave the message to be delivered again."""
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
