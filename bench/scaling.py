"""Scaling with worker processes (issue #16 item 6): a staged backlog (``--events``, one ``*``
subscription on the bench receiver) drained flat out by ``--relays`` ``delivery relay`` and 1, 2
and 4 ``delivery worker`` processes, against a throwaway three-node RabbitMQ cluster (quorum
queues with three members) and against one throwaway node, on a throwaway durable PostgreSQL
(stock settings: fsync, synchronous_commit and autovacuum on). Each session: the processes are
started and warmed up, paused (SIGSTOP) while the backlog is written to the outbox, and timed
from SIGCONT to the last arrival. CPU is read from /proc per kind of process:

    relay       our ``delivery relay`` processes
    workers     our ``delivery worker`` processes
    rabbitmq    every process of the broker's node(s): the Erlang VMs and their helpers
    postgresql  the whole server (postmaster, backends, WAL writer, checkpointer, autovacuum)
    receiver    the bench's subscriber (aiohttp, verifying every signature)

and for the whole machine (busy ticks in /proc/stat), so what other work on a shared machine
took is visible as ``others``. Brokers and worker counts are interleaved run by run, so a change
of load hits every configuration.

    python -m bench.scaling                         # 20,000 events, 1/2/4 workers, both, 3 runs
    python -m bench.scaling --events 2000 --runs 1 --workers 1 --brokers single

``--database-url`` / ``--amqp-url`` use existing servers instead (each session in its own
database and queue names); PostgreSQL's CPU is then only our database's backends, and a broker
that is not ours is not measured (``null``). Prints one JSON object and the markdown table;
``--out FILE`` also writes the JSON there.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import functools
import json
import os
import statistics
import sys
import time
from collections.abc import Awaitable, Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import asyncpg

from bench.ceilings import PACK_EVENTS as PACK
from bench.ceilings import confirmed_publishes, outbox_rows, posts
from bench.facts import code_under_test, server_versions
from bench.measure import TreeSnapshot, cpu_between, loadavg, machine_cpu_ticks, snapshot
from bench.ours import Ours
from bench.processes import spawn
from bench.sessions import say, wait_for_quiet, with_system
from bench.system import System, with_heartbeat
from bench.workload import make_workload
from delivery.testing.postgres import LocalPostgres
from delivery.testing.rabbitmq import LocalRabbitMQ
from delivery.testing.rabbitmq_cluster import LocalRabbitCluster

BROKERS = ("cluster", "single")
KINDS = ("relay", "workers", "rabbitmq", "postgresql", "receiver")
CLUSTER_SIZE = 3

# A server's processes to measure, given the session's database name.
PidSource = Callable[[str], Awaitable[set[int]]]
# The next transaction id to be assigned; reading it assigns none.
_NEXT_XID = "SELECT pg_snapshot_xmax(pg_current_snapshot())::text::bigint"


@dataclass
class Servers:
    """Where a session's servers are, and how to find their processes (None: not ours)."""

    database_url: str
    amqp_url: str  # comma-separated for a cluster
    postgres_pids: PidSource
    broker_pids: PidSource | None


class Scaling(Ours):
    """Ours as ``relays`` x ``delivery relay`` + N x ``delivery worker``, on a broker given as
    DELIVERY_AMQP_URL's cluster form."""

    label = "ours (relays + workers)"

    def __init__(self, servers: Servers, *, relays: int) -> None:
        first = servers.amqp_url.split(",")[0]
        # The bench's own AMQP use (deleting the queues afterwards) goes to the first node.
        super().__init__(servers.database_url, first, split=True)
        self.relays = relays
        # Every node keeps the link of a worker paused while its backlog is staged.
        self.extra_env["DELIVERY_AMQP_URL"] = ",".join(
            with_heartbeat(u) for u in servers.amqp_url.split(",")
        )
        self.roles: list[str] = []

    def describe(self) -> str:
        return f"ours ({self.relays} relay + {self.processes} worker)"

    async def start_processes(self, processes: int) -> None:
        self.processes = processes
        environ = self.process_env()
        self.roles = ["relay"] * self.relays + ["worker"] * processes
        for i, role in enumerate(self.roles):
            self.procs.append(
                await spawn(
                    [sys.executable, "-m", "delivery", role],
                    environ,
                    self.log_dir / f"ours-{role}-{i}.log",
                )
            )

    def pids_of(self, role: str) -> set[int]:
        return {p.pid for p, r in zip(self.procs, self.roles, strict=True) if r == role}


async def _kinds(system: Scaling, servers: Servers) -> dict[str, set[int] | None]:
    return {
        "relay": system.pids_of("relay"),
        "workers": system.pids_of("worker"),
        "rabbitmq": await servers.broker_pids(system.db_name) if servers.broker_pids else None,
        "postgresql": await servers.postgres_pids(system.db_name),
        "receiver": {system.receiver.pid},
    }


