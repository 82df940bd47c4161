"""Fixtures for the integration layers: real PostgreSQL and RabbitMQ, isolated per test.

Services are found in this order: DELIVERY_DATABASE_URL / DELIVERY_AMQP_URL; testcontainers
when a Docker engine answers; otherwise throwaway local instances from the installed binaries.
Each test gets its own database (cloned from a migrated template) and its own broker names
(a unique ``amqp_prefix``), so tests run in any order and in parallel.
Locally a missing service skips the integration tests; under CI=true it fails them.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import secrets
import sys
import time
from collections.abc import AsyncIterator, Callable, Iterator

import aio_pika
import pytest
import pytest_asyncio

from delivery.broker.topology import Names, delete
from delivery.ops.health import Health
from delivery.settings import Settings
from delivery.store.migrations import migrate
from delivery.testing.services import Services, create_database, drop_database, provision_services
from workers.process import run_process

IN_CI = os.environ.get("CI", "").lower() == "true"


@pytest.fixture(scope="session")
def services() -> Iterator[Services]:
    try:
        with provision_services(
            progress=lambda line: print(f"[services] {line}", file=sys.stderr)
        ) as found:
            yield found
            return
    except Exception as exc:
        if IN_CI:
            pytest.fail(f"integration services unavailable under CI: {exc}")
        pytest.skip(f"integration services unavailable: {exc}")


@pytest_asyncio.fixture(scope="session", loop_scope="session")
async def template_db(services: Services) -> AsyncIterator[str]:
    name = f"dlv_tmpl_{secrets.token_hex(4)}"
    url = await create_database(services.database_url, name)
    await migrate(url)
    yield name
    await drop_database(services.database_url, name)


@pytest_asyncio.fixture(loop_scope="session")
async def db_url(services: Services, template_db: str) -> AsyncIterator[str]:
    name = f"dlv_t_{secrets.token_hex(5)}"
    url = await create_database(services.database_url, name, template=template_db)
    yield url
    await drop_database(services.database_url, name)


@pytest_asyncio.fixture(loop_scope="session")
async def settings(services: Services, db_url: str) -> AsyncIterator[Settings]:
    prefix = f"t{secrets.token_hex(5)}"
    yield Settings(
        database_url=db_url,
        amqp_url=services.amqp_url,
        amqp_prefix=prefix,
        admin_port=0,
        relay_poll_interval_s=0.2,
        scheduler_poll_interval_s=0.2,
        shutdown_timeout_s=5,
        retry_schedule_s=(0.2, 0.4, 0.8),
        http_timeout_s=5,
        delivery_lease_s=10,
        log_format="console",
        log_level="warning",
    )
    await delete_broker_objects(services.amqp_url, Names(prefix))


async def delete_broker_objects(amqp_url: str, names: Names) -> None:
    """Leave the shared broker as we found it."""
    with contextlib.suppress(Exception):
        connection = await aio_pika.connect(amqp_url, timeout=5)
        async with connection:
            await delete(connection, names)


def settings_env(settings: Settings, **extra: str) -> dict[str, str]:
    """The environment a `delivery` subprocess needs to act on this test's isolated services."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("DELIVERY_")}
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
    )
    env.update(extra)
    return env


async def wait_until(
    condition: Callable[[], object], *, timeout_s: float, what: str, interval_s: float = 0.05
) -> None:
    """Poll a (sync or async) condition until it holds or the deadline passes."""
    deadline = time.monotonic() + timeout_s
    while True:
        result = condition()
        if asyncio.iscoroutine(result):
            result = await result
        if result:
            return
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out after {timeout_s}s waiting for {what}")
        await asyncio.sleep(interval_s)


async def run_until_idle(
    settings: Settings, *, relay: bool = True, worker: bool = True, timeout_s: float = 60.0
) -> None:
    """Run the pipeline in this event loop until no work is left (burst mode: the rule is in
    ``delivery.worker.burst``), then drain and return; ``TimeoutError`` naming what was left
    if that takes longer than ``timeout_s``."""
    await run_process(
        settings,
        relay=relay,
        worker=worker,
        handle_signals=False,
        until_idle=True,
        idle_timeout_s=timeout_s,
    )


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
