"""What a PostgreSQL failover costs in committed events: a primary and its streaming standby
(throwaway, ``delivery.testing.postgres_standby``), producers committing outbox batches of 10
as fast as they can, then the primary dies and the standby is promoted. Every event id whose
COMMIT returned to its producer is looked for on the promoted server.

    python -m bench.failover_loss             # the four runs in runbooks/database-failover.md
    python -m bench.failover_loss --lag-s 1 --sync

``--lag-s``: before the crash the primary's walsender is stopped (SIGSTOP) that long, as a slow
or cut link to the standby would hold WAL back, and the whole primary is then killed (-9);
without it the primary stops with ``-m immediate`` on a healthy loopback link.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import signal
import time

import asyncpg

from delivery.outbox import publish_many
from delivery.store.migrations import migrate
from delivery.testing.factories import trade
from delivery.testing.postgres_standby import LocalPostgresPair
from delivery.testing.processes import _descendants, _processes
from delivery.testing.services import create_database

BATCH = 10


async def _produce(
    url: str, producer: int, committed: list[tuple[float, str]], stop: asyncio.Event
) -> None:
    conn = await asyncpg.connect(url)
    i = 0
    while not stop.is_set():
        ids = [f"p{producer}_{i + k}" for k in range(BATCH)]
        events = [trade(i + k, account=f"acc_{producer}", id=e) for k, e in enumerate(ids)]
        try:
            async with conn.transaction():
                await publish_many(conn, events)
        except Exception:
            return  # the primary is gone: what committed is recorded
        now = time.monotonic()
        committed.extend((now, e) for e in ids)
        i += BATCH


def _walsenders(pair: LocalPostgresPair) -> list[int]:
    procs = _processes()
    ours = _descendants({pair.primary.postmaster_pid() or -1}, procs)
    return [p.pid for p in procs if p.pid in ours and "walsender" in p.cmdline]


async def run(*, sync: bool, producers: int, seconds: float, lag_s: float) -> dict[str, float]:
    pair = LocalPostgresPair(synchronous=sync)
    try:
        await asyncio.to_thread(pair.start)
        url = await create_database(pair.url(), "delivery")
        await migrate(url)
        committed: list[tuple[float, str]] = []
        stop = asyncio.Event()
        tasks = [asyncio.create_task(_produce(url, p, committed, stop)) for p in range(producers)]
        await asyncio.sleep(seconds)
        if lag_s:
            for pid in _walsenders(pair):
                os.kill(pid, signal.SIGSTOP)
            await asyncio.sleep(lag_s)
        crashed = time.monotonic()
        await asyncio.to_thread(
            pair.primary.kill if lag_s else lambda: pair.primary.stop("immediate")
        )
        stop.set()
        await asyncio.gather(*tasks)
        await asyncio.to_thread(pair.standby.promote)
        conn = await asyncpg.connect(pair.standby.url.rsplit("/", 1)[0] + "/delivery")
        try:
            stored = {r[0] for r in await conn.fetch("SELECT event_id FROM delivery.outbox")}
        finally:
            await conn.close()
        lost = [t for t, e in committed if e not in stored]
        return {
            "committed": len(committed),
            "per_s": len(committed) / (seconds + lag_s),
            "lost": len(lost),
            "window_s": crashed - min(lost) if lost else 0.0,
        }
    finally:
        await asyncio.to_thread(pair.close)


async def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument(
        "--sync", action="store_true", help="synchronous replication (the default is asynchronous)"
    )
    ap.add_argument(
        "--lag-s", type=float, help="hold WAL back from the standby this long before the crash"
    )
    ap.add_argument(
        "--producers", type=int, default=4, help="concurrent producers committing batches"
    )
    ap.add_argument(
        "--seconds", type=float, default=5.0, help="how long they produce before the crash"
    )
    args = ap.parse_args()
    runs = (
        [(args.sync, args.lag_s)]
        if args.lag_s is not None
        else [(False, 0.0), (False, 0.5), (False, 2.0), (True, 2.0)]
    )
    for sync, lag_s in runs:
        r = await run(sync=sync, producers=args.producers, seconds=args.seconds, lag_s=lag_s)
        print(
            f"{'synchronous ' if sync else 'asynchronous'} WAL held back {lag_s:.1f} s: "
            f"{r['committed']:.0f} committed ({r['per_s']:.0f}/s), {r['lost']:.0f} lost, "
            f"loss window {r['window_s'] * 1000:.0f} ms before the crash"
        )


if __name__ == "__main__":
    asyncio.run(main())
