"""Ordered versus unordered (issue #15): the same events over many accounts, delivered to one
``*`` subscription, once unordered and once ``--ordered``, on one ``delivery run`` with the same
settings and the same receiver. Each session is flat out: the events are staged in the outbox
while the process is stopped (SIGSTOP) and the clock runs from SIGCONT to the last arrival.
The modes alternate within each of ``--runs`` rounds, so a busier stretch of this shared
machine falls on both. The ratio ordered / unordered of the medians is what the issue asks for
(goal >= 0.70).

CPU per event: the ``delivery run`` process (its tree), and apart from it the CPU of its
PostgreSQL backends (the server runs on this machine), where the ordered path does most of its
extra work (the triggers of migration 0022).

Every ordered session is checked, not trusted: per account, the first arrivals of its events
came in the order they were published (their ``sequence`` order), and every event arrived.

    python -m bench.ordered                          # 10,000 events, 1,000 accounts, 3 runs
    python -m bench.ordered --events 2000 --runs 1

Services: DELIVERY_DATABASE_URL / DELIVERY_AMQP_URL (each session in its own database and queue
names, removed afterwards). Prints one JSON object; ``--out FILE`` also writes it there.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Any

from bench.facts import code_under_test
from bench.measure import cpu_between, cpu_s, loadavg, peak_rss, snapshot
from bench.ours import Ours
from bench.receiver import Arrived
from bench.sessions import MB, say, wait_for_quiet, with_system
from bench.system import System
from bench.workload import make_events
from delivery.outbox import publish_many

MODES = ("unordered", "ordered")

# Where a delivery's time went, from its row: attempt started -> outcome committed, and for an
# ordered one the hand-off from its predecessor's committed outcome to its own attempt (the
# release by the trigger, the scheduler's wake-up and claim). Milliseconds, p50 and p90.
_STAGES = """
WITH d AS (
    SELECT o.account_id, d.first_attempt_at, d.delivered_at,
           lag(d.delivered_at) OVER (PARTITION BY o.account_id ORDER BY o.sequence) AS prev_done
    FROM delivery.deliveries d JOIN delivery.outbox o USING (event_id)
    WHERE d.event_id = ANY($1::text[]) AND d.state = 'delivered'
), ms AS (
    SELECT extract(epoch FROM delivered_at - first_attempt_at) * 1000 AS attempt_ms,
           extract(epoch FROM first_attempt_at - prev_done) * 1000 AS handoff_ms
    FROM d
)
SELECT percentile_cont(0.5) WITHIN GROUP (ORDER BY attempt_ms) AS attempt_p50_ms,
       percentile_cont(0.9) WITHIN GROUP (ORDER BY attempt_ms) AS attempt_p90_ms,
       percentile_cont(0.5) WITHIN GROUP (ORDER BY handoff_ms) AS handoff_p50_ms,
       percentile_cont(0.9) WITHIN GROUP (ORDER BY handoff_ms) AS handoff_p90_ms
FROM ms
"""


class OrderedOrNot(Ours):
    """Ours with its one ``*`` subscription ordered or not."""

    def __init__(self, *args: Any, ordered: bool, **kw: Any) -> None:
        super().__init__(*args, **kw)
        self.ordered = ordered

    async def prepare_database(self) -> None:
        assert self.conn is not None
        await super().prepare_database()
        await self.conn.execute("UPDATE delivery.subscriptions SET ordered = $1", self.ordered)

    def describe(self) -> str:
        return f"ours, {'ordered' if self.ordered else 'unordered'}"


# The system's backends, not the bench's own (it polls for the recorded count meanwhile).
_BACKENDS = """
SELECT pid FROM pg_stat_activity WHERE datname = current_database() AND pid <> pg_backend_pid()
"""


async def backends_cpu_s(system: System) -> dict[int, float]:
    """CPU seconds so far of each PostgreSQL backend connected to the system's database (the
    server runs on this machine): the ordered path's work is mostly in its triggers there."""
    assert system.conn is not None
    return {r["pid"]: cpu_s(r["pid"]) for r in await system.conn.fetch(_BACKENDS)}


def out_of_order(arrivals: list[Arrived], account_of: dict[str, tuple[str, int]]) -> int:
    """Accounts whose events' first arrivals did not come in publish (sequence) order."""
    first: dict[str, float] = {}
    for a in arrivals:
        if a.webhook_id in account_of:
            first[a.webhook_id] = min(a.at, first.get(a.webhook_id, a.at))
    by_account: dict[str, list[tuple[float, int]]] = {}
    for event_id, at in first.items():
        acc, position = account_of[event_id]
        by_account.setdefault(acc, []).append((at, position))
    bad = 0
    for seen in by_account.values():
        positions = [position for _at, position in sorted(seen)]
        bad += positions != sorted(positions)
    return bad


