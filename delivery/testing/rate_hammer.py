"""A process that takes from one tenant's ingest rate as fast as it can, for the test that
proves the limit is shared across processes (``python -m delivery.testing.rate_hammer URL
TENANT SECONDS``). It prints ``ready``, waits for a line on standard input (so every hammer
starts together), takes for SECONDS with batches of 1 to 3 events, and prints one JSON line:
events allowed and refused, and when its first request left and its last answer came back
(``time.time()``: one clock for every process on the machine)."""

from __future__ import annotations

import asyncio
import sys
import time

import asyncpg
import orjson

from delivery.store.quotas import take


async def hammer(url: str, tenant_id: str, seconds: float) -> dict[str, float]:
    conn = await asyncpg.connect(url)
    try:
        print("ready", flush=True)
        await asyncio.to_thread(sys.stdin.readline)
        allowed = refused = requests = 0
        started = time.time()
        while time.time() - started < seconds:
            events = 1 + requests % 3
            requests += 1
            if (await take(conn, tenant_id, events)).allowed:
                allowed += events
            else:
                refused += events
        return {"allowed": allowed, "refused": refused, "start": started, "end": time.time()}
    finally:
        await conn.close()


def main() -> None:
    url, tenant_id, seconds = sys.argv[1], sys.argv[2], float(sys.argv[3])
    result = asyncio.run(hammer(url, tenant_id, seconds))
    sys.stdout.write(orjson.dumps(result).decode() + "\n")


if __name__ == "__main__":
    main()
