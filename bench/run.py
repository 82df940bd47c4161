"""The whole side-by-side comparison in one command; writes ``bench/RESULTS.md``.

    python -m bench run                 # everything, 3 runs each (about 25 minutes)
    python -m bench run --quick         # a few hundred events per system, 1 run (a smoke)
    python -m bench run --only flat,paced --systems ours,asyncio
    python -m bench render              # RESULTS.md again from bench/results.json

Scenarios: ``flat`` and ``paced`` for every system; ``live`` (ours with the producer publishing
while it runs); ``processes`` and ``fanout`` (ours scaling); ``relay`` (relay drain rate);
``backlog`` (a large backlog drained, memory sampled every second); ``profile`` (py-spy on our
worker during a flat-out run).

Services: DELIVERY_DATABASE_URL / DELIVERY_AMQP_URL when set (each system in its own database
and queue names, all removed afterwards), otherwise throwaway local servers.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import importlib.metadata
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import aio_pika
import asyncpg
import uvloop

from bench.measure import (
    cpu_between,
    loadavg,
    machine_facts,
    peak_rss,
    percentile,
    rss_bytes,
    snapshot,
    tree_pids,
)
from bench.systems import SYSTEMS, Ours, System, make_workload
from delivery.testing.postgres import LocalPostgres
from delivery.testing.services import ENV_DATABASE_URL, provision_services

HERE = Path(__file__).resolve().parent
RESULTS_JSON = HERE / "results.json"
RESULTS_MD = HERE / "RESULTS.md"
MB = 2**20

ALL_SCENARIOS = (
    "flat", "paced", "live", "tuned", "processes", "fanout", "relay", "profile", "backlog",
)  # fmt: skip


def say(message: str) -> None:
    print(f"[bench {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


# -- load on a shared machine ---------------------------------------------------------------


def _cpu_times() -> tuple[int, int]:
    fields = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    idle = fields[3] + fields[4]  # idle + iowait
    return sum(fields) - idle, sum(fields)


async def busy_fraction(sample_s: float = 2.0) -> float:
    """How busy the whole machine is right now (0-1), measured between our sessions, when
    nothing of ours runs: what other engineers' work takes."""
    busy0, total0 = _cpu_times()
    await asyncio.sleep(sample_s)
    busy1, total1 = _cpu_times()
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


# -- scenarios on one system ----------------------------------------------------------------

_counter = Counter[str]()


def _tag(system: System, what: str) -> str:
    _counter[system.tag + what] += 1
    return f"{system.tag}{what}{_counter[system.tag + what]}"


def _duplicates(arrivals: list[tuple[str, str, float]]) -> int:
    return len(arrivals) - len({(p, i) for p, i, _t in arrivals})


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
    events = make_workload(n, _tag(system, "f"))
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
        "duplicates": _duplicates(arrivals),
        "bad_signatures": stats["bad_signatures"],
    }


async def paced(system: System, rate: float, seconds: float) -> dict[str, Any]:
    """Publish at ``rate`` events/s and measure publish-returned -> subscriber latency."""
    n = int(rate * seconds)
    events = make_workload(n, _tag(system, "p"))
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
    for _path, event_id, at in arrivals:
        first[event_id] = min(at, first.get(event_id, at))
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
        "duplicates": _duplicates(arrivals),
        "bad_signatures": stats["bad_signatures"],
    }


# -- sessions -------------------------------------------------------------------------------


async def _with_system(
    system: System, setup: dict[str, Any], body: Callable[[System], Awaitable[Any]]
) -> Any:
    try:
        await system.setup(**setup)
        result = await body(system)
    except BaseException:
        say(f"{system.name} failed; its logs are in {system.log_dir}")
        await system.teardown(keep_logs=True)
        raise
    await system.teardown()
    return result


async def compare_session(
    name: str, db: str, amqp: str, args: argparse.Namespace, quiet: dict[str, Any]
) -> dict[str, Any]:
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

    return await _with_system(SYSTEMS[name](db, amqp), {}, body)


