"""Small asyncio helpers shared by the long-running loops."""

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
