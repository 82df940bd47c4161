"""Run one scenario end to end: servers, proxies, receiver, processes, producers, the fault
plan; then heal, settle, check, report. Everything it started is torn down, whatever happens."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import shutil
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any, TextIO

import aiohttp
import asyncpg
import structlog

from chaos.checker import check
from chaos.cluster import PLATFORM_ENV, Cluster, Servers
from chaos.context import FaultLog, RunContext, wait_until
from chaos.metrics import MetricsSampler
from chaos.producer import Producer
from chaos.records import Arrival, Verdict
from chaos.report import RunReport, write_arrivals
from chaos.scenarios import SUBSCRIPTIONS, Scenario
from chaos.settle import read_state, wait_settled
from chaos.slack import Slack
from delivery.store import subscriptions
from delivery.testing.receiver import Behaviour, Receiver

__all__ = ["DEFAULT_RATE", "run_scenario"]

log = structlog.get_logger("chaos.runner")

DEFAULT_RATE = 150.0
# Production must end by then (a producer blocked for longer than this is itself a finding).
_PRODUCE_GRACE_S = 300.0
_DRAIN_METRICS_TIMEOUT_S = 30.0


def _configure_logging(stream: TextIO) -> logging.Handler:
    """The runner's own log (and the stdlib logs of the libraries it uses, like asyncpg's
    pool) go to the run's chaos.log, not to the terminal."""
    handler = logging.StreamHandler(stream)
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    logging.getLogger().addHandler(handler)
    structlog.configure(
        processors=[
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            structlog.processors.format_exc_info,
            structlog.processors.JSONRenderer(),
        ],
        logger_factory=structlog.PrintLoggerFactory(file=stream),
        cache_logger_on_first_use=False,
    )
    return handler


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


@contextlib.asynccontextmanager
async def _servers(shared: Servers | None) -> AsyncIterator[Servers]:
    if shared is not None:
        await shared.heal()
        yield shared
        return
    servers = await Servers.start()
    try:
        yield servers
    finally:
        await servers.close()


async def _subscribe(cluster: Cluster, receiver: Receiver) -> None:
    conn = await asyncpg.connect(cluster.db_url)
    try:
        for spec in SUBSCRIPTIONS:
            sub = await subscriptions.add(
                conn,
                url=receiver.url(spec.path),
                patterns=list(spec.patterns),
                account_id=spec.account_id,
            )
            receiver.expect_secret(spec.path, sub.secret)
    finally:
        await conn.close()


async def _heal(ctx: RunContext) -> None:
    """Lift whatever a plan left behind (it may have failed half-way): links, alarm, processes."""
    cluster = ctx.cluster
    for proxy in cluster.proxies.values():
        proxy.heal()
        await proxy.accept()
    await cluster.servers.heal()

    for spec in SUBSCRIPTIONS:
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


async def run_scenario(
    scenario: Scenario,
    *,
    events: int,
    seed: int,
    out_dir: Path,
    rate: float = DEFAULT_RATE,
    servers: Servers | None = None,
) -> RunReport:
    """Run ``scenario`` once; ``servers`` lets several runs share one pair (the test suite)."""
    run_dir = out_dir / scenario.name
    shutil.rmtree(run_dir, ignore_errors=True)
    run_dir.mkdir(parents=True)
    with (run_dir / "chaos.log").open("w") as log_stream:
        handler = _configure_logging(log_stream)
        try:
            return await _run(
                scenario, events=events, seed=seed, run_dir=run_dir, rate=rate, shared=servers
            )
        finally:
            structlog.reset_defaults()
            logging.getLogger().removeHandler(handler)


