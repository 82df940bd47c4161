"""What a run does once its cluster is up: produce under the scenario's fault plan, heal what
the plan left behind, wait until the platform settled (and its backlog gauges drained), then
read the state and check it."""

from __future__ import annotations

import asyncio
import time

import structlog

from chaos.checker import check
from chaos.cluster import PLATFORM_ENV
from chaos.context import RunContext
from chaos.records import Arrival, Verdict
from chaos.report import write_arrivals
from chaos.scenarios import Scenario
from chaos.settle import read_state, wait_settled
from chaos.slack import Slack
from delivery.testing.receiver import Behaviour, Receiver
from delivery.testing.waits import wait_until

__all__ = ["drive"]

log = structlog.get_logger("chaos.phases")

# Production must end by then (a producer blocked for longer than this is itself a finding).
_PRODUCE_GRACE_S = 300.0
_DRAIN_METRICS_TIMEOUT_S = 30.0


async def drive(ctx: RunContext, scenario: Scenario, problems: list[str]) -> Verdict:
    """The run's phases, from production to the verdict; what went wrong on the way (a plan
    that failed, gauges that did not drain, the scenario's own expectations) goes to
    ``problems``."""
    stop_sampling = asyncio.Event()
    give_up_at = time.time() + ctx.production_s * 3 + _PRODUCE_GRACE_S
    async with asyncio.TaskGroup() as tg:
        sampling = tg.create_task(ctx.sampler.run(ctx.session, stop_sampling))
        production = tg.create_task(ctx.producer.run(give_up_at))
        try:
            await scenario.plan(ctx)
        except Exception as exc:
            log.exception("plan_failed")
            problems.append(f"fault plan failed: {exc!r}"[:300])
        await production
        log.info("phase", phase="produced", committed=len(ctx.producer.record.committed_at))
        ctx.faults.close_open()
        await _heal(ctx, scenario)
        log.info("phase", phase="healed")
        # The cap grows with the run (a 100k-event run can end with a backlog that takes
        # minutes to drain); a stall is still caught by no_progress_s.
        settle_cap_s = scenario.settle_timeout_s * max(
            1.0, len(ctx.producer.record.committed_at) / 10_000
        )
        settled, waited_s = await wait_settled(
            ctx.cluster, timeout_s=settle_cap_s, no_progress_s=scenario.no_progress_s
        )
        log.info("phase", phase="settled", settled=settled, waited_s=round(waited_s, 2))
        if scenario.drain_metrics:
            problems += await _drain_metrics(ctx)
        stop_sampling.set()
        await sampling
    state = await read_state(ctx.cluster, settled=settled, waited_s=waited_s)
    arrivals = _arrivals(ctx.receiver)
    write_arrivals(
        ctx.cluster.out_dir / "arrivals.csv.gz", arrivals, ctx.producer.record.committed_at
    )
    verdict = check(
        attempted=ctx.producer.record.attempted,
        committed_at=ctx.producer.record.committed_at,
        arrivals=arrivals,
        subscriptions=scenario.subscriptions,
        state=state,
        faults=ctx.faults.windows,
        slack=_slack(),
        redrives_explained=scenario.redrives,
        skipped=ctx.skipped,
    )
    if scenario.expect is not None:
        problems += scenario.expect(ctx, verdict)
    return verdict


async def _heal(ctx: RunContext, scenario: Scenario) -> None:
    """Lift whatever a plan left behind (it may have failed half-way): links, alarm, processes."""
    cluster = ctx.cluster
    for proxy in cluster.proxies.values():
        proxy.heal()
        await proxy.accept()
    await cluster.servers.heal()

    for spec in scenario.subscriptions:
        if spec.path not in scenario.keep_behaviours:
            ctx.receiver.set_behaviour(spec.path, Behaviour())
    for proc in cluster.processes:
        if not proc.alive:
            await proc.start()
    await asyncio.gather(*(p.wait_ready(ctx.session, 120) for p in cluster.processes))


async def _drain_metrics(ctx: RunContext) -> list[str]:
    """The relays' own gauges must come back to 0 once the backlog drained."""

    async def drained() -> bool:
        sample = await ctx.sampler.sample_once(ctx.session)
        values = sample.values
        return (
            values.get("delivery_outbox_pending", 1) == 0
            and values.get("delivery_outbox_oldest_age_seconds", 1) == 0
        )

    try:
        await wait_until(
            drained, timeout_s=_DRAIN_METRICS_TIMEOUT_S, what="backlog gauges at 0", interval_s=0.5
        )
    except TimeoutError as exc:
        return [str(exc)]
    return []


def _slack() -> Slack:
    """Explained-duplicate (and explained-redrive) window: one HTTP timeout before a fault, a
    lease plus a few retry steps after it (the platform's own timers, as configured)."""
    http_s = float(PLATFORM_ENV["DELIVERY_HTTP_TIMEOUT_S"])
    lease_s = float(PLATFORM_ENV["DELIVERY_DELIVERY_LEASE_S"])
    return Slack(before_s=http_s + 3.0, after_s=lease_s + 10.0)


def _arrivals(receiver: Receiver) -> list[Arrival]:
    return [
        Arrival(
            path=a.path,
            webhook_id=a.webhook_id or "",
            body=a.body,
            status=a.status if a.status is not None else 0,  # None: left hanging
            at=a.arrived_at,
            signature_ok=a.signature_ok,
        )
        for a in receiver.arrivals
    ]
