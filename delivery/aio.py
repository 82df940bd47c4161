"""Small helpers shared by the long-running loops: waiting on events, backing off."""

from __future__ import annotations

import asyncio
import contextlib


async def wait_any(*events: asyncio.Event, timeout_s: float) -> None:
    """Return when any event is set or ``timeout_s`` passes, whichever is first."""
    if any(e.is_set() for e in events):
        return
    with contextlib.suppress(TimeoutError):
        async with asyncio.timeout(timeout_s), asyncio.TaskGroup() as tg:
            waiters = [tg.create_task(e.wait()) for e in events]
            done = asyncio.Event()
            for waiter in waiters:
                waiter.add_done_callback(lambda _t: done.set())
            await done.wait()
            for waiter in waiters:
                waiter.cancel()


def backoff_s(failures: int, *, base_s: float = 0.1, max_s: float = 5.0) -> float:
    """The wait after ``failures`` failures in a row: ``base_s`` doubled per failure
    (``2 * base_s`` after the first), never more than ``max_s``. Pure; any count is safe (the
    exponent stops growing long before a float would overflow)."""
    return min(base_s * 2.0 ** min(failures, 64), max_s)