def _snapshots(kinds: dict[str, set[int] | None]) -> dict[str, TreeSnapshot | None]:
    return {k: snapshot(pids) if pids is not None else None for k, pids in kinds.items()}


async def session(servers: Servers, broker: str, workers: int, args: argparse.Namespace) -> Any:
    """One flat-out drain of ``args.events`` with ``workers`` worker processes."""

    async def body(system: System) -> dict[str, Any]:
        assert isinstance(system, Scaling) and system.conn is not None
        n = args.events
        events = make_workload(n, f"{system.tag}s")
        await system.receiver.reset()
        await system.mark_recorded()
        system.pause()
        await system.publish(events, rate=0)
        load = loadavg()
        xid0 = await system.conn.fetchval(_NEXT_XID)
        before = _snapshots(await _kinds(system, servers))
        busy0, total0 = machine_cpu_ticks()
        started = time.time()
        system.resume()
        stats = await system.receiver.wait(n, 120 + n / 50, f"{broker}, {workers} workers")
        recorded = await system.wait_recorded(n, 60)
        # Backends (and broker helpers) started during the run count from zero.
        after = _snapshots(await _kinds(system, servers))
        busy1, total1 = machine_cpu_ticks()
        xid1 = await system.conn.fetchval(_NEXT_XID)
        cpu_wall_s = time.time() - started
        wall_s = stats["last_at"] - started
        cpu_s: dict[str, float | None] = {}
        for kind in KINDS:
            a, b = before[kind], after[kind]
            cpu_s[kind] = cpu_between(a, b) if a is not None and b is not None else None
        ours_s = sum(v for v in cpu_s.values() if v is not None)
        # /proc/stat's ticks are summed over every CPU: the busy share times the CPUs = cores.
        machine_cores = (busy1 - busy0) / max(1, total1 - total0) * (os.cpu_count() or 1)
        return {
            "broker": broker,
            "workers": workers,
            "relays": system.relays,
            "events": n,
            "wall_s": round(wall_s, 3),
            "events_per_s": round(n / wall_s, 1),
            "cpu_ms_per_event": {
                k: round(v * 1000 / n, 4) if v is not None else None for k, v in cpu_s.items()
            },
            # Mean cores each kind kept busy, over the same interval as the machine's figure.
            "cores": {
                k: round(v / cpu_wall_s, 3) if v is not None else None for k, v in cpu_s.items()
            },
            # Transaction ids handed out meanwhile: every transaction that wrote, on the whole
            # server (exact on our own; others' writes too on a shared one).
            "write_transactions_per_event": round((xid1 - xid0) / n, 4),
            "machine_cores": round(machine_cores, 3),
            "others_cores": round(machine_cores - ours_s / cpu_wall_s, 3),
            "recorded": recorded,
            "bad_signatures": stats["bad_signatures"],
            "load_at_start": load,
        }

    system = Scaling(servers, relays=args.relays)
    result: dict[str, Any] = await with_system(system, {"processes": workers}, body)
    return result


