"""``failures`` (opt-in): failure handling measured on the real pipeline, one ``delivery run``.

1. A subscriber failing 50 % of requests (HTTP 500) next to a healthy one: attempts per event
   and the extra latency it pays (with a compressed schedule 1s,2s,4s,8s,16s,32s,... so the run
   is short; the extra latency scales with the schedule).
2. A hanging subscriber next to a healthy one: the healthy one's throughput with and without it.

Each session starts its ``delivery run`` once the subscriptions exist and publishes at once (no
warm-up), so every healthy rate includes the start-up alike. A few minutes whatever the count:
the flaky subscriber's retries follow the schedule.
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

from bench.measure import percentile
from bench.ours import Ours
from bench.receiver import Arrived
from bench.sessions import Run, say, tag, with_system
from bench.system import System
from bench.workload import make_workload
from delivery.outbox import publish_many
from delivery.testing.receiver import Behaviour

SCHEDULE = "1s,2s,4s,8s,16s,32s,32s,32s"
FLAKY = Behaviour(fail_rate=0.5, fail_status=500, seed=1)
HANGING = Behaviour(hang=True)
BATCH = 100
TIMEOUT_S = 600.0
SETTLE_TIMEOUT_S = 900.0


def _ok(a: Arrived) -> bool:
    return a.status is not None and 200 <= a.status < 300


def _latencies_ms(arrivals: list[Arrived], path: str, committed: dict[str, float]) -> list[float]:
    """Per event: its commit -> the first 2xx arrival on ``path``."""
    first_ok: dict[str, float] = {}
    for a in arrivals:
        if a.path == path and _ok(a):
            first_ok.setdefault(a.webhook_id, a.at)
    return sorted((t - committed[i]) * 1000 for i, t in first_ok.items() if i in committed)


async def failure_session(
    run: Run, n: int, other: Behaviour | None, env: dict[str, str]
) -> dict[str, Any]:
    """``n`` events to a healthy subscriber and, with ``other``, to a second one behaving so."""

    async def body(system: System) -> dict[str, Any]:
        assert system.conn is not None
        healthy, second = system.subscriber_path(0), system.subscriber_path(1)
        if other is not None:
            await system.receiver.set_behaviour(second, other)
        events = make_workload(n, tag(system, "x"))
        await system.start_processes(1)
        committed: dict[str, float] = {}
        started = time.time()
        for start in range(0, n, BATCH):
            chunk = events[start : start + BATCH]
            await publish_many(system.conn, [e.raw for e in chunk])
            committed.update(dict.fromkeys((e.id for e in chunk), time.time()))
        await system.receiver.wait(n, TIMEOUT_S, "the healthy subscriber", unique_on=healthy)
        arrivals = await system.receiver.arrivals()
        healthy_done_s = max(a.at for a in arrivals if a.path == healthy and _ok(a)) - started
        dead = None
        if other is None or not other.hang:
            # Every delivery reaches a final state: delivered, or dead once its schedule is
            # used up (a 50 % failure rate exhausts 0.5^attempts of them).
            deadline = time.monotonic() + SETTLE_TIMEOUT_S
            while (
                await system.conn.fetchval(
                    "SELECT count(*) FROM delivery.deliveries WHERE state = 'pending'"
                )
                and time.monotonic() < deadline
            ):
                await asyncio.sleep(0.5)
            dead = await system.conn.fetchval(
                "SELECT count(*) FROM delivery.deliveries WHERE state = 'dead'"
            )
            say(f"  dead letters after the schedule was used up: {dead}")
            arrivals = await system.receiver.arrivals()
        on_second = [a for a in arrivals if a.path == second]
        return {
            "healthy_done_s": healthy_done_s,
            "dead": dead,
            "second_attempts": len(on_second),
            "second_failed": sum(1 for a in on_second if a.status is not None and not _ok(a)),
            "healthy_ms": _latencies_ms(arrivals, healthy, committed),
            "second_ms": _latencies_ms(arrivals, second, committed),
        }

    ours = Ours(run.db, run.amqp)
    ours.extra_env = {"DELIVERY_LOG_LEVEL": "error", **env}
    return dict(
        await with_system(ours, {"fanout": 1 if other is None else 2, "start": False}, body)
    )


async def failures(run: Run) -> None:
    n = run.args.failure_events
    await run.quiet()
    say(f"failures: a 50%-failing subscriber next to a healthy one, {n} events")
    flaky = await failure_session(
        run,
        n,
        FLAKY,
        {"DELIVERY_RETRY_SCHEDULE": SCHEDULE, "DELIVERY_CIRCUIT_FAILURE_THRESHOLD": "1000000"},
    )
    h50, h99 = percentile(flaky["healthy_ms"], 0.5), percentile(flaky["healthy_ms"], 0.99)
    f50, f99 = percentile(flaky["second_ms"], 0.5), percentile(flaky["second_ms"], 0.99)
    result: dict[str, Any] = {
        "events": n,
        "schedule": SCHEDULE,
        "flaky": {
            "attempts_per_event": flaky["second_attempts"] / n,
            "failed_attempts": flaky["second_failed"],
            "dead": flaky["dead"],
            "healthy_p50_ms": h50,
            "healthy_p99_ms": h99,
            "flaky_p50_ms": f50,
            "flaky_p99_ms": f99,
        },
    }
    run.results["failures"] = result
    run.save()
    say(f"50%-failing subscriber, {n} events, schedule {SCHEDULE} (+-20% jitter):")
    say(
        f"  attempts per event: {flaky['second_attempts'] / n:.2f} (ideal for p=0.5: 2.00); "
        f"failures {flaky['second_failed']}"
    )
    say(f"  healthy  p50 {h50:,.0f} ms  p99 {h99:,.0f} ms")
    say(f"  flaky    p50 {f50:,.0f} ms  p99 {f99:,.0f} ms")
    say(f"  extra latency of the flaky one: p50 +{f50 - h50:,.0f} ms, p99 +{f99 - h99:,.0f} ms")

    await run.quiet()
    say(f"failures: a hanging subscriber next to a healthy one, {n} events")
    alone = await failure_session(run, n, None, {})
    hung = await failure_session(run, n, HANGING, {"DELIVERY_HTTP_TIMEOUT_S": "30"})
    t_alone, t_hung = alone["healthy_done_s"], hung["healthy_done_s"]
    result["hang"] = {
        "alone_per_s": n / t_alone,
        "with_hang_per_s": n / t_hung,
        "change_pct": (t_alone / t_hung - 1) * 100,
        "alone_dead": alone["dead"],
    }
    run.save()
    say(f"hanging subscriber next to a healthy one, {n} events:")
    say(
        f"  healthy alone: {n / t_alone:,.0f} deliveries/s; with a hanging co-subscriber: "
        f"{n / t_hung:,.0f} deliveries/s ({(t_alone / t_hung - 1) * 100:+.0f} %)"
    )