async def live_session(db: str, amqp: str, n: int) -> dict[str, Any]:
    async def body(system: System) -> dict[str, Any]:
        return await flat_out(system, n, staged=False)

    return await _with_system(Ours(db, amqp), {}, body)


async def scaling_session(
    db: str, amqp: str, n: int, processes: int, fanout: int, *, env: dict[str, str] | None = None
) -> dict[str, Any]:
    async def body(system: System) -> dict[str, Any]:
        return await flat_out(system, n)

    ours = Ours(db, amqp)
    ours.extra_env = dict(env or {})
    return await _with_system(ours, {"processes": processes, "fanout": fanout}, body)


async def backlog_session(db: str, amqp: str, n: int, timeout_s: float) -> dict[str, Any]:
    """``n`` events already in the outbox when one ``delivery run`` starts; RSS, CPU and
    arrivals sampled every second until all are delivered."""

    async def body(system: System) -> dict[str, Any]:
        events = make_workload(n, _tag(system, "b"))
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

    return await _with_system(Ours(db, amqp), {"start": False}, body)


async def profile_session(db: str, amqp: str, n: int, out_dir: Path) -> dict[str, Any]:
    raw = out_dir / "profile.raw.txt"
    spy: list[asyncio.subprocess.Process] = []

    async def on_start(system: System) -> None:
        py_spy = str(Path(sys.executable).with_name("py-spy"))
        spy.append(
            await asyncio.create_subprocess_exec(
                py_spy, "record", "--pid", str(system.roots[0]), "--rate", "200",
                "--format", "raw", "--output", str(raw), "--nonblocking",
                stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.DEVNULL,
            )
        )  # fmt: skip

    async def on_end(_system: System) -> None:
        spy[0].send_signal(signal.SIGINT)
        await asyncio.wait_for(spy[0].wait(), 60)

    async def body(system: System) -> dict[str, Any]:
        result = await flat_out(system, n, on_start=on_start, on_end=on_end)
        return {"flat": result, "raw": str(raw), **analyse_profile(raw)}

    return await _with_system(Ours(db, amqp), {}, body)


def analyse_profile(raw: Path) -> dict[str, Any]:
    """Self and inclusive sample shares from py-spy's raw (collapsed stacks) output."""
    self_counts: Counter[str] = Counter()
    incl_counts: Counter[str] = Counter()
    package_counts: Counter[str] = Counter()
    total = 0
    for line in raw.read_text().splitlines():
        stack, _, count_text = line.rpartition(" ")
        if not stack or not count_text.isdigit():
            continue
        count = int(count_text)
        frames = [f for f in stack.split(";") if f and not f.startswith(("process ", "thread "))]
        if not frames:
            continue
        total += count
        self_counts[_short(frames[-1])] += count
        package_counts[_package(frames[-1])] += count
        for frame in {_short(f) for f in frames}:
            incl_counts[frame] += count

    def share(counter: Counter[str], k: int, only: tuple[str, ...] = ()) -> list[list[Any]]:
        rows = [(f, c) for f, c in counter.most_common() if not only or f.startswith(only)]
        return [[f, c, 100 * c / total] for f, c in rows[:k]]

    # The entry points (cli, __main__, the supervisor) hold every sample: not informative.
    for frame in [f for f in incl_counts if f.startswith(("delivery/cli/", "delivery/__main__"))]:
        del incl_counts[frame]
    return {
        "samples": total,
        "self_top": share(self_counts, 25),
        "inclusive_ours": share(incl_counts, 25, ("delivery/", "workers/")),
        "inclusive_libraries": share(
            incl_counts, 15, ("aiormq/", "aio_pika/", "pamqp/", "asyncpg/", "aiohttp/")
        ),
        "packages": share(package_counts, 15),
    }