def medians(runs: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """The median of each figure over the runs of one configuration (per kind for CPU)."""

    def med(values: Iterator[float | None]) -> float | None:
        present = [v for v in values if v is not None]
        return round(statistics.median(present), 4) if present else None

    return {
        "runs": len(runs),
        "events_per_s": med(r["events_per_s"] for r in runs),
        "events_per_s_range": [
            min(r["events_per_s"] for r in runs),
            max(r["events_per_s"] for r in runs),
        ],
        "cpu_ms_per_event": {k: med(r["cpu_ms_per_event"][k] for r in runs) for k in KINDS},
        "cores": {k: med(r["cores"][k] for r in runs) for k in KINDS},
        "write_transactions_per_event": med(r.get("write_transactions_per_event") for r in runs),
        "machine_cores": med(r["machine_cores"] for r in runs),
        "others_cores": med(r["others_cores"] for r in runs),
    }


def _fmt(value: float | None, spec: str) -> str:
    return "n/a" if value is None else format(value, spec)


def table(out: dict[str, Any]) -> list[str]:
    """The medians as a markdown table: events/s and CPU ms per event per kind."""
    head = " | ".join(f"{k} ms/ev (cores)" for k in KINDS)
    lines = [
        f"| broker | workers | runs | events/s (min\u2013max) | {head} | sum ms/ev | write xacts/ev"
        " | machine cores (others) |",
        "|" + "---|" * (len(KINDS) + 7),
    ]
    for key, m in out["medians"].items():
        broker, workers = key.split("/")
        cells = " | ".join(
            f"{_fmt(m['cpu_ms_per_event'][k], '.3f')} ({_fmt(m['cores'][k], '.2f')})" for k in KINDS
        )
        total = sum(v for v in m["cpu_ms_per_event"].values() if v is not None)
        low, high = m["events_per_s_range"]
        lines.append(
            f"| {broker} | {workers} | {m['runs']} | {m['events_per_s']:,.0f}"
            f" ({low:,.0f}\u2013{high:,.0f}) | {cells} | {total:.3f}"
            f" | {_fmt(m.get('write_transactions_per_event'), '.3f')}"
            f" | {_fmt(m['machine_cores'], '.2f')} ({_fmt(m['others_cores'], '.2f')}) |"
        )
    return lines


def ceilings_table(out: dict[str, Any]) -> list[str]:
    """The ceilings (``bench.ceilings``) as a markdown table."""
    if not out.get("ceilings"):
        return []
    lines = [
        "| ceiling | per s | client CPU ms/item | server CPU ms/item |",
        "|---|---|---|---|",
    ]
    for c in out["ceilings"]:
        where = f" ({c['broker']})" if "broker" in c else ""
        lines.append(
            f"| {c['what']}{where} | {c['per_s']:,.0f} | {c['client_cpu_ms_per_item']:.3f}"
            f" | {c['server_cpu_ms_per_item']:.3f} |"
        )
    return lines


def report(results: dict[str, Any]) -> list[str]:
    """The section of ``bench/RESULTS.md`` that ``python -m bench run --only scaling`` fills."""
    out = results.get("scaling")
    if not out:
        return []
    load0, load1 = (", ".join(f"{x:.2f}" for x in out[k]) for k in ("load_at_start", "load_at_end"))
    return [
        "## Ours: scaling with worker processes on a three-node cluster",
        "",
        f"`{out['command']}` (`bench/scaling.py`): {out['events']:,} events staged in the outbox,"
        f" drained flat out by {out['relays']} relay and N worker processes; medians, CPU in ms"
        " per event and (in brackets) mean cores busy, per kind of process; code"
        f" `{out['code'].get('commit', '?')}`; load average {load0} at start, {load1} at end;"
        f" its own PostgreSQL {out['servers'].get('postgresql settings', '?')}, RabbitMQ"
        f" {out['servers'].get('rabbitmq', '?')}.",
        "",
        *table(out),
        "",
        *ceilings_table(out),
        "",
    ]


# -- servers --------------------------------------------------------------------------------


async def database_backends(database_url: str, name: str) -> set[int]:
    """The backends serving database ``name`` (a session's own) on a server that is not ours."""
    conn = await asyncpg.connect(database_url)
    try:
        rows = await conn.fetch("SELECT pid FROM pg_stat_activity WHERE datname = $1", name)
    finally:
        await conn.close()
    return {r["pid"] for r in rows}


@contextlib.contextmanager
def _started(server: LocalPostgres | LocalRabbitMQ | LocalRabbitCluster) -> Iterator[None]:
    try:
        server.start()
        yield
    finally:
        server.close()


async def _pids(server: LocalPostgres | LocalRabbitMQ | LocalRabbitCluster) -> set[int]:
    """Every process of a server we started (PostgreSQL: its postmaster, whose tree it is)."""
    if isinstance(server, LocalPostgres):
        return {pid} if (pid := server.postmaster_pid()) is not None else set()
    nodes = server.nodes if isinstance(server, LocalRabbitCluster) else [server]
    return set().union(*(await asyncio.gather(*(asyncio.to_thread(n.pids) for n in nodes))))


def _every_process(server: LocalPostgres | LocalRabbitMQ | LocalRabbitCluster) -> PidSource:
    async def pids(_database: str) -> set[int]:
        return await _pids(server)

    return pids


async def measure(servers: dict[str, Servers], args: argparse.Namespace) -> dict[str, Any]:
    runs: dict[str, list[dict[str, Any]]] = {f"{b}/{w}": [] for b in servers for w in args.workers}
    for i in range(args.runs):
        for broker, where in servers.items():
            for workers in args.workers:
                quiet = await wait_for_quiet(args.max_busy, args.max_wait_s)
                result = await session(where, broker, workers, args)
                result["quiet"] = quiet
                runs[f"{broker}/{workers}"].append(result)
                say(
                    f"run {i + 1}/{args.runs} {broker} {workers} workers: "
                    f"{result['events_per_s']:,.0f} ev/s, machine {result['machine_cores']:.2f}"
                    f" cores, load {result['load_at_start'][0]:.1f}"
                )
    return runs


async def ceilings(
    servers: dict[str, Servers], db: str, postgres_pids: PidSource, args: argparse.Namespace
) -> list[dict[str, Any]]:
    """The machine's ceilings (``bench.ceilings``) on the same servers, before the sessions."""
    found: list[dict[str, Any]] = []
    for broker, where in servers.items():
        assert where.broker_pids is not None
        urls = where.amqp_url.split(",")
        for per_message, messages in (
            (1, args.ceiling_messages),
            (PACK, args.ceiling_messages // 5),
        ):
            result = await confirmed_publishes(
                urls[0],
                await where.broker_pids(""),
                nodes=len(urls),
                messages=messages,
                events_per_message=per_message,
            )
            found.append({"broker": broker, **result})
            say(f"ceiling: {result['what']}: {result['per_s']:,.0f}/s")
    for result in (
        await posts(args.ceiling_messages),
        await outbox_rows(db, await postgres_pids(""), args.ceiling_rows),
    ):
        found.append(result)
        say(f"ceiling: {result['what']}: {result['per_s']:,.0f}/s")
    return found


async def main_async(args: argparse.Namespace, command: str | None = None) -> dict[str, Any]:
    """Every session of ``args``; ``command`` is what to report as having run them."""
    load_at_start = loadavg()
    with contextlib.ExitStack() as stack:
        if args.database_url:
            db = args.database_url
            postgres_pids: PidSource = functools.partial(database_backends, db)
        else:
            pg = LocalPostgres(fast=False, progress=say)  # durable: what a deployment runs
            stack.enter_context(_started(pg))
            db = pg.url
            postgres_pids = _every_process(pg)
        servers: dict[str, Servers] = {}
        if args.amqp_url:
            servers["given"] = Servers(db, args.amqp_url, postgres_pids, None)
        else:
            # Both brokers up at once, so the runs can interleave; the idle one's few ticks show
            # in "others".
            for broker in args.brokers:
                node: LocalRabbitCluster | LocalRabbitMQ = (
                    LocalRabbitCluster(size=CLUSTER_SIZE, progress=say)
                    if broker == "cluster"
                    else LocalRabbitMQ(progress=say)
                )
                stack.enter_context(_started(node))
                servers[broker] = Servers(db, node.url, postgres_pids, _every_process(node))
        first = next(iter(servers.values()))
        facts = await server_versions(db, first.amqp_url.split(",")[0])
        found = (
            await ceilings(servers, db, postgres_pids, args)
            if args.ceilings and not (args.database_url or args.amqp_url)
            else []
        )
        runs = await measure(servers, args)
    out: dict[str, Any] = {
        "command": command or " ".join(["python -m bench.scaling", *sys.argv[1:]]),
        "code": code_under_test(),
        "servers": facts,
        "relays": args.relays,
        "events": args.events,
        "load_at_start": load_at_start,
        "load_at_end": loadavg(),
        "ceilings": found,
        "medians": {key: medians(results) for key, results in runs.items()},
        "runs": runs,
    }
    return out


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m bench.scaling",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    ints = lambda text: [int(x) for x in text.split(",") if x]  # noqa: E731
    p.add_argument("--events", type=int, default=20_000, help="backlog per session")
    p.add_argument("--workers", type=ints, default=[1, 2, 4], help="worker processes, a list")
    p.add_argument("--relays", type=int, default=1, help="relay processes (fixed)")
    p.add_argument("--runs", type=int, default=3)
    p.add_argument(
        "--brokers",
        type=lambda t: t.split(","),
        default=list(BROKERS),
        help="cluster (three nodes) and/or single (one node)",
    )
    p.add_argument("--database-url", help="an existing server instead of a throwaway one")
    p.add_argument("--amqp-url", help="an existing broker (not measured) instead of throwaways")
    p.add_argument("--max-busy", type=float, default=0.5, help="wait for the machine below it")
    p.add_argument("--max-wait-s", type=float, default=15.0, help="at most this long")
    p.add_argument(
        "--no-ceilings",
        dest="ceilings",
        action="store_false",
        help="skip bench.ceilings (publishes/s, POSTs/s, outbox rows/s) before the sessions",
    )
    p.add_argument("--ceiling-messages", type=int, default=5000, help="publishes and POSTs")
    p.add_argument("--ceiling-rows", type=int, default=20_000, help="outbox rows")
    p.add_argument("--out", type=Path)
    return p


def main() -> None:
    args = parser().parse_args()
    unknown = set(args.brokers) - set(BROKERS)
    if unknown:
        parser().error(f"unknown broker {', '.join(sorted(unknown))}")
    out = asyncio.run(main_async(args))
    text = json.dumps(out, indent=2)
    if args.out is not None:
        args.out.write_text(text + "\n")
    print(text)
    print("\n".join([*table(out), "", *ceilings_table(out)]))


if __name__ == "__main__":
    main()
