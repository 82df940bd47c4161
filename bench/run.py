"""The whole side-by-side comparison in one command; writes ``bench/RESULTS.md``.

    python -m bench run                 # everything, 3 runs each (about 25 minutes)
    python -m bench run --quick         # a few hundred events per system, 1 run (a smoke)
    python -m bench run --only flat,paced --systems ours,asyncio
    python -m bench run --only e2e,failures --merge   # the opt-in scenarios, kept beside the rest
    python -m bench render              # RESULTS.md again from bench/results.json

Scenarios (``bench/scenarios/``, listed with ``--help``): ``flat`` and ``paced`` for every
system; ``live`` (ours with the producer publishing while it runs); ``tuned`` (one setting
changed); ``processes`` and ``fanout`` (ours scaling); ``relay`` (relay drain rate); ``backlog``
(a large backlog drained, memory sampled every second); ``profile`` (py-spy on our worker during
a flat-out run); opt-in: ``e2e`` (a live producer in batches, at a chosen rate), ``failures``
(a failing and a hanging subscriber) and ``scaling`` (1 relay and N workers on a throwaway
three-node RabbitMQ cluster and one node, CPU per kind of process; ``bench.scaling``).

Services: DELIVERY_DATABASE_URL / DELIVERY_AMQP_URL when set (each system in its own database
and queue names, all removed afterwards), otherwise throwaway local servers.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import uvloop

from bench.facts import code_under_test, server_versions, versions
from bench.measure import loadavg, machine_facts
from bench.scenarios import CATALOGUE, DEFAULT, selected
from bench.sessions import Run, say
from bench.systems import SYSTEMS
from delivery.testing.postgres import LocalPostgres
from delivery.testing.services import ENV_DATABASE_URL, provision_services

HERE = Path(__file__).resolve().parent
RESULTS_JSON = HERE / "results.json"
RESULTS_MD = HERE / "RESULTS.md"


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
    run = Run(db, amqp, args, results, RESULTS_JSON)
    for scenario in selected(args.only):
        await scenario(run)
    meta["load_at_end"] = loadavg()
    meta["finished"] = time.strftime("%Y-%m-%d %H:%M:%S %Z")
    run.save()
    return results


def _csv(cast: Callable[[str], Any]) -> Callable[[str], list[Any]]:
    return lambda text: [cast(x) for x in text.split(",") if x]


def _scenarios(text: str) -> list[str]:
    names = _csv(str)(text)
    unknown = [n for n in names if n not in CATALOGUE]
    if unknown:
        raise argparse.ArgumentTypeError(f"unknown scenario {', '.join(unknown)}")
    return names


def _systems(text: str) -> list[str]:
    names = _csv(str)(text)
    unknown = [n for n in names if n not in SYSTEMS]
    if unknown:
        raise argparse.ArgumentTypeError(f"unknown system {', '.join(unknown)}")
    return names


class _Formatter(argparse.RawDescriptionHelpFormatter):
    """Each option's default after its help (lists as typed), the scenario table as written."""

    def _get_help_string(self, action: argparse.Action) -> str:
        default = action.default
        if not action.option_strings or default in (None, False, argparse.SUPPRESS):
            return action.help or ""
        shown = ",".join(map(str, default)) if isinstance(default, list) else f"{default:g}"
        return f"{action.help} (default {shown})"


def parser() -> argparse.ArgumentParser:
    width = max(len(name) for name in CATALOGUE)
    table = "\n".join(
        f"  {name:<{width}}  {about}" for name, (about, _run, _default) in CATALOGUE.items()
    )
    p = argparse.ArgumentParser(
        prog="python -m bench",
        formatter_class=_Formatter,
        description="Side-by-side benchmarks: ours against the frameworks people pick "
        "instead.\nWrites bench/results.json and bench/RESULTS.md.",
        epilog=f"scenarios (--only):\n{table}",
    )
    add = p.add_argument
    add(
        "command",
        choices=["run", "render"],
        help="run: measure, then write both files; render: RESULTS.md again from results.json",
    )
    add("--runs", type=int, default=3, help="sessions per scenario (and system)")
    add(
        "--events",
        type=int,
        default=10_000,
        help="events per session of flat, live, tuned, processes, profile, e2e and scaling",
    )
    add("--rate", type=float, default=500.0, help="events/s of a paced run")
    add("--paced-s", type=float, default=10.0, help="seconds of a paced run")
    add(
        "--systems",
        type=_systems,
        default=list(SYSTEMS),
        help="comma-separated systems that flat and paced compare (every peer but asyncio needs "
        "pip install -e '.[bench]'; a missing one is skipped)",
    )
    add(
        "--only",
        type=_scenarios,
        default=DEFAULT,
        help="comma-separated scenarios to run (below); the default is all but the opt-in ones",
    )
    add(
        "--process-counts",
        type=_csv(int),
        default=[1, 2, 4],
        help="comma-separated numbers of 'delivery run' processes for 'processes' (of 'delivery "
        "worker' processes, beside one relay, for 'scaling')",
    )
    add(
        "--fanouts",
        type=_csv(int),
        default=[1, 10, 100],
        help="comma-separated numbers of subscriptions for 'fanout'",
    )
    add(
        "--fanout-deliveries",
        type=int,
        default=20_000,
        help="deliveries per 'fanout' session (events: this / subscriptions, at least 100)",
    )
    add("--relay-rows", type=int, default=50_000, help="outbox rows the relay drains in 'relay'")
    add(
        "--backlog",
        type=int,
        default=200_000,
        help="events in the outbox before 'backlog' starts ours",
    )
    add(
        "--backlog-timeout-s",
        type=float,
        default=2400.0,
        help="seconds after which 'backlog' stops, drained or not",
    )
    add(
        "--e2e-subscriptions",
        type=int,
        default=1,
        help="subscriptions every event goes to in 'e2e'",
    )
    add("--e2e-processes", type=int, default=1, help="'delivery run' processes in 'e2e'")
    add(
        "--e2e-rate",
        type=float,
        default=0.0,
        help="events/s the 'e2e' producer publishes at, in batches of 100 (0: flat out)",
    )
    add("--failure-events", type=int, default=2000, help="events per session of 'failures'")
    add(
        "--max-busy",
        type=float,
        default=0.25,
        help="before each session, wait until the machine is less busy than this without us (0-1)",
    )
    add(
        "--max-wait-s",
        type=float,
        default=120.0,
        help="longest wait for --max-busy; the session then starts anyway",
    )
    add(
        "--merge",
        action="store_true",
        help="keep other scenarios' results from bench/results.json",
    )
    add(
        "--own-postgres",
        action="store_true",
        help="start a throwaway PostgreSQL with stock settings (fsync and autovacuum on) instead "
        "of DELIVERY_DATABASE_URL",
    )
    add(
        "--quick",
        action="store_true",
        help="a smoke: 300 events (failures too), 1 run, 2 s paced, 1,000 fan-out deliveries, "
        "2,000 relay rows and backlog events, no wait for a quiet machine (no figures worth "
        "quoting)",
    )
    return p


def main() -> None:
    args = parser().parse_args()
    if args.quick:
        args.runs, args.events, args.paced_s = 1, 300, 2.0
        args.fanout_deliveries, args.relay_rows, args.backlog = 1000, 2000, 2000
        args.failure_events = 300
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