def _short(frame: str) -> str:
    """``func (path/to/site-packages/pkg/mod.py:12)`` -> ``pkg/mod.py:func``."""
    name, _, where = frame.partition(" (")
    path = where.rstrip(")").rsplit(":", 1)[0]
    for marker in ("site-packages/", "/work/main/", "lib/python3.11/"):
        if marker in path:
            path = path.split(marker, 1)[1]
            break
    return f"{path}:{name}"


def _package(frame: str) -> str:
    short = _short(frame)
    path = short.split(":", 1)[0]
    if path.startswith(("delivery/", "workers/")):
        return path.split("/")[0] + "/ (ours)"
    top = path.split("/", 1)[0]
    if top.endswith(".py") or top in {"asyncio", "concurrent", "json", "logging"}:
        return "stdlib/" + top
    return top


# -- the orchestration ----------------------------------------------------------------------


def versions() -> dict[str, str]:
    names = [
        "celery",
        "kombu",
        "billiard",
        "dramatiq",
        "pika",
        "aio-pika",
        "aiormq",
        "aiohttp",
        "asyncpg",
        "psycopg",
        "requests",
        "uvloop",
        "orjson",
        "py-spy",
    ]
    found = {}
    for name in names:
        with contextlib.suppress(importlib.metadata.PackageNotFoundError):
            found[name] = importlib.metadata.version(name)
    return found


async def server_versions(db: str, amqp: str) -> dict[str, str]:
    out = {}
    with contextlib.suppress(Exception):
        conn = await asyncpg.connect(db)
        out["postgresql"] = await conn.fetchval("SHOW server_version")
        # What changes PostgreSQL's figures most: durable commits, and whether anything vacuums
        # the queue tables (a 1,000,000-event backlog on a server with autovacuum off slows 5x).
        settings = await conn.fetch(
            "SELECT name, setting FROM pg_settings WHERE name = ANY($1::text[]) ORDER BY name",
            ["autovacuum", "fsync", "shared_buffers", "synchronous_commit"],
        )
        out["postgresql settings"] = ", ".join(f"{r['name']}={r['setting']}" for r in settings)
        await conn.close()
    with contextlib.suppress(Exception):
        connection = await aio_pika.connect(amqp)
        props = connection.transport.connection.server_properties  # type: ignore[union-attr]
        out["rabbitmq"] = str(props.get("version", "?"))
        await connection.close()
    return out


def code_under_test() -> dict[str, str]:
    """The commit measured, and any uncommitted change to the code under test."""

    def git(*args: str) -> str:
        try:
            return subprocess.run(
                ["git", *args],
                capture_output=True,
                text=True,
                cwd=HERE.parent,
                timeout=10,
                check=False,
            ).stdout.strip()
        except (OSError, subprocess.TimeoutExpired):
            return ""

    return {
        "commit": git("log", "-1", "--format=%h %s"),
        "uncommitted": git("status", "--short", "--", "delivery", "workers", "migrations"),
    }


def save(results: dict[str, Any]) -> None:
    RESULTS_JSON.write_text(json.dumps(results, indent=1, default=str))


Scenario = Callable[[str, str, argparse.Namespace, dict[str, Any]], Awaitable[None]]


async def run_all(db: str, amqp: str, args: argparse.Namespace) -> dict[str, Any]:
    results: dict[str, Any] = (
        json.loads(RESULTS_JSON.read_text()) if args.merge and RESULTS_JSON.exists() else {}
    )
    meta = {
        "command": " ".join(["python -m bench", *sys.argv[1:]]),
        "started": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
        "machine": machine_facts(),
        "versions": versions(),
        "servers": await server_versions(db, amqp),
        "load_at_start": loadavg(),
        "code": code_under_test(),
        "params": {k: v for k, v in vars(args).items() if k != "command"},
    }
    # With --merge, each invocation is kept: the report names every command and its load.
    results.setdefault("invocations", []).append(meta)
    results.setdefault("meta", meta)
    scenarios: list[tuple[set[str], Scenario]] = [
        ({"flat", "paced"}, _compare),
        ({"live"}, _live),
        ({"tuned"}, _tuned),
        ({"processes"}, _processes),
        ({"fanout"}, _fanout),
        ({"relay"}, _relay),
        ({"profile"}, _profile),
        ({"backlog"}, _backlog),
    ]
    for names, scenario in scenarios:
        if names & set(args.only):
            await scenario(db, amqp, args, results)
    meta["load_at_end"] = loadavg()
    meta["finished"] = time.strftime("%Y-%m-%d %H:%M:%S %Z")
    save(results)
    return results


