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

from chaos.alerts import AlertExpectation, judge
from chaos.cluster import Cluster, Servers
from chaos.context import FaultLog, RunContext
from chaos.metrics import MetricsSampler
from chaos.phases import drive
from chaos.producer import Producer
from chaos.prometheus import ALERT_RULES, RunPrometheus, find_binary, running_prometheus
from chaos.records import SubscriptionSpec
from chaos.report import RunReport
from chaos.scenarios import Scenario
from delivery.store import subscriptions
from delivery.testing.receiver import Receiver

__all__ = ["DEFAULT_RATE", "run_scenario"]

log = structlog.get_logger("chaos.runner")

DEFAULT_RATE = 150.0


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


@contextlib.asynccontextmanager
async def _servers(
    shared: Servers | None, *, standby: bool, rabbit_nodes: int
) -> AsyncIterator[Servers]:
    if shared is not None and standby:
        # A failover spends the pair: a fresh one, beside the shared RabbitMQ.
        await shared.heal()
        pair = await Servers.pair_beside(shared.rabbit)
        try:
            yield pair
        finally:
            await pair.close_pg()
        return
    if shared is not None:
        if shared.rabbit_nodes != rabbit_nodes:
            raise ValueError(f"the scenario needs {rabbit_nodes} RabbitMQ node(s), the shared "
                             f"servers have {shared.rabbit_nodes}")  # fmt: skip
        await shared.heal()
        yield shared
        return
    servers = await Servers.start(standby=standby, rabbit_nodes=rabbit_nodes)
    try:
        yield servers
    finally:
        await servers.close()


async def _subscribe(
    cluster: Cluster, receiver: Receiver, specs: tuple[SubscriptionSpec, ...]
) -> None:
    conn = await asyncpg.connect(cluster.db_url)
    try:
        for spec in specs:
            sub = await subscriptions.add(
                conn,
                url=receiver.url(spec.path),
                patterns=list(spec.patterns),
                account_id=spec.account_id,
                ordered=spec.ordered,
            )
            receiver.expect_secret(spec.path, sub.secret)
    finally:
        await conn.close()


async def run_scenario(
    scenario: Scenario,
    *,
    events: int,
    seed: int,
    out_dir: Path,
    rate: float = DEFAULT_RATE,
    servers: Servers | None = None,
    alert_scale: float = 1.0,
    alert_rules: Path | None = None,
) -> RunReport:
    """Run ``scenario`` once; ``servers`` lets several runs share one pair (the test suite).
    ``alert_scale``: the alert rules' clock for scenarios with alert expectations (1: as
    shipped; short runs scale it down, see chaos.alerts)."""
    run_dir = out_dir / scenario.name
    shutil.rmtree(run_dir, ignore_errors=True)
    run_dir.mkdir(parents=True)
    with (run_dir / "chaos.log").open("w") as log_stream:
        handler = _configure_logging(log_stream)
        try:
            return await _run(
                scenario,
                events=events,
                seed=seed,
                run_dir=run_dir,
                rate=rate,
                shared=servers,
                alert_scale=alert_scale,
                alert_rules=alert_rules or ALERT_RULES,
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
    alert_scale: float,
    alert_rules: Path,
) -> RunReport:
    started = time.time()
    rng = random.Random(seed)
    events = max(events, scenario.min_events)
    if scenario.min_production_s > 0:
        rate = min(rate, events / scenario.min_production_s)
    if scenario.max_rate is not None:
        rate = min(rate, scenario.max_rate)
    problems: list[str] = []
    env = dict(scenario.env)
    if scenario.alerts is not None and "DeliveryLagHigh" in scenario.alerts.fire:
        # The gauges' refresh is part of the lag alert's delay: it keeps the rules' clock.
        env["DELIVERY_BACKLOG_GAUGES_INTERVAL_S"] = f"{5.0 * alert_scale:g}"
    alerts: dict[str, Any] = {}
    async with (
        _servers(
            shared, standby=scenario.layout.standby, rabbit_nodes=scenario.rabbit_nodes
        ) as servers,
        aiohttp.ClientSession() as session,
        Receiver() as receiver,
        contextlib.AsyncExitStack() as stack,
    ):
        cluster = Cluster(servers, run_dir, scenario.name, scenario.layout, env)
        try:
            await cluster.start()
            await _subscribe(cluster, receiver, scenario.subscriptions)
            await cluster.start_processes(session)
            prometheus: RunPrometheus | None = None
            if scenario.alerts is not None:
                prometheus = await stack.enter_async_context(
                    running_prometheus(
                        _prometheus_binary(scenario),
                        run_dir / "prometheus",
                        cluster.processes,
                        session,
                        scale=alert_scale,
                        rules=alert_rules,
                        scaled=frozenset(scenario.alerts.fire),
                        scrape_s=scenario.alert_scrape_s,
                    )
                )
            producer = Producer(
                cluster.link_db_url("producer"),
                key=f"{scenario.name[:24]}-{seed}",
                total=events,
                rate=rate,
                seed=seed,
                accounts_per_stream=scenario.accounts_per_stream(events),
            )
            ctx = RunContext(
                cluster=cluster,
                producer=producer,
                receiver=receiver,
                faults=FaultLog(),
                sampler=MetricsSampler(lambda: cluster.processes),
                session=session,
                rng=rng,
                alert_scale=alert_scale,
                prometheus=prometheus,
            )
            ctx.ready_at = time.monotonic()
            log.info("scenario_started", scenario=scenario.name, events=events, rate=rate)
            verdict = await drive(ctx, scenario, problems)
            if prometheus is not None:
                alerts = await _judge_alerts(prometheus, ctx, scenario, session, problems)
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
        alerts=alerts,
        out_dir=str(run_dir),
    )
    report.write(run_dir)
    log.info("scenario_finished", scenario=scenario.name, passed=passed, problems=problems)
    return report


