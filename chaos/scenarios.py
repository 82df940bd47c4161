"""The scenarios: which processes run, how fast events come, which faults, what to expect.

A plan runs while the producers publish; it places its faults by production progress
(``ctx.progress(0.3)`` = once 30 % of the events have committed), so one plan serves the short
CI version and the long hand-run version alike. Fault durations grow with the run's expected
production time, within bounds.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Coroutine, Mapping
from dataclasses import dataclass, field
from typing import Any

from chaos import faults
from chaos.alerts import AlertExpectation
from chaos.cluster import AlarmKind, Layout
from chaos.context import RunContext
from chaos.records import SubscriptionSpec, Verdict
from chaos.redrives import HEALED, SPARE
from delivery.testing.env import harness_switches
from delivery.testing.postgres import StopMode
from delivery.testing.receiver import Behaviour
from delivery.testing.waits import wait_until

__all__ = ["SCENARIOS", "SUBSCRIPTIONS", "Scenario"]

Plan = Callable[[RunContext], Coroutine[Any, Any, None]]
Expectation = Callable[[RunContext, Verdict], list[str]]

# Every scenario subscribes the same three: everything, one family of types, one account.
SUBSCRIPTIONS: tuple[SubscriptionSpec, ...] = (
    SubscriptionSpec("/all", ("*",)),
    SubscriptionSpec("/trades", ("trade.*",)),
    SubscriptionSpec("/one-account", ("*",), account_id="acc-0-0"),
)


@dataclass(frozen=True)
class Scenario:
    name: str
    summary: str
    plan: Plan
    layout: Layout = field(default_factory=Layout)
    env: Mapping[str, str] = field(default_factory=dict)
    expect_valid: bool = True
    expect: Expectation | None = None
    # After settling, the relays' backlog gauges must read 0 again (the backlog drained).
    drain_metrics: bool = False
    # Production lasts at least this long (the rate is lowered if needed), so that faults
    # placed by progress still land mid-stream in short runs.
    min_production_s: float = 0.0
    settle_timeout_s: float = 120.0
    # Settling gives up early when nothing at all moved for this long.
    no_progress_s: float = 20.0
    # What its faults can make a redrive (chaos/redrives.py: any other redrive fails the run).
    # HEALED: they can lose a message the broker confirmed before a worker records it (the
    # queue deleted, dead-lettered past x-delivery-limit by returns), so a redrive delivers
    # the event; its publish must be in or near a fault window. SPARE: they can keep a message
    # from being recorded for longer than DELIVERY_REDRIVE_AFTER_S while the dispatch queue
    # shows none ready (a worker's PostgreSQL link stalled or down, its AMQP link stalled, a
    # backlog draining through the prefetch), so the sweep sends a copy the inbox absorbs.
    # Killing one worker at a time causes neither: its un-acked messages go back to the queue
    # and the other worker records them at once.
    redrives: frozenset[str] = frozenset()
    # The alerts the run must see fire (and by when) and may tolerate; every other alert must
    # stay quiet. A scenario with an expectation runs a real Prometheus (chaos.prometheus).
    alerts: AlertExpectation | None = None
    # The producers' normal rate is capped at this (events/s): scenarios whose subscribers
    # drain at a known rate keep the normal ingest below it.
    max_rate: float | None = None
    # Runs publish at least this many events (a backlog that must outlast an alert's `for:`
    # needs more than the short runs' 300).
    min_events: int = 0
    # RabbitMQ nodes: 1, or 3 for a cluster (chaos.rabbit_cluster, chaos.cluster_scenarios).
    rabbit_nodes: int = 1


# See RunContext.uptime: RabbitMQ is only crashed once its queues are this old.
_QUEUE_SETTLE_S = 5.0


def _span(ctx: RunContext, fraction: float, low_s: float, high_s: float) -> float:
    """A fault duration: ``fraction`` of the expected production time, within bounds."""
    return min(max(ctx.production_s * fraction, low_s), high_s)


async def _until_produced(ctx: RunContext) -> None:
    await ctx.producer.done.wait()


_SPARE = frozenset({SPARE})
_HEALED_OR_SPARE = frozenset({HEALED, SPARE})


# -- plans ----------------------------------------------------------------------------------


async def _baseline(ctx: RunContext) -> None:
    await _until_produced(ctx)


async def _kill_workers(ctx: RunContext) -> None:
    ctx.notes["kills"] = await faults.kill_loop(ctx, ["worker"])


async def _kill_relays(ctx: RunContext) -> None:
    ctx.notes["kills"] = await faults.kill_loop(ctx, ["relay"])


async def _kill_single_node(ctx: RunContext) -> None:
    ctx.notes["kills"] = await faults.kill_loop(ctx, ["run"], every_s=(1.0, 2.5))


async def _rolling_sigterm(ctx: RunContext) -> None:
    ctx.notes["restarts"] = await faults.kill_loop(
        ctx, ["worker", "relay"], every_s=(0.5, 1.5), graceful=True
    )


def _rabbit(hard: bool, *, alone: bool = True) -> Plan:
    async def plan(ctx: RunContext) -> None:
        for at in (0.2, 0.6):
            await ctx.progress(at)
            await ctx.uptime(_QUEUE_SETTLE_S)
            if not ctx.producing:
                break
            await faults.rabbit_restart(
                ctx, hard=hard, down_s=_span(ctx, 0.05, 1.0, 10.0), must_recover=alone
            )
        await _until_produced(ctx)

    return plan


def _pg(mode: StopMode) -> Plan:
    async def plan(ctx: RunContext) -> None:
        for at in (0.2, 0.6):
            await ctx.progress(at)
            if not ctx.producing:
                break
            await faults.pg_restart(ctx, mode=mode, down_s=_span(ctx, 0.05, 0.5, 10.0))
        await _until_produced(ctx)

    return plan


def _cuts(selector: str) -> Plan:
    async def plan(ctx: RunContext) -> None:
        cuts = 0
        while ctx.producing:
            await ctx.pause(0.3, 1.5)
            cuts += await faults.link_cut(ctx, selector, rst=ctx.rng.random() < 0.5)
        ctx.notes["connections_cut"] = cuts

    return plan


def _stalls(selectors: tuple[str, ...]) -> Plan:
    async def plan(ctx: RunContext) -> None:
        for i, selector in enumerate(selectors):
            await ctx.progress(0.15 + 0.7 * i / len(selectors))
            if not ctx.producing:
                break
            await faults.link_stall(ctx, selector, duration_s=_span(ctx, 0.15, 2.0, 40.0))
        await _until_produced(ctx)

    return plan


async def _partitions(ctx: RunContext) -> None:
    for i, selector in enumerate(("amqp.worker", "pg.relay", "pg.worker", "amqp.relay")):
        await ctx.progress(0.1 + 0.2 * i)
        if not ctx.producing:
            break
        await faults.link_partition(ctx, selector, duration_s=_span(ctx, 0.1, 1.5, 20.0))
    await _until_produced(ctx)


async def _pg_down_long(ctx: RunContext) -> None:
    """PostgreSQL down for as long as production lasts (up to 90 s): longer than every
    whole-transaction retry deadline of the platform (60 s), in the long runs."""
    await ctx.progress(0.2)
    await faults.pg_restart(ctx, mode="fast", down_s=_span(ctx, 1.0, 3.0, 90.0))
    await _until_produced(ctx)


async def _flaps_while_db_stalled(ctx: RunContext) -> None:
    """Workers cannot commit (their PostgreSQL link blackholed), so they hold prefetched
    messages un-acked, while their AMQP connection flaps: each flap returns those messages to
    the queue, and a quorum queue counts every return against ``x-delivery-limit``. Then the
    workers crash before the link heals, so no copy held in their memory survives: an event
    the broker dead-lettered meanwhile exists only in the poison table."""
    await ctx.progress(0.2)
    proxies = ctx.cluster.links("pg.worker")
    flaps = 0
    async with ctx.faults.window("stall+flaps", "pg.worker, amqp.worker"):
        for proxy in proxies:
            proxy.stall()
        try:
            # Reconnects come every ~5 s (aio-pika's interval): the long runs flap for up to
            # 150 s, past the default x-delivery-limit of 20 returns.
            deadline = time.monotonic() + _span(ctx, 1.8, 4.0, 150.0)
            while time.monotonic() < deadline:
                await ctx.pause(0.1, 0.3)
                flaps += sum(p.reset() for p in ctx.cluster.links("amqp.worker"))
            for worker in ctx.cluster.by_role("worker"):
                await worker.kill()
        finally:
            for proxy in proxies:
                proxy.resume()
        for worker in ctx.cluster.by_role("worker"):
            await worker.start()
    ctx.notes["amqp_flaps"] = flaps
    await _until_produced(ctx)


async def _pg_terminate(ctx: RunContext) -> None:
    terminated = 0
    while ctx.producing:
        await ctx.pause(0.5, 2.0)
        terminated += await faults.pg_terminate_backends(ctx)
    ctx.notes["backends_terminated"] = terminated


async def _slow_links(ctx: RunContext) -> None:
    await ctx.progress(0.1)
    await faults.link_shape(ctx, "*", latency_ms=40, duration_s=_span(ctx, 0.25, 2.0, 60.0))
    await ctx.progress(0.5)
    await faults.link_shape(
        ctx, "amqp", bandwidth_bps=64_000, duration_s=_span(ctx, 0.2, 2.0, 60.0)
    )
    await faults.link_shape(
        ctx, "pg", latency_ms=15, bandwidth_bps=256_000, duration_s=_span(ctx, 0.2, 2.0, 60.0)
    )
    await _until_produced(ctx)


def _alarm(kind: AlarmKind) -> Plan:
    async def plan(ctx: RunContext) -> None:
        await ctx.progress(0.2)
        want = max(20, min(int(ctx.producer.total * 0.1), 2000))
        ctx.notes["alarm_min_pending"] = want
        ctx.notes["alarm_max_pending"] = await faults.resource_alarm(
            ctx, kind, min_pending=want, timeout_s=60.0, hold_s=_span(ctx, 0.05, 0.0, 10.0)
        )
        await _until_produced(ctx)

    return plan


def _expect_alarm_backlog(ctx: RunContext, _v: Verdict) -> list[str]:
    seen, want = ctx.notes.get("alarm_max_pending", 0), ctx.notes.get("alarm_min_pending", 1)
    if seen < want:
        return [f"delivery_outbox_pending rose only to {seen} during the alarm (want >= {want})"]
    return []


async def _subscriber_flap(ctx: RunContext) -> None:
    step = _span(ctx, 0.08, 0.6, 20.0)
    phases: list[tuple[str, Behaviour, float]] = [
        (
            "5xx-half",
            Behaviour(fail_rate=0.5, fail_status=503, seed=ctx.rng.randrange(1 << 30)),
            step,
        ),
        ("timeouts", Behaviour(hang=True), step),
        ("slow", Behaviour(delay_s=0.3), step),
        ("500-all", Behaviour(status=500), step),
        (
            "429-half",
            Behaviour(fail_rate=0.5, fail_status=429, seed=ctx.rng.randrange(1 << 30)),
            step,
        ),
        ("slow-near-timeout", Behaviour(delay_s=1.9), step),
    ]
    await ctx.progress(0.1)
    await faults.subscriber_phases(ctx, ["/all", "/trades"], phases)
    await _until_produced(ctx)


# Spike and burst: subscribers answer in 100 ms and each worker sends one request at a time to
# each of them, so a subscription drains at 20 events/s (2 workers) however busy the machine
# is, and the producers' normal rate (10/s) is half that. Sizes are in seconds at the alert
# rules' real clock, times ctx.alert_scale (short runs scale the rules down).
_PACED_ENV = {
    "DELIVERY_PER_SUBSCRIPTION_MAX_IN_FLIGHT": "1",
    "DELIVERY_PER_SUBSCRIPTION_MAX_QUEUED": "0",
}
_PACED_RATE = 10.0
_PACED_DELAY_S = 0.1
_DRAIN_TIMEOUT_S = 900.0


def _paced_subscribers(ctx: RunContext) -> None:
    for spec in SUBSCRIPTIONS:
        ctx.receiver.set_behaviour(spec.path, Behaviour(delay_s=_PACED_DELAY_S))


async def _until_lag_drained(ctx: RunContext) -> None:
    """The subscribers keep their pace until the backlog drained by itself (every stage's lag
    gauge back at 0): the heal after production would otherwise make them fast at once."""

    async def drained() -> bool:
        sample = await ctx.sampler.sample_once(ctx.session)
        lags = [v for k, v in sample.values.items() if k.startswith("delivery_lag_seconds")]
        return bool(lags) and max(lags) == 0

    await wait_until(drained, timeout_s=_DRAIN_TIMEOUT_S, what="the lag gauges at 0")


async def _spike(ctx: RunContext) -> None:
    """Hook0's incident, small: ingest at 10x the normal rate, 5x the subscribers' drain rate,
    for 30 s; the oldest waiting event then ages almost as fast as the clock for minutes."""
    _paced_subscribers(ctx)
    await ctx.progress(0.1)
    await faults.producer_spike(ctx, factor=10, duration_s=30.0 * ctx.alert_scale)
    await _until_produced(ctx)
    await _until_lag_drained(ctx)


async def _burst(ctx: RunContext) -> None:
    """A burst the platform absorbs: 10x for 3 s, about 240 events behind, drained at the 10/s
    the subscribers have to spare within about 25 s (lag under the lag alert's 45 s). A 5 s
    burst over a normal rate of 15/s (3/4 of the drain rate) left a backlog that took minutes:
    the lag alert fired, rightly, and the run failed (chaos/RESULTS.md)."""
    _paced_subscribers(ctx)
    await ctx.progress(0.1)
    await faults.producer_spike(ctx, factor=10, duration_s=3.0 * ctx.alert_scale)
    await _until_produced(ctx)
    await _until_lag_drained(ctx)


async def _stall_then_kill_workers(ctx: RunContext) -> None:
    """Workers' PostgreSQL link blackholed while messages keep arriving, then the workers are
    killed: a build that acks before its commit has acked messages nobody will ever record."""
    for at in (0.3, 0.7):
        await ctx.progress(at)
        if not ctx.producing:
            break
        proxies = ctx.cluster.links("pg.worker")
        async with ctx.faults.window("stall+kill-9", "pg.worker, workers"):
            for proxy in proxies:
                proxy.stall()
            try:
                await asyncio.sleep(_span(ctx, 0.1, 1.0, 10.0))
                for worker in ctx.cluster.by_role("worker"):
                    await worker.kill()
            finally:
                for proxy in proxies:
                    proxy.resume()
            await asyncio.gather(*(w.start() for w in ctx.cluster.by_role("worker")))
            for worker in ctx.cluster.by_role("worker"):
                await worker.wait_ready(ctx.session, 120)
    await _until_produced(ctx)


def _expect_caught(_ctx: RunContext, v: Verdict) -> list[str]:
    """The broken build loses events; the redrive sweep may put every one of them back before
    the judgement, and then the checker must see redrives that healed a loss no fault of this
    scenario can cause."""
    if v.lost > 0 or v.redrives_unexplained > 0:
        return []
    return ["the broken build passed: the checker saw neither loss nor an unexplained redrive"]


async def _queue_deleted(ctx: RunContext) -> None:
    await ctx.progress(0.3)
    want = max(10, min(ctx.producer.total // 20, 500))
    ctx.notes["messages_deleted_with_the_queue"] = await faults.delete_dispatch_queue(
        ctx, min_messages=want
    )
    await _until_produced(ctx)


async def _everything(ctx: RunContext) -> None:
    """A bit of every fault at once, for the long runs."""
    async with asyncio.TaskGroup() as tg:
        tg.create_task(faults.kill_loop(ctx, ["worker", "relay"], every_s=(2.0, 5.0)))
        tg.create_task(_cuts("*")(ctx))
        # Not "every process ready within 120 s" after each restart: with cuts every second
        # and kills every few, some process is down at any moment (100k run, 2026-12-01).
        tg.create_task(_rabbit(hard=True, alone=False)(ctx))
    await wait_until(lambda: not ctx.producing, timeout_s=3600, what="production to end")


SCENARIOS: dict[str, Scenario] = {
    s.name: s
    for s in (
        Scenario("baseline", "no faults: the reference run", _baseline),
        Scenario(
            "kill-workers",
            "kill -9 a worker in a loop, restart it",
            _kill_workers,
            min_production_s=4,
        ),
        Scenario(
            "kill-relays", "kill -9 a relay in a loop, restart it", _kill_relays, min_production_s=4
        ),
        Scenario(
            "kill-single-node",
            "kill -9 `delivery run` single-node processes in a loop",
            _kill_single_node,
            layout=Layout(relays=0, workers=0, runs=2),
            min_production_s=4,
        ),
        Scenario(
            "rolling-sigterm",
            "SIGTERM drains of workers and relays in a loop",
            _rolling_sigterm,
            min_production_s=4,
        ),
        Scenario(
            "rabbit-restart",
            "RabbitMQ stopped and started, twice",
            _rabbit(hard=False),
            min_production_s=7,
            redrives=_SPARE,
        ),
        Scenario(
            "rabbit-kill",
            "RabbitMQ killed hard (-9) and started, twice",
            _rabbit(hard=True),
            min_production_s=7,
            redrives=_SPARE,
        ),
        Scenario(
            "pg-restart-fast",
            "PostgreSQL fast restart, twice",
            _pg("fast"),
            min_production_s=4,
            redrives=_SPARE,
        ),
        Scenario(
            "pg-restart-immediate",
            "PostgreSQL immediate (crash) restart, twice",
            _pg("immediate"),
            min_production_s=4,
            redrives=_SPARE,
        ),
        Scenario(
            "pg-down-long",
            "PostgreSQL down for as long as production lasts (up to 90 s), then back",
            _pg_down_long,
            min_production_s=4,
            redrives=_SPARE,
        ),
        Scenario(
            "flaps-while-db-stalled",
            "workers' AMQP link flapping while their PostgreSQL link is blackholed, then a crash",
            _flaps_while_db_stalled,
            min_production_s=5,
            # The relay re-drives lost events in a sweep every 15 s.
            no_progress_s=25.0,
            redrives=_HEALED_OR_SPARE,
        ),
        Scenario(
            "pg-terminate",
            "pg_terminate_backend of every platform connection, in a loop",
            _pg_terminate,
            min_production_s=3,
            redrives=_SPARE,
        ),
        Scenario(
            "amqp-cut",
            "AMQP connections cut (FIN or RST) in a loop",
            _cuts("amqp"),
            min_production_s=3,
            redrives=_HEALED_OR_SPARE,
        ),
        Scenario(
            "pg-cut",
            "PostgreSQL connections cut (FIN or RST) in a loop",
            _cuts("pg"),
            min_production_s=3,
            redrives=_SPARE,
        ),
        Scenario(
            "amqp-stall",
            "AMQP links blackholed: workers', then relays'",
            _stalls(("amqp.worker", "amqp.relay")),
            min_production_s=5,
            redrives=_SPARE,
        ),
        Scenario(
            "pg-stall",
            "PostgreSQL links blackholed: workers', relays', producers'",
            _stalls(("pg.worker", "pg.relay", "pg.producer")),
            min_production_s=5,
            redrives=_SPARE,
        ),
        Scenario(
            "partition",
            "links refused and reset for a while, one after another",
            _partitions,
            min_production_s=5,
            redrives=_SPARE,
        ),
        Scenario(
            "slow-links",
            "latency and low bandwidth on every link",
            _slow_links,
            min_production_s=5,
            redrives=_SPARE,
        ),
        Scenario(
            "queue-deleted",
            "the dispatch queue deleted at run time while it holds messages (workers down)",
            _queue_deleted,
            min_production_s=3,
            no_progress_s=25.0,
            redrives=_HEALED_OR_SPARE,
        ),
        Scenario(
            "memory-alarm",
            "RabbitMQ memory alarm blocks publishers: the outbox backs up, then drains",
            _alarm("memory"),
            expect=_expect_alarm_backlog,
            drain_metrics=True,
            min_production_s=5,
            redrives=_SPARE,
        ),
        Scenario(
            "disk-alarm",
            "RabbitMQ disk alarm blocks publishers: the outbox backs up, then drains",
            _alarm("disk"),
            expect=_expect_alarm_backlog,
            drain_metrics=True,
            min_production_s=5,
            redrives=_SPARE,
        ),
        Scenario(
            "subscriber-flap",
            "subscribers flap between 5xx, timeouts, 429 and slowness",
            _subscriber_flap,
            min_production_s=5,
        ),
        Scenario(
            "producer-spike",
            "producers at 10x the normal rate, 5x the subscribers' drain rate, for 30 s: "
            "subscribers fall minutes behind, the lag alert fires within 2 minutes",
            _spike,
            env=_PACED_ENV,
            max_rate=_PACED_RATE,
            # At a quarter of the rules' clock (the short runs) the backlog must still outlast
            # 11 s of lag plus 7.5 s of `for:`: about 450 events behind at 20/s.
            min_events=600,
            drain_metrics=True,
            min_production_s=4,
            redrives=_SPARE,
            # The latency SLO alerts may fire too: minutes of lag burn its budget.
            alerts=AlertExpectation(
                fire={"DeliveryLagHigh": 120.0},
                tolerate=frozenset({"DeliveryLatencySLOBurnFast", "DeliveryLatencySLOBurnSlow"}),
            ),
        ),
        Scenario(
            "burst",
            "producers at 10x the normal rate for 3 s: a backlog that drains by itself, "
            "and no alert",
            _burst,
            env=_PACED_ENV,
            max_rate=_PACED_RATE,
            drain_metrics=True,
            min_production_s=4,
            redrives=_SPARE,
            alerts=AlertExpectation(),
        ),
        Scenario(
            "worker-pg-stall-kill",
            "workers' PostgreSQL link blackholed mid-dispatch, then the workers killed",
            _stall_then_kill_workers,
            min_production_s=5,
            redrives=_SPARE,
        ),
        Scenario(
            "broken-ack-early",
            "DELIBERATELY BROKEN build (ack before commit) under worker-pg-stall-kill: "
            "the checker must report loss, or the redrives that healed it",
            _stall_then_kill_workers,
            env=harness_switches(DELIVERY_DANGEROUS_ACK_BEFORE_COMMIT="1"),
            expect_valid=False,
            expect=_expect_caught,
            # The relay's redrive sweep (every 15 s) puts the lost events back: let it, so that
            # what is judged is whether the checker sees through the healing.
            no_progress_s=25.0,
            min_production_s=5,
            # The same faults as worker-pg-stall-kill, the same declaration: they can hold a
            # message, never lose one. A redrive that healed a loss is the broken build's.
            redrives=_SPARE,
        ),
        Scenario(
            "everything",
            "kills, cuts and RabbitMQ crashes together",
            _everything,
            min_production_s=7,
            redrives=_HEALED_OR_SPARE,
        ),
    )
}

# The three-node RabbitMQ scenarios (issue 16) live in their own module, which needs Scenario
# from this one: imported last.
from chaos.cluster_scenarios import CLUSTER_SCENARIOS  # noqa: E402

SCENARIOS.update(CLUSTER_SCENARIOS)