async def _quiet(args: argparse.Namespace) -> dict[str, Any]:
    return await wait_for_quiet(args.max_busy, args.max_wait_s)


async def _compare(db: str, amqp: str, args: argparse.Namespace, results: dict[str, Any]) -> None:
    sessions: dict[str, list[dict[str, Any]]] = {name: [] for name in args.systems}
    results["compare"] = sessions
    for run in range(args.runs):
        for name in args.systems:
            if name in {"celery", "dramatiq"} and not _importable(name):
                say(f"{name} not installed (pip install -e '.[bench]'): skipped")
                continue
            quiet = await _quiet(args)
            say(f"run {run + 1}/{args.runs}: {name}")
            sessions[name].append(await compare_session(name, db, amqp, args, quiet))
            save(results)


async def _live(db: str, amqp: str, args: argparse.Namespace, results: dict[str, Any]) -> None:
    results["live"] = []
    for run in range(args.runs):
        await _quiet(args)
        say(f"run {run + 1}/{args.runs}: ours with a live producer")
        results["live"].append(await live_session(db, amqp, args.events))
        save(results)


async def _processes(db: str, amqp: str, args: argparse.Namespace, results: dict[str, Any]) -> None:
    results["processes"] = {}
    for processes in args.process_counts:
        results["processes"][str(processes)] = []
        for run in range(args.runs):
            await _quiet(args)
            say(f"run {run + 1}/{args.runs}: ours x {processes} processes")
            r = await scaling_session(db, amqp, args.events, processes, 1)
            results["processes"][str(processes)].append(r)
            say(f"  {r['events_per_s']:,.0f} ev/s")
            save(results)