async def session(db: str, amqp: str, mode: str, args: argparse.Namespace) -> dict[str, Any]:
    async def body(system: System) -> dict[str, Any]:
        assert isinstance(system, OrderedOrNot) and system.conn is not None
        raw = [
            {**e, "id": f"evt_{system.tag}_{i:07d}"}
            for i, e in enumerate(make_events(args.events, accounts=args.accounts))
        ]
        account_of = {str(e["id"]): (str(e["account_id"]), i) for i, e in enumerate(raw)}
        await system.start_processes(1)
        # Warm-up: the process is up and delivering (its first batch loads the subscriptions).
        await publish_many(
            system.conn, [{**raw[0], "id": f"evt_{system.tag}_warm", "account_id": "acc_warm"}]
        )
        await system.receiver.wait(1, 60, "warm-up")
        await system.wait_recorded(1, 30)
        await system.receiver.reset()
        await system.mark_recorded()
        system.pause()
        for start in range(0, len(raw), 1000):
            await publish_many(system.conn, raw[start : start + 1000])
        load = loadavg()
        before = snapshot(system.roots)
        db_before = await backends_cpu_s(system)
        started = time.time()
        system.resume()
        stats = await system.receiver.wait(args.events, 120 + args.events / 20, f"{mode}")
        recorded = await system.wait_recorded(args.events, 60)
        after = snapshot(system.roots)
        db_after = await backends_cpu_s(system)
        db_cpu = sum(max(0.0, t - db_before.get(pid, 0.0)) for pid, t in db_after.items())
        rss = peak_rss(system.roots)
        arrivals = await system.receiver.arrivals()
        wall = stats["last_at"] - started
        arrived = {a.webhook_id for a in arrivals} & account_of.keys()
        stages = await system.conn.fetchrow(_STAGES, list(account_of))
        assert stages is not None
        return {
            "mode": mode,
            "events": args.events,
            "accounts": args.accounts,
            "wall_s": round(wall, 3),
            "events_per_s": round(args.events / wall, 1),
            # The worker process's CPU (its tree) from SIGCONT to the last outcome recorded.
            "cpu_ms_per_event": round(cpu_between(before, after) * 1000 / args.events, 3),
            # Its PostgreSQL backends' CPU over the same span.
            "db_cpu_ms_per_event": round(db_cpu * 1000 / args.events, 3),
            "rss_max_mb": round(rss.max_bytes / MB, 1),
            "arrived": len(arrived),
            "recorded": recorded,
            "duplicates": len(arrivals) - len({a.webhook_id for a in arrivals}),
            "bad_signatures": stats["bad_signatures"],
            "accounts_out_of_order": out_of_order(arrivals, account_of),
            # The hand-off (predecessor's outcome -> this attempt) only means something ordered.
            "stages_ms": {
                k: round(v, 1)
                for k, v in stages.items()
                if v is not None and (mode == "ordered" or not k.startswith("handoff"))
            },
            "load_at_start": load,
        }

    system = OrderedOrNot(db, amqp, ordered=mode == "ordered")
    result: dict[str, Any] = await with_system(system, {"start": False}, body)
    return result


async def main_async(args: argparse.Namespace) -> dict[str, Any]:
    db = os.environ["DELIVERY_DATABASE_URL"]
    amqp = os.environ["DELIVERY_AMQP_URL"]
    runs: dict[str, list[dict[str, Any]]] = {mode: [] for mode in args.modes}
    load_at_start = loadavg()
    for i in range(args.runs):
        for mode in args.modes:
            quiet = (
                await wait_for_quiet(args.max_busy, 30)
                if args.max_busy < 1
                else {"load": loadavg()[0], "busy": None, "waited_s": 0}  # never waits: no sample
            )
            result = await session(db, amqp, mode, args)
            result["quiet"] = quiet
            runs[mode].append(result)
            say(
                f"run {i + 1}/{args.runs} {mode}: {result['events_per_s']:,.0f} ev/s, "
                f"{result['cpu_ms_per_event']} ms CPU/event, "
                f"{result['db_cpu_ms_per_event']} ms database CPU/event"
            )
    medians = {
        mode: {
            key: statistics.median(r[key] for r in results)
            for key in ("events_per_s", "cpu_ms_per_event", "db_cpu_ms_per_event", "wall_s")
        }
        for mode, results in runs.items()
    }
    out: dict[str, Any] = {
        "code": code_under_test(),
        "load_at_start": load_at_start,
        "load_at_end": loadavg(),
        "median": medians,
    }
    if set(MODES) <= medians.keys():
        out["ratio_ordered_to_unordered"] = round(
            medians["ordered"]["events_per_s"] / medians["unordered"]["events_per_s"], 3
        )
    out["runs"] = runs
    return out


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m bench.ordered",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--events", type=int, default=10_000)
    p.add_argument("--accounts", type=int, default=1_000)
    p.add_argument("--runs", type=int, default=3)
    p.add_argument(
        "--modes",
        type=lambda t: [m for m in t.split(",") if m],
        default=list(MODES),
        help="comma-separated, of: " + ", ".join(MODES),
    )
    p.add_argument(
        "--max-busy",
        type=float,
        default=0.9,
        help="before each session, wait (30 s at most) until the machine is less busy (0-1); "
        "1: never wait",
    )
    p.add_argument("--out", type=Path)
    return p


def main() -> None:
    args = parser().parse_args()
    out = asyncio.run(main_async(args))
    text = json.dumps(out, indent=2)
    if args.out is not None:
        args.out.write_text(text + "\n")
    print(text, file=sys.stdout)


if __name__ == "__main__":
    main()
