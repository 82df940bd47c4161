"""The platform process for tests: in this event loop (``running``, ``run_until_idle``) or as
``python -m delivery`` subprocesses (``start_worker``) on a test's isolated services.

These need ``workers.process`` (the process composition, above the library), so they live
here rather than in ``delivery.testing``, which the library's layers may not reach past. Test
modules import helpers from here and from ``delivery.testing``, never from each other.
"""

from __future__ import annotations

import asyncio
import contextlib
import signal
import subprocess
import sys
from collections.abc import AsyncIterator

from delivery.ops.health import Health
from delivery.settings import Settings
from delivery.store.pool import create_pool
from delivery.testing.env import environment_without_settings
from delivery.testing.waits import wait_until
from delivery.worker.deliverer import Deliverer
from delivery.worker.dispatch import Dispatcher
from delivery.worker.scheduler import Scheduler
from delivery.worker.sender import Sender
from workers.process import run_process


@contextlib.asynccontextmanager
async def running(
    settings: Settings, *, relay: bool = True, worker: bool = True
) -> AsyncIterator[Health]:
    """Run the pipeline in this event loop until the block exits (then drain and stop)."""
    stop = asyncio.Event()
    holder: list[Health] = []
    task = asyncio.create_task(
        run_process(
            settings,
            relay=relay,
            worker=worker,
            stop=stop,
            ready=holder.append,
            handle_signals=False,
        )
    )
    try:
        await wait_until(
            lambda: task.done() or (holder and holder[0].ready), timeout_s=30, what="ready"
        )
        if task.done():
            task.result()  # raise the start-up error
        yield holder[0]
    finally:
        stop.set()
        await asyncio.wait_for(task, 30)


async def run_until_idle(
    settings: Settings, *, relay: bool = True, worker: bool = True, timeout_s: float = 60.0
) -> None:
    """Run the pipeline in this event loop until no work is left (burst mode: the rule is in
    ``delivery.worker.burst``), then drain and return; ``TimeoutError`` naming what was left
    if that takes longer than ``timeout_s``. Afterwards, what arrived is all that will."""
    await run_process(
        settings,
        relay=relay,
        worker=worker,
        handle_signals=False,
        until_idle=True,
        idle_timeout_s=timeout_s,
    )


def settings_env(settings: Settings, **extra: str) -> dict[str, str]:
    """The environment a `delivery` subprocess needs to act on this test's isolated services."""
    env = environment_without_settings()
    env.update(
        DELIVERY_DATABASE_URL=settings.database_url,
        DELIVERY_AMQP_URL=settings.amqp_url,
        DELIVERY_AMQP_PREFIX=settings.amqp_prefix,
        DELIVERY_ADMIN_PORT="0",
        DELIVERY_RELAY_POLL_INTERVAL_S=str(settings.relay_poll_interval_s),
        DELIVERY_SCHEDULER_POLL_INTERVAL_S=str(settings.scheduler_poll_interval_s),
        DELIVERY_RETRY_SCHEDULE=",".join(f"{int(s * 1000)}ms" for s in settings.retry_schedule_s),
        DELIVERY_DELIVERY_LEASE_S=str(settings.delivery_lease_s),
        DELIVERY_HTTP_TIMEOUT_S=str(settings.http_timeout_s),
        DELIVERY_SHUTDOWN_TIMEOUT_S=str(settings.shutdown_timeout_s),
        DELIVERY_LOG_FORMAT="json",
        DELIVERY_ALLOW_PRIVATE_TARGETS="true",  # the tests' subscribers listen on 127.0.0.1
    )
    env.update(extra)
    return env


def cli(settings: Settings, *args: str, **env: str) -> subprocess.CompletedProcess[str]:
    """``python -m delivery ARGS`` on this test's services, to completion (60 s at most)."""
    return subprocess.run(
        [sys.executable, "-m", "delivery", *args],
        capture_output=True,
        text=True,
        env=settings_env(settings, **env),
        timeout=60,
        check=False,
    )


async def start_worker(
    settings: Settings, command: str = "worker", **env: str
) -> asyncio.subprocess.Process:
    """``python -m delivery <command>`` on this test's services (stderr piped, for its log)."""
    return await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "delivery",
        command,
        env=settings_env(settings, **env),
        stdout=asyncio.subprocess.DEVNULL,
        stderr=asyncio.subprocess.PIPE,
    )


async def stop_gracefully(proc: asyncio.subprocess.Process, timeout_s: float = 20) -> int:
    """SIGTERM, and the exit code once it has drained."""
    proc.send_signal(signal.SIGTERM)
    return await asyncio.wait_for(proc.wait(), timeout_s)


async def read_until(stream: asyncio.StreamReader, marker: bytes) -> None:
    """Read lines until one contains ``marker``; ``AssertionError`` if the stream ends first."""
    while True:
        line = await stream.readline()
        if not line:
            raise AssertionError(f"stream ended before {marker!r}")
        if marker in line:
            return


@contextlib.asynccontextmanager
async def hand_driven_dispatcher(settings: Settings) -> AsyncIterator[tuple[Deliverer, Dispatcher]]:
    """A dispatcher wired to its deliverer and scheduler as a worker wires them, none of them
    running: the test drives dispatch itself (``dispatch_batch``, or ``run``)."""
    pool = await create_pool(settings.database_url, min_size=1, max_size=4)
    try:
        async with Sender(
            max_connections=8,
            connect_timeout_s=1,
            timeout_s=1,
            excerpt_bytes=100,
            allow_private_targets=True,
        ) as sender:
            deliverer = Deliverer(settings, pool, sender)
            health = Health()
            scheduler = Scheduler(settings, pool, deliverer, health)
            yield deliverer, Dispatcher(settings, pool, deliverer, scheduler, health)
    finally:
        await pool.close()


async def tenant_with_key(
    settings: Settings,
    name: str,
    scopes: str = "publish,manage,read",
    *,
    max_events_per_s: int | None = None,
) -> tuple[str, str]:
    """A new tenant on this test's database and an API key for it: (tenant id, key)."""
    import asyncpg

    from delivery.store import keys, tenants

    conn = await asyncpg.connect(settings.database_url)
    try:
        tenant = await tenants.add(conn, name, max_events_per_s=max_events_per_s)
        _, key = await keys.create(conn, tenant.id, keys.parse_scopes(scopes))
    finally:
        await conn.close()
    return tenant.id, key


async def key_for(settings: Settings, tenant_id: str, scopes: str) -> tuple[str, str]:
    """Another key of an existing tenant: (key id, key)."""
    import asyncpg

    from delivery.store import keys

    conn = await asyncpg.connect(settings.database_url)
    try:
        listed, key = await keys.create(conn, tenant_id, keys.parse_scopes(scopes))
    finally:
        await conn.close()
    return listed.id, key
