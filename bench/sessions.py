"""What every scenario is made of: the run it belongs to (services, options, results), a quiet
enough machine, a system set up and always torn down, and the two measurements on it: flat out
and paced."""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time
from collections import Counter
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bench.measure import cpu_between, loadavg, machine_cpu_ticks, peak_rss, percentile, snapshot
from bench.ours import Ours
from bench.receiver import Arrived
from bench.system import System
from bench.workload import make_workload

MB = 2**20


def say(message: str) -> None:
    print(f"[bench {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


@dataclass
class Run:
    """One ``python -m bench run``: the services, the options, and the results so far, saved
    after every session so that an interrupted run keeps what it measured."""

    db: str
    amqp: str
    args: argparse.Namespace
    results: dict[str, Any]
    results_path: Path

    def save(self) -> None:
        self.results_path.write_text(json.dumps(self.results, indent=1, default=str))

    async def quiet(self) -> dict[str, Any]:
        return await wait_for_quiet(self.args.max_busy, self.args.max_wait_s)


# -- load on a shared machine ---------------------------------------------------------------


async def busy_fraction(sample_s: float = 2.0) -> float:
    """How busy the whole machine is right now (0-1), measured between our sessions, when
    nothing of ours runs: what other engineers' work takes."""
    busy0, total0 = machine_cpu_ticks()
    await asyncio.sleep(sample_s)
    busy1, total1 = machine_cpu_ticks()
    return (busy1 - busy0) / max(1, total1 - total0)


async def wait_for_quiet(max_busy: float, max_wait_s: float) -> dict[str, Any]:
    """Other engineers run tests on this machine: wait (bounded) until it is less than
    ``max_busy`` busy without us, and report what it was."""
    began = time.monotonic()
    first = busy = await busy_fraction()
    while busy > max_busy and time.monotonic() - began < max_wait_s:
        busy = await busy_fraction(5.0)
    waited = time.monotonic() - began - 2.0
    if waited > 1:
        say(f"waited {waited:.0f}s for the machine: {first:.0%} -> {busy:.0%} busy")
    return {"load": loadavg()[0], "busy": busy, "waited_s": round(max(0.0, waited))}


# -- one system -----------------------------------------------------------------------------

_counter = Counter[str]()


def tag(system: System, what: str) -> str:
    """A tag for a workload's event ids, unique within the process."""
    _counter[system.tag + what] += 1
    return f"{system.tag}{what}{_counter[system.tag + what]}"


def duplicates(arrivals: list[Arrived]) -> int:
    return len(arrivals) - len({(a.path, a.webhook_id) for a in arrivals})


async def with_system(
    system: System, setup: dict[str, Any], body: Callable[[System], Awaitable[Any]]
) -> Any:
    """``body(system)`` between ``system.setup(**setup)`` and its teardown (keeping the logs,
    and saying where, when it fails)."""
    try:
        await system.setup(**setup)
        result = await body(system)
    except BaseException:
        say(f"{system.name} failed; its logs are in {system.log_dir}")
        await system.teardown(keep_logs=True)
        raise
    await system.teardown()
    return result


async def flat_out(
    system: System,
    n: int,
    *,
    staged: bool = True,
    on_start: Callable[[System], Awaitable[None]] | None = None,
    on_end: Callable[[System], Awaitable[None]] | None = None,
) -> dict[str, Any]:
    """``n`` events as fast as the system goes. Staged (the default): the backlog is put at
    the system's entry point while its processes are paused (SIGSTOP), and the clock starts at
    SIGCONT. Not staged: the producer publishes while the system runs (clock at its start)."""
    events = make_workload(n, tag(system, "f"))
    expected = n * system.fanout
    await system.receiver.reset()
    await system.mark_recorded()
    if staged:
        system.pause()
        await system.publish(events, rate=0)
    before = snapshot(system.roots)
    started = time.time()
    if staged:
        system.resume()
    if on_start is not None:
        await on_start(system)
    if not staged:
        await system.publish(events, rate=0)
    stats = await system.receiver.wait(expected, 120 + n / 50, f"{system.name} flat out")
    recorded = await system.wait_recorded(expected, 60)
    after = snapshot(system.roots)
    rss = peak_rss(system.roots)
    if on_end is not None:
        await on_end(system)
    arrivals = await system.receiver.arrivals()
    wall = stats["last_at"] - started
    cpu = cpu_between(before, after)
    return {
        "events": n,
        "deliveries": expected,
        "wall_s": wall,
        "events_per_s": n / wall,
        "deliveries_per_s": expected / wall,
        "cpu_ms_per_event": cpu * 1000 / n,
        "cpu_ms_per_delivery": cpu * 1000 / expected,
        "rss_max_mb": rss.max_bytes / MB,
        "rss_sum_mb": rss.sum_bytes / MB,
        "processes": rss.processes,
        "recorded": recorded,
        "duplicates": duplicates(arrivals),
        "bad_signatures": stats["bad_signatures"],
    }


async def paced(system: System, rate: float, seconds: float) -> dict[str, Any]:
    """Publish at ``rate`` events/s and measure publish-returned -> subscriber latency."""
    n = int(rate * seconds)
    events = make_workload(n, tag(system, "p"))
    expected = n * system.fanout
    await system.receiver.reset()
    await system.mark_recorded()
    before = snapshot(system.roots)
    published = await system.publish(events, rate=rate)
    stats = await system.receiver.wait(expected, 120, f"{system.name} paced")
    recorded = await system.wait_recorded(expected, 60)
    after = snapshot(system.roots)
    arrivals = await system.receiver.arrivals()
    first: dict[str, float] = {}
    for a in arrivals:
        first[a.webhook_id] = min(a.at, first.get(a.webhook_id, a.at))
    latencies = sorted((first[i] - t) * 1000 for i, t in published.items() if i in first)
    span = max(published.values()) - min(published.values())
    breakdown = {}
    if isinstance(system, Ours) and system.fanout == 1:
        for stage, values in (await system.stages(published, first)).items():
            values.sort()
            breakdown[stage] = {
                "p50_ms": percentile(values, 0.5),
                "p99_ms": percentile(values, 0.99),
            }
    return {
        "stages": breakdown,
        "events": n,
        "rate": rate,
        "achieved_rate": (n - 1) / span if span > 0 else float("nan"),
        "p50_ms": percentile(latencies, 0.50),
        "p95_ms": percentile(latencies, 0.95),
        "p99_ms": percentile(latencies, 0.99),
        "max_ms": latencies[-1],
        "cpu_ms_per_event": cpu_between(before, after) * 1000 / n,
        "recorded": recorded,
        "duplicates": duplicates(arrivals),
        "bad_signatures": stats["bad_signatures"],
    }
