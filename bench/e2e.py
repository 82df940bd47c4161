"""End to end: publish N events (publish -> outbox -> relay -> RabbitMQ -> dispatch -> POST) to
one or more subscriptions of a local receiver, and report events/s, latency and the worker's
peak RSS and CPU.

    python bench/e2e.py --events 10000 [--subscriptions 1] [--processes 1] [--rate 0 (flat out)]

Uses DELIVERY_DATABASE_URL / DELIVERY_AMQP_URL when set (each run in its own database and
queue prefix), otherwise throwaway local services. The platform runs as real `delivery run`
subprocesses, measured from outside (/proc).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import secrets
import statistics
import sys
import time
from pathlib import Path

import asyncpg
import uvloop

from delivery.outbox import publish_many
from delivery.store import subscriptions
from delivery.store.migrations import migrate
from delivery.testing.receiver import Receiver
from delivery.testing.services import create_database, drop_database, provision_services


def make_events(n: int, accounts: int = 200) -> list[dict[str, object]]:
    """Realistic ~500-byte trade/account events."""
    events: list[dict[str, object]] = []
    for i in range(n):
        account = f"acc_{i % accounts:05d}"
        if i % 2:
            events.append(
                {
                    "type": "trade.executed",
                    "account_id": account,
                    "data": {
                        "trade_id": f"trd_{i:010d}",
                        "order_id": f"ord_{i:010d}",
                        "instrument": "BTC-USD",
                        "side": "buy" if i % 4 == 1 else "sell",
                        "quantity": "0.01250000",
                        "price": "64123.45000000",
                        "executed_at": "2026-11-23T10:00:00.123456Z",
                    },
                }
            )
        else:
            events.append(
                {
                    "type": "account.balance_changed",
                    "account_id": account,
                    "data": {
                        "asset": "USDT",
                        "delta": "-801.54312500",
                        "balance": "120394.11250000",
                        "reason": "trade",
                    },
                }
            )
    return events


def proc_stats(pid: int) -> tuple[float, int]:
    """(CPU seconds, peak RSS bytes) of a live process."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    ticks = os.sysconf("SC_CLK_TCK")
    cpu_s = (int(fields[11]) + int(fields[12])) / ticks
    peak = 0
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            peak = int(line.split()[1]) * 1024
    return cpu_s, peak


async def run(database_url: str, amqp_url: str, args: argparse.Namespace) -> dict[str, float]:
    name = f"bench_{secrets.token_hex(3)}"
    url = await create_database(database_url, name)
    procs: list[asyncio.subprocess.Process] = []
    try:
        await migrate(url)
        conn = await asyncpg.connect(url)
        async with Receiver() as receiver:
            for k in range(args.subscriptions):
                await subscriptions.add(conn, url=receiver.url(f"/s{k}"), patterns="*")
            env = {k: v for k, v in os.environ.items() if not k.startswith("DELIVERY_")}
            env.update(
                DELIVERY_DATABASE_URL=url,
                DELIVERY_AMQP_URL=amqp_url,
                DELIVERY_AMQP_PREFIX=name,
                DELIVERY_ADMIN_PORT="0",
                DELIVERY_LOG_LEVEL="warning",
                DELIVERY_LOG_FORMAT="json",
            )
            for _ in range(args.processes):
                procs.append(
                    await asyncio.create_subprocess_exec(
                        sys.executable,
                        "-m",
                        "delivery",
                        "run",
                        env=env,
                        stdout=asyncio.subprocess.DEVNULL,
                        stderr=asyncio.subprocess.DEVNULL,
                    )
                )
            # Warm-up: one event through, so start-up is not in the figures.
            await publish_many(conn, [make_events(1)[0] | {"id": "evt_warmup"}])
            expected_warm = args.subscriptions
            await receiver.wait_for(
                lambda r: len(r.delivered()) >= expected_warm, timeout_s=60, what="warm-up"
            )
            cpu_before = [proc_stats(p.pid)[0] for p in procs]
            events = make_events(args.events)
            commit_times: dict[str, float] = {}
            started = time.time()
            batch = 100
            for start in range(0, len(events), batch):
                chunk = events[start : start + batch]
                result = await publish_many(conn, chunk)
                now = time.time()
                for event_id in result.published:
                    commit_times[event_id] = now
                if args.rate:
                    target = started + (start + batch) / args.rate
                    delay = target - time.time()
                    if delay > 0:
                        await asyncio.sleep(delay)
            published_s = time.time() - started
            total = args.events * args.subscriptions + expected_warm
            await receiver.wait_for(
                lambda r: len(r.delivered()) >= total, timeout_s=600, what="all deliveries"
            )
            finished = max(a.arrived_at for a in receiver.delivered())
            stats = [proc_stats(p.pid) for p in procs]
            latencies = sorted(
                a.arrived_at - commit_times[a.webhook_id]
                for a in receiver.delivered()
                if a.webhook_id in commit_times
            )
            wall = finished - started
            cpu = sum(s[0] for s in stats) - sum(cpu_before)
            delivered = receiver.delivered()
            duplicates = len(delivered) - len({(a.path, a.webhook_id) for a in delivered})
            await conn.close()
            return {
                "events": args.events,
                "deliveries": args.events * args.subscriptions,
                "publish_s": published_s,
                "wall_s": wall,
                "events_per_s": args.events / wall,
                "deliveries_per_s": args.events * args.subscriptions / wall,
                "p50_ms": statistics.median(latencies) * 1000,
                "p95_ms": latencies[int(len(latencies) * 0.95)] * 1000,
                "p99_ms": latencies[int(len(latencies) * 0.99)] * 1000,
                "cpu_ms_per_event": cpu * 1000 / args.events,
                "peak_rss_mb": max(s[1] for s in stats) / 2**20,
                "duplicates": duplicates,
            }
    finally:
        for p in procs:
            with contextlib.suppress(ProcessLookupError):
                p.terminate()
        for p in procs:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(p.wait(), 30)
        with contextlib.suppress(Exception):
            await drop_database(database_url, name)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--events", type=int, default=10_000)
    parser.add_argument("--subscriptions", type=int, default=1)
    parser.add_argument("--processes", type=int, default=1)
    parser.add_argument("--rate", type=float, default=0.0, help="events/s; 0 = flat out")
    args = parser.parse_args()
    with provision_services() as services:
        result = uvloop.run(run(services.database_url, services.amqp_url, args))
    for key, value in result.items():
        print(f"{key:>18}: {value:,.2f}" if isinstance(value, float) else f"{key:>18}: {value}")


if __name__ == "__main__":
    main()
