"""Scenarios of flat-out and paced runs: every system side by side (``flat``, ``paced``), and
ours alone with a live producer (``live``), with one setting changed (``tuned``), on more
processes (``processes``) and subscriptions (``fanout``)."""

from __future__ import annotations

from typing import Any

from bench.ours import Ours
from bench.sessions import Run, flat_out, paced, say, with_system
from bench.system import System
from bench.systems import SYSTEMS

# Not a default and not a guarantee: the per-subscriber request cap (16) is a fairness knob;
# with one subscriber it is the whole pipe. Shown apart, labelled.
TUNED_ENV = {"DELIVERY_PER_SUBSCRIPTION_MAX_IN_FLIGHT": "128"}


async def compare_session(run: Run, name: str, quiet: dict[str, Any]) -> dict[str, Any]:
    args = run.args

    async def body(system: System) -> dict[str, Any]:
        out: dict[str, Any] = {"system": system.describe(), **quiet}
        if "flat" in args.only:
            out["flat"] = await flat_out(system, args.events)
            say(
                f"{name} flat: {out['flat']['events_per_s']:,.0f} ev/s, "
                f"{out['flat']['cpu_ms_per_event']:.2f} ms CPU/ev, "
                f"{out['flat']['rss_max_mb']:.0f} MB"
            )
        if "paced" in args.only:
            out["paced"] = await paced(system, args.rate, args.paced_s)
            say(
                f"{name} paced: p50 {out['paced']['p50_ms']:.1f} "
                f"p99 {out['paced']['p99_ms']:.1f} ms"
            )
        return out

    return await with_system(SYSTEMS[name](run.db, run.amqp), {}, body)


async def scaling_session(run: Run, n: int, processes: int, fanout: int) -> dict[str, Any]:
    async def body(system: System) -> dict[str, Any]:
        return await flat_out(system, n)

    setup = {"processes": processes, "fanout": fanout}
    return await with_system(Ours(run.db, run.amqp), setup, body)


async def compare(run: Run) -> None:
    args = run.args
    sessions: dict[str, list[dict[str, Any]]] = {name: [] for name in args.systems}
    run.results["compare"] = sessions
    for i in range(args.runs):
        for name in args.systems:
            requires = SYSTEMS[name].requires
            if requires is not None and not _importable(requires):
                say(f"{name} not installed (pip install -e '.[bench]'): skipped")
                continue
            quiet = await run.quiet()
            say(f"run {i + 1}/{args.runs}: {name}")
            sessions[name].append(await compare_session(run, name, quiet))
            run.save()


async def live(run: Run) -> None:
    async def body(system: System) -> dict[str, Any]:
        return await flat_out(system, run.args.events, staged=False)

    run.results["live"] = []
    for i in range(run.args.runs):
        await run.quiet()
        say(f"run {i + 1}/{run.args.runs}: ours with a live producer")
        run.results["live"].append(await with_system(Ours(run.db, run.amqp), {}, body))
        run.save()


async def processes(run: Run) -> None:
    args = run.args
    run.results["processes"] = {}
    for count in args.process_counts:
        run.results["processes"][str(count)] = []
        for i in range(args.runs):
            await run.quiet()
            say(f"run {i + 1}/{args.runs}: ours x {count} processes")
            r = await scaling_session(run, args.events, count, 1)
            run.results["processes"][str(count)].append(r)
            say(f"  {r['events_per_s']:,.0f} ev/s")
            run.save()


async def fanout(run: Run) -> None:
    args = run.args
    run.results["fanout"] = {}
    for count in args.fanouts:
        run.results["fanout"][str(count)] = []
        n = max(100, args.fanout_deliveries // count)
        for i in range(args.runs):
            await run.quiet()
            say(f"run {i + 1}/{args.runs}: ours fan-out {count} ({n} events)")
            r = await scaling_session(run, n, 1, count)
            run.results["fanout"][str(count)].append(r)
            say(f"  {r['deliveries_per_s']:,.0f} deliveries/s")
            run.save()


async def tuned(run: Run) -> None:
    args = run.args
    run.results["tuned"] = {"env": TUNED_ENV, "runs": []}

    async def body(system: System) -> dict[str, Any]:
        flat = await flat_out(system, args.events)
        steady = await paced(system, args.rate, args.paced_s)
        return {"flat": flat, "paced": steady}

    for i in range(args.runs):
        quiet = await run.quiet()
        say(f"run {i + 1}/{args.runs}: ours with {TUNED_ENV}")
        ours = Ours(run.db, run.amqp)
        ours.extra_env = dict(TUNED_ENV)
        r = {**quiet, **await with_system(ours, {}, body)}
        run.results["tuned"]["runs"].append(r)
        say(f"  {r['flat']['events_per_s']:,.0f} ev/s, paced p99 {r['paced']['p99_ms']:.1f} ms")
        run.save()


def _importable(name: str) -> bool:
    try:
        __import__(name)
    except ImportError:
        return False
    return True
