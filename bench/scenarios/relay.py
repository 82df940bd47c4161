"""``relay``: the relay's drain rate. A backlog is prepared in the outbox, one relay (default
settings, in the bench process) drains it, timed by the rows' own ``published_at`` marks."""

from __future__ import annotations

import asyncio
import contextlib
import secrets

import aio_pika
import asyncpg

from bench.sessions import Run, say
from delivery.broker.relay import Relay
from delivery.ops.health import Health
from delivery.outbox import publish_many
from delivery.settings import Settings
from delivery.store.migrations import migrate
from delivery.testing.services import create_database, drop_database

BATCH = 500


async def drain(database_url: str, amqp_url: str, rows: int, batch: int) -> float:
    name = f"bench_relay_{secrets.token_hex(3)}"
    url = await create_database(database_url, name)
    try:
        await migrate(url)
        conn = await asyncpg.connect(url)
        events = [
            {
                "type": "account.balance_changed",
                "account_id": f"acc_{i % 50}",
                "data": {"asset": "USD", "delta": "-1.50", "balance": f"{i}.00", "reason": "fee"},
            }
            for i in range(rows)
        ]
        for start in range(0, rows, 5000):
            await publish_many(conn, events[start : start + 5000])
        settings = Settings(
            database_url=url,
            amqp_url=amqp_url,
            amqp_prefix=name,
            relay_batch_size=batch,
            admin_port=0,
            allow_private_targets=True,
        )
        pool = await asyncpg.create_pool(url, min_size=1, max_size=2)
        relay = Relay(settings, pool, Health())
        stop = asyncio.Event()
        async with asyncio.TaskGroup() as tg:
            tg.create_task(relay.run(stop))
            # Poll lightly (a tight count(*) loop competes with the relay for PostgreSQL's CPU)
            # and time the drain from the rows' own marks: from the first batch's commit to the
            # last batch's, so connection set-up and polling granularity are excluded.
            while await conn.fetchval(
                "SELECT EXISTS (SELECT 1 FROM delivery.outbox WHERE published_at IS NULL)"
            ):
                await asyncio.sleep(0.1)
            stop.set()
        first, last, first_batch = await conn.fetchrow(
            """
            WITH b AS (SELECT min(published_at) AS t0, max(published_at) AS t1
                       FROM delivery.outbox)
            SELECT extract(epoch FROM b.t0), extract(epoch FROM b.t1),
                   (SELECT count(*) FROM delivery.outbox o, b
                    WHERE o.published_at < b.t0 + interval '1 millisecond')
            FROM b
            """
        )
        took = float(last - first)
        await pool.close()
        await conn.close()
        return (rows - first_batch) / took
    finally:
        with contextlib.suppress(Exception):
            await drop_database(database_url, name)
        # queues and exchanges are left under the unique prefix; remove them
        with contextlib.suppress(Exception):
            connection = await aio_pika.connect(amqp_url)
            async with connection:
                channel = await connection.channel()
                for queue in (f"{name}.dispatch", f"{name}.dispatch.dead"):
                    await channel.queue_delete(queue)
                for exchange in (f"{name}.events", f"{name}.dead"):
                    await channel.exchange_delete(exchange)


async def relay(run: Run) -> None:
    args = run.args
    run.results["relay"] = {"rows": args.relay_rows, "batch": BATCH, "rates": []}
    for i in range(args.runs):
        await run.quiet()
        rate = await drain(run.db, run.amqp, args.relay_rows, BATCH)
        say(f"run {i + 1}/{args.runs}: relay drain {rate:,.0f} rows/s")
        run.results["relay"]["rates"].append(rate)
        run.save()
