"""Publishing over HTTP (`POST /v1/events` of `delivery api`) beside `delivery.publish` from Python.

    python -m bench.api_publish                      # 20 s per mode, 16 concurrent clients
    python -m bench.api_publish --seconds 5 --concurrency 8

Modes, each for the same wall time with the same number of concurrent clients:

* ``http-single``: one event per request (``Idempotency-Key``);
* ``http-batch-100``: ``{"events": [...]}`` of 100 per request;
* ``python-single`` / ``python-batch-100``: ``delivery.publish`` / ``publish_many`` on a pooled
  asyncpg connection, one transaction per call: the floor the HTTP path adds its cost to.

Printed per mode: events/s, requests (calls)/s, and latency per request p50 / p99 / max. One
``delivery api`` process on 127.0.0.1 with a tenant that has no rate limit. Services:
DELIVERY_DATABASE_URL / DELIVERY_AMQP_URL when set (a database of its own, dropped afterwards),
otherwise throwaway local servers. Not a test: the figures go in bench/notes.md.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import secrets
import statistics
import time
from collections.abc import Awaitable, Callable
from typing import Any

import aiohttp
import asyncpg

from delivery import publish, publish_many
from delivery.store import keys, tenants
from delivery.store.migrations import migrate
from delivery.testing.api import api_process
from delivery.testing.factories import balance
from delivery.testing.services import create_database, drop_database, provision_services

MODES = ("http-single", "http-batch-100", "python-single", "python-batch-100")
_BATCH = 100


def _event(run: str, n: int) -> dict[str, Any]:
    return {**balance(n, account=f"acc_{n % 1000}"), "id": f"evt_{run}_{n:09d}"}


class _Counter:
    def __init__(self, run: str) -> None:
        self.run = run
        self.n = 0

    def take(self, count: int) -> list[dict[str, Any]]:
        start = self.n
        self.n += count
        return [_event(self.run, i) for i in range(start, start + count)]


async def _drive(
    call: Callable[[], Awaitable[int]], seconds: float, concurrency: int
) -> dict[str, Any]:
    latencies: list[float] = []
    events = 0
    deadline = time.monotonic() + seconds

    async def client() -> None:
        nonlocal events
        while time.monotonic() < deadline:
            t0 = time.perf_counter()
            published = await call()  # not `events += await ...`: that reads events first
            events += published
            latencies.append(time.perf_counter() - t0)

    started = time.monotonic()
    async with asyncio.TaskGroup() as group:
        for _ in range(concurrency):
            group.create_task(client())
    wall_s = time.monotonic() - started
    latencies.sort()
    return {
        "events": events,
        "events_per_s": round(events / wall_s),
        "requests_per_s": round(len(latencies) / wall_s),
        "p50_ms": round(latencies[len(latencies) // 2] * 1000, 2),
        "p99_ms": round(latencies[int(len(latencies) * 0.99)] * 1000, 2),
        "max_ms": round(latencies[-1] * 1000, 2),
        "mean_ms": round(statistics.fmean(latencies) * 1000, 2),
    }


async def _http_mode(
    base: str, key: str, batch: int, counter: _Counter, *, seconds: float, concurrency: int
) -> dict[str, Any]:
    headers = {"Authorization": f"Bearer {key}"}
    connector = aiohttp.TCPConnector(limit=concurrency)
    async with aiohttp.ClientSession(base, headers=headers, connector=connector) as http:

        async def call() -> int:
            if batch == 1:
                (event,) = counter.take(1)
                body: Any = event
                extra = {"Idempotency-Key": event["id"]}
            else:
                body, extra = {"events": counter.take(batch)}, {}
            async with http.post("/v1/events", json=body, headers=extra) as response:
                if response.status != 202:
                    raise RuntimeError(f"{response.status}: {await response.text()}")
                answer = await response.json()
            return int(answer["published"])

        return await _drive(call, seconds, concurrency)


async def _python_mode(
    pool: asyncpg.Pool, batch: int, counter: _Counter, seconds: float, concurrency: int
) -> dict[str, Any]:
    async def call() -> int:
        async with pool.acquire() as conn, conn.transaction():
            if batch == 1:
                result = await publish(conn, counter.take(1)[0])
            else:
                result = await publish_many(conn, counter.take(batch))
        return len(result.published)

    return await _drive(call, seconds, concurrency)


async def run(args: argparse.Namespace, db_admin: str, amqp: str) -> list[dict[str, Any]]:
    db_name = f"dlv_bench_api_{secrets.token_hex(4)}"
    db_url = await create_database(db_admin, db_name)
    results: list[dict[str, Any]] = []
    try:
        await migrate(db_url)
        conn = await asyncpg.connect(db_url)
        try:
            tenant = await tenants.add(conn, "bench")
            _, key = await keys.create(conn, tenant.id)
        finally:
            await conn.close()
        env = {
            **os.environ,
            "DELIVERY_DATABASE_URL": db_url,
            "DELIVERY_AMQP_URL": amqp,
            "DELIVERY_LOG_LEVEL": "warning",
        }
        pool = await asyncpg.create_pool(
            db_url, min_size=args.concurrency, max_size=args.concurrency
        )
        try:
            async with api_process(env) as api:
                counter = _Counter(secrets.token_hex(3))
                for mode in args.only or MODES:
                    batch = _BATCH if mode.endswith("-100") else 1
                    if mode.startswith("http"):
                        figures = await _http_mode(
                            api.url,
                            key,
                            batch,
                            counter,
                            seconds=args.seconds,
                            concurrency=args.concurrency,
                        )
                    else:
                        figures = await _python_mode(
                            pool, batch, counter, args.seconds, args.concurrency
                        )
                    result = {"mode": mode, "concurrency": args.concurrency, **figures}
                    print(json.dumps(result), flush=True)
                    results.append(result)
            # Every event reported published is in the outbox, once.
            stored = await pool.fetchval("SELECT count(*) FROM delivery.outbox")
        finally:
            await pool.close()
        reported = sum(r["events"] for r in results)
        if stored != reported:
            raise RuntimeError(f"{reported} events reported published, {stored} in the outbox")
    finally:
        await drop_database(db_admin, db_name)
    return results


async def main(args: argparse.Namespace) -> None:
    with provision_services(progress=lambda line: print(f"[services] {line}")) as services:
        results = await run(args, services.database_url, services.amqp_url)
    print(f"\n{'mode':<18} {'events/s':>9} {'req/s':>7} {'p50 ms':>7} {'p99 ms':>7} {'max ms':>7}")
    for r in results:
        print(
            f"{r['mode']:<18} {r['events_per_s']:>9} {r['requests_per_s']:>7}"
            f" {r['p50_ms']:>7} {r['p99_ms']:>7} {r['max_ms']:>7}"
        )


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--seconds", type=float, default=20.0, help="wall time per mode (default 20)")
    p.add_argument("--concurrency", type=int, default=16, help="concurrent clients (default 16)")
    p.add_argument("--only", action="append", choices=MODES, help="run only this mode (repeatable)")
    return p


def cli() -> None:
    asyncio.run(main(parser().parse_args()))


if __name__ == "__main__":
    cli()