async def _run(
    scenario: Scenario,
    *,
    events: int,
    seed: int,
    run_dir: Path,
    rate: float,
    shared: Servers | None,
) -> RunReport:
    started = time.time()
    rng = random.Random(seed)
    if scenario.min_production_s > 0:
        rate = min(rate, events / scenario.min_production_s)
    problems: list[str] = []
    async with (
        _servers(shared) as servers,
        aiohttp.ClientSession() as session,
        Receiver() as receiver,
    ):
        cluster = Cluster(servers, run_dir, scenario.name, scenario.layout, scenario.env)
        try:
            await cluster.start()
            await _subscribe(cluster, receiver)
            await cluster.start_processes(session)
            producer = Producer(
                cluster.link_db_url("producer"),
                key=f"{scenario.name[:24]}-{seed}",
                total=events,
                rate=rate,
                seed=seed,
            )
            ctx = RunContext(
                cluster=cluster,
                producer=producer,
                receiver=receiver,
                faults=FaultLog(),
                sampler=MetricsSampler(lambda: cluster.processes),
                session=session,
                rng=rng,
            )
            ctx.ready_at = time.monotonic()
            log.info("scenario_started", scenario=scenario.name, events=events, rate=rate)
            verdict = await _drive(ctx, scenario, problems)
            state_codes = await cluster.stop()
        except BaseException:
            log.exception("scenario_crashed", scenario=scenario.name)
            await cluster.kill_all()
            raise
        finally:
            _keep_server_logs(servers, run_dir)
            if shared is not None:
                await cluster.remove()
    bad_exits = {n: c for n, c in state_codes.items() if c not in (0, None)}
    if bad_exits:
        problems.append(f"graceful stop did not exit 0: {bad_exits}")
    passed = verdict.valid == scenario.expect_valid and not problems
    if verdict.valid != scenario.expect_valid:
        problems.insert(0, "; ".join(verdict.reasons) or "valid, but expected invalid")
    report = RunReport(
        scenario=scenario.name,
        summary=scenario.summary,
        seed=seed,
        events=events,
        rate=rate,
        started_at=started,
        wall_s=round(time.time() - started, 2),
        expect_valid=scenario.expect_valid,
        passed=passed,
        problems=problems,
        verdict=verdict.as_dict(),
        faults=[w.as_dict() for w in ctx.faults.windows],
        processes={
            p.name: {"starts": p.starts, "kills": p.kills, "exit_codes": p.exit_codes}
            for p in cluster.processes
        },
        proxies={n: vars(p.stats) for n, p in cluster.proxies.items()},
        producer={
            "transaction_retries": producer.record.transaction_retries,
            "client_state_errors": producer.record.client_state_errors,
            "commit_outcome_unknown_then_found": len(producer.record.recovered_unknown),
            "uncertain": len(producer.record.uncertain),
            "production_s": round(producer.finished_at - producer.started_at, 2),
        },
        metrics=ctx.sampler.maxima(),
        notes=ctx.notes,
        out_dir=str(run_dir),
    )
    report.write(run_dir)
    log.info("scenario_finished", scenario=scenario.name, passed=passed, problems=problems)
    return report


async def _drive(ctx: RunContext, scenario: Scenario, problems: list[str]) -> Verdict:
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
        await _heal(ctx)
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
        subscriptions=SUBSCRIPTIONS,
        state=state,
        faults=ctx.faults.windows,
        slack=_slack(),
        redrives_explained=scenario.redrives,
    )
    if scenario.expect is not None:
        problems += scenario.expect(ctx, verdict)
    return verdict


def _keep_server_logs(servers: Servers, run_dir: Path) -> None:
    """Copy the servers' logs next to the processes' (a shared pair's logs span several runs)."""
    target = run_dir / "logs"
    target.mkdir(parents=True, exist_ok=True)
    for name, path in (
        ("postgresql.log", _path(lambda: servers.pg.log_path)),
        ("rabbitmq.log", _path(lambda: servers.rabbit.log_path)),
    ):
        if path is not None and path.exists():
            with contextlib.suppress(OSError):
                shutil.copyfile(path, target / name)


def _path(get: Any) -> Path | None:
    try:
        return Path(get())
    except Exception:
        return None
