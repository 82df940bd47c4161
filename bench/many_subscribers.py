"""Many subscribers (issue #17, item 1): the same events over many accounts, delivered to

    a    one ``*`` subscription;
    b    one subscription per account (``--accounts`` of them);
    c    those, plus ``--others`` subscriptions for accounts that publish nothing,

each flat out (staged while the processes are stopped, timed from SIGCONT to the last arrival),
``--runs`` times, on one ``delivery run``. Every subscription posts to the same receiver path, so
each layout delivers exactly ``--events`` webhooks. The ratios b/a and c/a are what the issue
asks for (target >= 0.7).

    python -m bench.many_subscribers                      # 10,000 events, 1,000 accounts, 3 runs
    python -m bench.many_subscribers --events 2000 --runs 1

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
from bench.measure import loadavg
from bench.ours import Ours
from bench.sessions import say, wait_for_quiet, with_system
from bench.system import System
from bench.workload import make_events
from delivery.store import subscriptions

LAYOUTS = ("a", "b", "c")
# Copies one added subscription per account: ten thousand ``add`` calls would take longer than
# the measurement (and only the rows matter here).
_COPY = """
INSERT INTO delivery.subscriptions
    (id, tenant_id, url, event_patterns, account_id, state, secret, signing)
SELECT 'sub_ms_' || a, tenant_id, url, event_patterns, a, state, secret, signing
FROM delivery.subscriptions, unnest($2::text[]) AS a
WHERE id = $1
"""


def account(i: int) -> str:
    return f"acc_{i:05d}"


class ManySubscribers(Ours):
    """Ours with one of the layouts' subscriptions, all posting to the receiver's ``/s0``."""

    def __init__(self, *args: Any, layout: str, accounts: int, others: int, **kw: Any) -> None:
        super().__init__(*args, **kw)
        self.layout = layout
        self.accounts = accounts
        self.others = others

    async def prepare_database(self) -> None:
        assert self.conn is not None
        await super().prepare_database()  # one `*` subscription: layout a, and the warm-up's
        if self.layout == "a":
            return
        (template,) = await subscriptions.list_all(self.conn)
        await self.conn.execute("UPDATE delivery.subscriptions SET account_id = 'acc_warm'")
        names = [account(i) for i in range(self.accounts)]
        if self.layout == "c":
            names += [f"acc_other_{i:05d}" for i in range(self.others)]
        await self.conn.execute(_COPY, template.id, names)

    def describe(self) -> str:
        return f"ours, layout {self.layout}"


async def session(db: str, amqp: str, layout: str, args: argparse.Namespace) -> dict[str, Any]:
    async def body(system: System) -> dict[str, Any]:
        assert isinstance(system, ManySubscribers) and system.conn is not None
        from delivery.outbox import publish_many

        raw = [
            {**e, "id": f"evt_{system.tag}_{i:07d}"}
            for i, e in enumerate(make_events(args.events, accounts=args.accounts))
        ]
        await system.start_processes(1)
        # Warm-up: the process is up and delivering (its first batch loads the subscriptions).
        await publish_many(
            system.conn, [{**raw[0], "id": f"evt_{system.tag}_warm", "account_id": "acc_warm"}]
        )
        await system.receiver.wait(1, 60, "warm-up")
        await system.receiver.reset()
        system.pause()
        for start in range(0, len(raw), 1000):
            await publish_many(system.conn, raw[start : start + 1000])
        load = loadavg()
        started = time.time()
        system.resume()
        stats = await system.receiver.wait(args.events, 120 + args.events / 50, f"layout {layout}")
        wall = stats["last_at"] - started
        return {
            "layout": layout,
            "subscriptions": await system.conn.fetchval(
                "SELECT count(*) FROM delivery.subscriptions"
            ),
            "events": args.events,
            "wall_s": round(wall, 3),
            "events_per_s": round(args.events / wall, 1),
            "load_at_start": load,
        }

    system = ManySubscribers(db, amqp, layout=layout, accounts=args.accounts, others=args.others)
    result: dict[str, Any] = await with_system(system, {"start": False}, body)
    return result


async def main_async(args: argparse.Namespace) -> dict[str, Any]:
    db = os.environ["DELIVERY_DATABASE_URL"]
    amqp = os.environ["DELIVERY_AMQP_URL"]
    runs: dict[str, list[dict[str, Any]]] = {layout: [] for layout in args.layouts}
    for i in range(args.runs):
        for layout in args.layouts:
            quiet = await wait_for_quiet(args.max_busy, 30)
            result = await session(db, amqp, layout, args)
            result["quiet"] = quiet
            runs[layout].append(result)
            say(f"run {i + 1}/{args.runs} layout {layout}: {result['events_per_s']:,.0f} ev/s")
    medians = {
        layout: statistics.median(r["events_per_s"] for r in results)
        for layout, results in runs.items()
    }
    out: dict[str, Any] = {
        "code": code_under_test(),
        "load_at_end": loadavg(),
        "median_events_per_s": medians,
        "runs": runs,
    }
    if "a" in medians:
        out["ratio_to_a"] = {k: round(v / medians["a"], 3) for k, v in medians.items() if k != "a"}
    return out


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m bench.many_subscribers",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--events", type=int, default=10_000)
    p.add_argument("--accounts", type=int, default=1_000)
    p.add_argument("--others", type=int, default=9_000, help="layout c's non-matching ones")
    p.add_argument("--runs", type=int, default=3)
    p.add_argument("--layouts", type=lambda t: t.split(","), default=list(LAYOUTS))
    p.add_argument("--max-busy", type=float, default=1.0, help="wait (30 s at most) below it")
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
