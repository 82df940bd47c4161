"""The start and stop every long-running process shares (``delivery run``/``relay``/``worker``
in ``workers.process``, ``delivery api`` in ``delivery.api.server``).

Start: the database pool, waited for with backoff while PostgreSQL does not answer. Stop: the
first SIGTERM/SIGINT marks the process not-ready and sets ``stop`` (a graceful drain within
``DELIVERY_SHUTDOWN_TIMEOUT_S``); a second one sets ``force`` (skip the rest of the drain, still
handing back what can be handed back).
"""

from __future__ import annotations

import asyncio
import signal
from collections.abc import Awaitable, Callable

import asyncpg
import structlog

from delivery.aio import backoff_s, wait_any
from delivery.errors import StoppedBeforeConnected
from delivery.ops.health import Health
from delivery.settings import Settings
from delivery.store.pool import create_pool, is_connection_error

log = structlog.get_logger("delivery.lifecycle")

_POOL_BACKOFF_BASE_S = 0.5
_POOL_BACKOFF_MAX_S = 10.0
_SIGNALS = (signal.SIGTERM, signal.SIGINT)


async def open_pool(settings: Settings, stop: asyncio.Event) -> asyncpg.Pool:
    """The pool, once the database answers. A process started while PostgreSQL is down or its
    link is cut waits for it with backoff, as it does for the broker, instead of exiting; a
    refusal that no retry can fix (bad password, no such database) still ends it at once.
    ``StoppedBeforeConnected`` when ``stop`` is set first."""
    failures = 0
    while True:
        try:
            return await create_pool(
                settings.database_url,
                min_size=settings.db_pool_min,
                max_size=settings.db_pool_max,
            )
        except Exception as exc:
            if not is_connection_error(exc):
                raise
            failures += 1
            delay = backoff_s(failures, base_s=_POOL_BACKOFF_BASE_S, max_s=_POOL_BACKOFF_MAX_S)
            log.warning("database_unreachable", error=repr(exc)[:300], retry_in_s=delay)
            await wait_any(stop, timeout_s=delay)
            if stop.is_set():
                raise StoppedBeforeConnected("postgresql") from exc


def install_signals(
    stop: asyncio.Event, force: asyncio.Event, health: Health
) -> Callable[[], None]:
    """SIGTERM/SIGINT: the first marks ``health`` draining and sets ``stop``, a second sets
    ``force``. Returns the function that puts the default handlers back."""
    loop = asyncio.get_running_loop()

    def on_signal(signame: str) -> None:
        if not stop.is_set():
            log.info("shutdown_started", signal=signame)
            health.draining = True
            stop.set()
        else:
            log.warning("shutdown_forced", signal=signame)
            force.set()

    for sig in _SIGNALS:
        loop.add_signal_handler(sig, on_signal, sig.name)

    def remove() -> None:
        for sig in _SIGNALS:
            loop.remove_signal_handler(sig)

    return remove


async def unless_forced(work: Awaitable[None], force: asyncio.Event) -> bool:
    """Await ``work`` (a drain) unless ``force`` is set first, which cancels it. True when it
    ran to its end."""
    async with asyncio.TaskGroup() as tg:
        task = tg.create_task(_awaited(work))
        forced = tg.create_task(force.wait())
        await asyncio.wait((task, forced), return_when=asyncio.FIRST_COMPLETED)
        forced.cancel()
        if not task.done():
            task.cancel()
    return not task.cancelled()


async def _awaited(work: Awaitable[None]) -> None:
    await work