async def _fanout(db: str, amqp: str, args: argparse.Namespace, results: dict[str, Any]) -> None:
    results["fanout"] = {}
    for fanout in args.fanouts:
        results["fanout"][str(fanout)] = []
        n = max(100, args.fanout_deliveries // fanout)
        for run in range(args.runs):
            await _quiet(args)
            say(f"run {run + 1}/{args.runs}: ours fan-out {fanout} ({n} events)")
            r = await scaling_session(db, amqp, n, 1, fanout)
            results["fanout"][str(fanout)].append(r)
            say(f"  {r['deliveries_per_s']:,.0f} deliveries/s")
            save(results)


# Not a default and not a guarantee: the per-subscriber request cap (16) is a fairness knob;
# with one subscriber it is the whole pipe. Shown apart, labelled.
TUNED_ENV = {"DELIVERY_PER_SUBSCRIPTION_MAX_IN_FLIGHT": "128"}


async def _tuned(db: str, amqp: str, args: argparse.Namespace, results: dict[str, Any]) -> None:
    results["tuned"] = {"env": TUNED_ENV, "runs": []}
    for run in range(args.runs):
        quiet = await _quiet(args)
        say(f"run {run + 1}/{args.runs}: ours with {TUNED_ENV}")
        ours = Ours(db, amqp)
        ours.extra_env = dict(TUNED_ENV)

        async def body(system: System) -> dict[str, Any]:
            flat = await flat_out(system, args.events)
            steady = await paced(system, args.rate, args.paced_s)
            return {"flat": flat, "paced": steady}

        r = {**quiet, **await _with_system(ours, {}, body)}
        results["tuned"]["runs"].append(r)
        say(f"  {r['flat']['events_per_s']:,.0f} ev/s, paced p99 {r['paced']['p99_ms']:.1f} ms")
        save(results)


async def _relay(db: str, amqp: str, args: argparse.Namespace, results: dict[str, Any]) -> None:
    from bench.relay_drain import drain

    results["relay"] = {"rows": args.relay_rows, "batch": 500, "rates": []}
    for run in range(args.runs):
        await _quiet(args)
        rate = await drain(db, amqp, args.relay_rows, 500)
        say(f"run {run + 1}/{args.runs}: relay drain {rate:,.0f} rows/s")
        results["relay"]["rates"].append(rate)
        save(results)


async def _profile(db: str, amqp: str, args: argparse.Namespace, results: dict[str, Any]) -> None:
    await _quiet(args)
    say("profile: py-spy on ours during a flat-out run")
    out_dir = Path(tempfile.mkdtemp(prefix="bench-profile-"))
    results["profile"] = await profile_session(db, amqp, args.events, out_dir)
    save(results)


async def _backlog(db: str, amqp: str, args: argparse.Namespace, results: dict[str, Any]) -> None:
    await _quiet(args)
    say(f"backlog: {args.backlog:,} events")
    results["backlog"] = await backlog_session(db, amqp, args.backlog, args.backlog_timeout_s)
    save(results)


def _importable(name: str) -> bool:
    try:
        __import__(name)
    except ImportError:
        return False
    return True


def _csv(cast: Callable[[str], Any]) -> Callable[[str], list[Any]]:
    return lambda text: [cast(x) for x in text.split(",") if x]


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench")
    parser.add_argument("command", choices=["run", "render"])
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--events", type=int, default=10_000)
    parser.add_argument("--rate", type=float, default=500.0, help="paced events/s")
    parser.add_argument("--paced-s", type=float, default=10.0)
    parser.add_argument("--systems", type=_csv(str), default=list(SYSTEMS))
    parser.add_argument("--only", type=_csv(str), default=list(ALL_SCENARIOS))
    parser.add_argument("--process-counts", type=_csv(int), default=[1, 2, 4])
    parser.add_argument("--fanouts", type=_csv(int), default=[1, 10, 100])
    parser.add_argument("--fanout-deliveries", type=int, default=20_000)
    parser.add_argument("--relay-rows", type=int, default=50_000)
    parser.add_argument("--backlog", type=int, default=200_000)
    parser.add_argument("--backlog-timeout-s", type=float, default=2400.0)
    parser.add_argument(
        "--max-busy",
        type=float,
        default=0.25,
        help="before each run, wait until the machine is less busy than this without us (0-1)",
    )
    parser.add_argument("--max-wait-s", type=float, default=120.0)
    parser.add_argument(
        "--merge", action="store_true", help="keep other scenarios' results from bench/results.json"
    )
    parser.add_argument(
        "--own-postgres",
        action="store_true",
        help="start a throwaway PostgreSQL with stock settings (fsync and autovacuum on) instead "
        "of DELIVERY_DATABASE_URL",
    )
    parser.add_argument(
        "--quick",
        action="store_true",
        help="a smoke: few events, one run, small backlog (no figures worth quoting)",
    )
    args = parser.parse_args()
    if args.quick:
        args.runs, args.events, args.paced_s = 1, 300, 2.0
        args.fanout_deliveries, args.relay_rows, args.backlog = 1000, 2000, 2000
        args.max_wait_s = 0
    if args.command == "run":
        with contextlib.ExitStack() as stack:
            if args.own_postgres:
                # Durable (fast=False) and otherwise stock: what a deployment runs, whatever the
                # machine's shared server is configured for.
                pg = LocalPostgres(fast=False, progress=say)
                stack.callback(pg.close)
                pg.start()
                os.environ[ENV_DATABASE_URL] = pg.url
            services = stack.enter_context(provision_services(progress=say))
            results = uvloop.run(run_all(services.database_url, services.amqp_url, args))
    else:
        results = json.loads(RESULTS_JSON.read_text())
    from bench.report import render

    RESULTS_MD.write_text(render(results))
    say(f"wrote {RESULTS_MD}")


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    main()
