"""``e2e`` (opt-in): ours end to end with a live producer, the way a service publishes: batches
of 100 events committed while the system runs, flat out or paced (``--e2e-rate``), to
``--e2e-subscriptions`` subscriptions, on ``--e2e-processes`` ``delivery run``. Events/s,
latency from each batch's commit to each arrival, CPU and peak RSS of the system's processes."""

from __future__ import annotations

import asyncio
import time
from typing import Any

from bench.measure import cpu_between, peak_rss, percentile, snapshot
from bench.ours import Ours
from bench.sessions import MB, Run, duplicates, say, tag, with_system
from bench.system import System
from bench.workload import make_workload
from delivery.outbox import publish_many

BATCH = 100
TIMEOUT_S = 600.0


async def e2e_session(
    run: Run, n: int, subscriptions: int, processes: int, rate: float
) -> dict[str, Any]:
    async def body(system: System) -> dict[str, Any]:
        assert system.conn is not None
        events = make_workload(n, tag(system, "e"))
        await system.receiver.reset()
        await system.mark_recorded()
        before = snapshot(system.roots)
        committed: dict[str, float] = {}
        started = time.time()
        for start in range(0, n, BATCH):
            chunk = events[start : start + BATCH]
            await publish_many(system.conn, [e.raw for e in chunk])
            committed.update(dict.fromkeys((e.id for e in chunk), time.time()))
            if rate:
                delay = started + (start + BATCH) / rate - time.time()
                if delay > 0:
                    await asyncio.sleep(delay)
        publish_s = time.time() - started
        expected = n * subscriptions
        stats = await system.receiver.wait(expected, TIMEOUT_S, "e2e: all deliveries")
        after = snapshot(system.roots)
        rss = peak_rss(system.roots)
        recorded = await system.wait_recorded(expected, 60)
        arrivals = await system.receiver.arrivals()
        latencies = sorted(
            (a.at - committed[a.webhook_id]) * 1000 for a in arrivals if a.webhook_id in committed
        )
        wall = stats["last_at"] - started
        cpu = cpu_between(before, after)
        return {
            "events": n,
            "subscriptions": subscriptions,
            "processes": processes,
            "rate": rate,
            "deliveries": expected,
            "publish_s": publish_s,
            "wall_s": wall,
            "events_per_s": n / wall,
            "deliveries_per_s": expected / wall,
            "p50_ms": percentile(latencies, 0.50),
            "p95_ms": percentile(latencies, 0.95),
            "p99_ms": percentile(latencies, 0.99),
            "cpu_ms_per_event": cpu * 1000 / n,
            "peak_rss_mb": rss.max_bytes / MB,
            "recorded": recorded,
            "duplicates": duplicates(arrivals),
            "bad_signatures": stats["bad_signatures"],
        }

    setup = {"processes": processes, "fanout": subscriptions}
    return dict(await with_system(Ours(run.db, run.amqp), setup, body))


async def e2e(run: Run) -> None:
    args = run.args
    run.results["e2e"] = []
    for i in range(args.runs):
        await run.quiet()
        say(
            f"run {i + 1}/{args.runs}: e2e, subscriptions {args.e2e_subscriptions}, "
            f"processes {args.e2e_processes}, "
            + (f"{args.e2e_rate:g} events/s" if args.e2e_rate else "flat out")
        )
        r = await e2e_session(
            run, args.events, args.e2e_subscriptions, args.e2e_processes, args.e2e_rate
        )
        run.results["e2e"].append(r)
        say(
            f"  {r['events_per_s']:,.0f} ev/s ({r['deliveries_per_s']:,.0f} deliveries/s), "
            f"latency p50 {r['p50_ms']:.1f} p95 {r['p95_ms']:.1f} p99 {r['p99_ms']:.1f} ms, "
            f"{r['cpu_ms_per_event']:.2f} ms CPU/ev, peak RSS {r['peak_rss_mb']:.0f} MB"
        )
        run.save()