def _prometheus_binary(scenario: Scenario) -> str:
    binary = find_binary()
    if binary is None:
        raise RuntimeError(
            f"prometheus not found (apt-get install prometheus): {scenario.name} checks its alerts"
        )
    return binary


async def _judge_alerts(
    prometheus: RunPrometheus,
    ctx: RunContext,
    scenario: Scenario,
    session: aiohttp.ClientSession,
    problems: list[str],
) -> dict[str, Any]:
    """The run's alert timeline from Prometheus, judged against the scenario's expectation
    (the bounds count from the first fault's start)."""
    assert scenario.alerts is not None
    anchor = min((w.start for w in ctx.faults.windows), default=None)
    if anchor is not None:
        await _until_expected_fired(prometheus, scenario.alerts, anchor, session)
    # A few more evaluations, so that the last state the rules reached (a resolution just
    # now) is in ALERTS and more than chaos.alerts' gap before the end of the query.
    await asyncio.sleep(5 * prometheus.interval_s)
    seen = await prometheus.alert_episodes(session, time.time())
    found = judge(seen, scenario.alerts, anchor, prometheus.scale)
    problems += found
    return {
        "rules": str(prometheus.rules),
        "scale": prometheus.scale,
        "interval_s": prometheus.interval_s,
        "anchor": anchor,
        "expected": {k: v * prometheus.scale for k, v in scenario.alerts.fire.items()},
        "tolerated": sorted(scenario.alerts.tolerate),
        "episodes": [e.as_dict() for e in seen],
        "problems": found,
    }


async def _until_expected_fired(
    prometheus: RunPrometheus,
    expectation: AlertExpectation,
    anchor: float,
    session: aiohttp.ClientSession,
) -> None:
    """A run may settle before an alert's ``for:`` has run out (a rule that counts refusals
    over 10 minutes keeps firing-worthy for minutes after the fault): the platform keeps
    running until every expected alert fired or its bound passed, so each is judged on its
    whole bound, never on how fast the run happened to settle."""
    waiting = dict.fromkeys(expectation.fire, 0.0)
    for name in waiting:
        waiting[name] = anchor + expectation.bound_s(name, prometheus.scale)
    while waiting:
        now = time.time()
        fired = {e.alert for e in await prometheus.alert_episodes(session, now) if e.firing_at}
        waiting = {n: t for n, t in waiting.items() if n not in fired and now < t}
        if waiting:
            await asyncio.sleep(prometheus.interval_s)


def _keep_server_logs(servers: Servers, run_dir: Path) -> None:
    """Copy the servers' logs next to the processes' (a shared pair's logs span several runs)."""
    target = run_dir / "logs"
    target.mkdir(parents=True, exist_ok=True)
    logs = [("postgresql.log", _path(lambda: servers.pg.log_path))]
    if (standby := servers.standby) is not None:
        logs.append(("postgresql-standby.log", _path(lambda: standby.log_path)))
    if servers.rabbits is None:
        logs.append(("rabbitmq.log", _path(lambda: servers.rabbit.log_path)))
    else:
        for k, node in enumerate(servers.rabbits.nodes):
            logs.append((f"rabbitmq-n{k}.log", _path(lambda n=node: n.log_path)))
    for name, path in logs:
        if path is not None and path.exists():
            with contextlib.suppress(OSError):
                shutil.copyfile(path, target / name)


def _path(get: Any) -> Path | None:
    try:
        return Path(get())
    except Exception:
        return None
