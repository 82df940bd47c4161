"""Issue figures for failure handling, measured on the real pipeline:

1. A subscriber failing 50 % of requests (HTTP 500) next to a healthy one: attempts per event
   and the extra latency it pays (with a compressed schedule 1s,2s,4s,8s,16s,32s so the run is
   short; the extra latency scales with the schedule).
2. A hanging subscriber next to a healthy one: the healthy one's throughput with and without it.

    python bench/failures.py [--events 2000]
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

import asyncpg
import uvloop

from delivery.outbox import publish_many
from delivery.store import subscriptions
from delivery.store.migrations import migrate
from delivery.testing.receiver import Behaviour, Receiver
from delivery.testing.services import create_database, drop_database, provision_services

sys.path.insert(0, os.path.dirname(__file__))
from e2e import make_events


async def one_run(
    database_url: str, amqp_url: str, events: int, behaviours: dict[str, Behaviour], **env: str
) -> tuple[Receiver, dict[str, float], float]:
    name = f"bench_f_{secrets.token_hex(3)}"
    url = await create_database(database_url, name)
    proc = None
    try:
        await migrate(url)
        conn = await asyncpg.connect(url)
        receiver = Receiver()
        await receiver.__aenter__()
        for path, behaviour in behaviours.items():
            receiver.set_behaviour(path, behaviour)
            await subscriptions.add(conn, url=receiver.url(path), patterns="*")
        penv = {k: v for k, v in os.environ.items() if not k.startswith("DELIVERY_")}
        penv.update(
            DELIVERY_DATABASE_URL=url,
            DELIVERY_AMQP_URL=amqp_url,
            DELIVERY_AMQP_PREFIX=name,
            DELIVERY_ADMIN_PORT="0",
            DELIVERY_LOG_LEVEL="error",
            **env,
        )
        proc = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "delivery",
            "run",
            env=penv,
            stdout=asyncio.subprocess.DEVNULL,
            stderr=asyncio.subprocess.DEVNULL,
        )
        commit: dict[str, float] = {}
        started = time.time()
        batch = make_events(events)
        for i in range(0, events, 100):
            result = await publish_many(conn, batch[i : i + 100])
            commit.update(dict.fromkeys(result.published, time.time()))
        healthy = "/healthy"
        await receiver.wait_for(
            lambda r: len(r.unique_ids(healthy)) >= events, timeout_s=600, what="healthy"
        )
        healthy_done = max(a.arrived_at for a in receiver.delivered(healthy)) - started
        if not any(b.hang for b in behaviours.values()):
            # Every delivery reaches a final state: delivered, or dead once its schedule is
            # used up (a 50 % failure rate exhausts 0.5^attempts of them).
            deadline = time.monotonic() + 900
            while (
                await conn.fetchval(
                    "SELECT count(*) FROM delivery.deliveries WHERE state = 'pending'"
                )
                and time.monotonic() < deadline
            ):
                await asyncio.sleep(0.5)
            dead = await conn.fetchval(
                "SELECT count(*) FROM delivery.deliveries WHERE state = 'dead'"
            )
            print(f"  dead letters after the schedule was used up: {dead}")
        await conn.close()
        return receiver, commit, healthy_done
    finally:
        if proc is not None:
            proc.terminate()
            with contextlib.suppress(Exception):
                await asyncio.wait_for(proc.wait(), 30)
        with contextlib.suppress(Exception):
            await drop_database(database_url, name)


def latencies(receiver: Receiver, path: str, commit: dict[str, float]) -> list[float]:
    first_ok: dict[str, float] = {}
    for a in receiver.delivered(path):
        first_ok.setdefault(a.webhook_id, a.arrived_at)
    return sorted(t - commit[i] for i, t in first_ok.items() if i in commit)


def pct(values: list[float], q: float) -> float:
    return values[min(len(values) - 1, int(len(values) * q))]


async def main_async(database_url: str, amqp_url: str, events: int) -> None:
    schedule = "1s,2s,4s,8s,16s,32s,32s,32s"
    receiver, commit, _ = await one_run(
        database_url,
        amqp_url,
        events,
        {"/healthy": Behaviour(), "/flaky": Behaviour(fail_rate=0.5, fail_status=500, seed=1)},
        DELIVERY_RETRY_SCHEDULE=schedule,
        DELIVERY_CIRCUIT_FAILURE_THRESHOLD="1000000",
    )
    flaky = [a for a in receiver.arrivals if a.path == "/flaky"]
    lat_h = latencies(receiver, "/healthy", commit)
    lat_f = latencies(receiver, "/flaky", commit)
    print(f"50%-failing subscriber, {events} events, schedule {schedule} (+-20% jitter):")
    print(
        f"  attempts per event: {len(flaky) / events:.2f} (ideal for p=0.5: 2.00); "
        f"failures {sum(1 for a in flaky if a.status == 500)}"
    )
    h50, h99 = statistics.median(lat_h) * 1000, pct(lat_h, 0.99) * 1000
    f50, f99 = statistics.median(lat_f) * 1000, pct(lat_f, 0.99) * 1000
    print(f"  healthy  p50 {h50:,.0f} ms  p99 {h99:,.0f} ms")
    print(f"  flaky    p50 {f50:,.0f} ms  p99 {f99:,.0f} ms")
    print(f"  extra latency of the flaky one: p50 +{f50 - h50:,.0f} ms, p99 +{f99 - h99:,.0f} ms")
    await receiver.__aexit__(None, None, None)

    alone, _, t_alone = await one_run(database_url, amqp_url, events, {"/healthy": Behaviour()})
    await alone.__aexit__(None, None, None)
    hung, _, t_hung = await one_run(
        database_url,
        amqp_url,
        events,
        {"/healthy": Behaviour(), "/hang": Behaviour(hang=True)},
        DELIVERY_HTTP_TIMEOUT_S="30",
    )
    await hung.__aexit__(None, None, None)
    print(f"hanging subscriber next to a healthy one, {events} events:")
    print(
        f"  healthy alone: {events / t_alone:,.0f} deliveries/s; with a hanging co-subscriber: "
        f"{events / t_hung:,.0f} deliveries/s ({(t_alone / t_hung - 1) * 100:+.0f} %)"
    )


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--events", type=int, default=2000)
    args = parser.parse_args()
    with provision_services() as services:
        uvloop.run(main_async(services.database_url, services.amqp_url, args.events))


if __name__ == "__main__":
    main()
