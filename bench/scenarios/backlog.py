"""``backlog``: a large backlog drained. All the events are in the outbox before one
``delivery run`` starts; RSS, CPU and arrivals are sampled every second until all are
delivered (or the deadline)."""

from __future__ import annotations

import asyncio
import time
from typing import Any

from bench.measure import peak_rss, rss_bytes, snapshot, tree_pids
from bench.ours import Ours
from bench.sessions import MB, Run, say, tag, with_system
from bench.system import System
from bench.workload import make_workload


async def backlog_session(db: str, amqp: str, n: int, timeout_s: float) -> dict[str, Any]:
    async def body(system: System) -> dict[str, Any]:
        events = make_workload(n, tag(system, "b"))
        began = time.monotonic()
        await system.publish(events, rate=0)
        say(f"backlog: {n:,} events in the outbox in {time.monotonic() - began:.0f}s")
        await system.start_processes(1)
        started = time.time()
        samples: list[dict[str, float]] = []
        while True:
            await asyncio.sleep(1.0)
            stats = await system.receiver.stats()
            pids = tree_pids(system.roots)
            samples.append(
                {
                    "t_s": time.time() - started,
                    "delivered": stats["count"],
                    "rss_mb": max((rss_bytes(p) for p in pids), default=0) / MB,
                    "cpu_s": snapshot(system.roots).total_cpu_s,
                }
            )
            if stats["count"] >= n or time.time() - started > timeout_s:
                break
        stats = await system.receiver.stats()
        done = stats["count"] >= n
        if not done:
            say(f"backlog: stopped at the deadline, {stats['count']:,} of {n:,} delivered")
        recorded = await system.wait_recorded(n, 120 if done else 5)
        rss = peak_rss(system.roots)
        delivered = stats["count"]
        wall = (stats["last_at"] or time.time()) - started
        first = (stats["first_at"] or started) - started
        return {
            "events": n,
            "completed": done,
            "delivered": delivered,
            "timeout_s": timeout_s,
            "wall_s": wall,
            "first_delivery_s": first,
            "events_per_s": delivered / wall,
            "events_per_s_after_first": delivered / (wall - first),
            "rss_peak_mb": rss.max_bytes / MB,
            "recorded": recorded,
            "samples": samples,
        }

    return await with_system(Ours(db, amqp), {"start": False}, body)


async def backlog(run: Run) -> None:
    await run.quiet()
    say(f"backlog: {run.args.backlog:,} events")
    run.results["backlog"] = await backlog_session(
        run.db, run.amqp, run.args.backlog, run.args.backlog_timeout_s
    )
    run.save()
