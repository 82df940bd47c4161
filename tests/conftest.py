"""Fixtures for the layers with services (integration, ops, chaos, mutation): real PostgreSQL
and RabbitMQ, isolated per test. Helpers that run the platform are in ``tests.support``.

Services are found in this order: DELIVERY_DATABASE_URL / DELIVERY_AMQP_URL; testcontainers
when a Docker engine answers; otherwise throwaway local instances from the installed binaries.
Each test gets its own database (cloned from a migrated template) and its own broker names
(a unique ``amqp_prefix``), so tests run in any order and in parallel.
Locally a missing service skips the integration tests; under CI=true it fails them.
"""

from __future__ import annotations

import contextlib
import secrets
import sys
from collections.abc import AsyncIterator, Iterator

import aio_pika
import pytest
import pytest_asyncio
import structlog

from delivery.broker.topology import Names, delete
from delivery.settings import Settings
from delivery.store.migrations import migrate
from delivery.testing.env import IN_CI
from delivery.testing.services import Services, create_database, drop_database, provision_services
from tests.schedule import longest_first

# Components run in the test process log through structlog's default configuration, whose
# console renderer formats an exception with `rich` when it is installed (a test tool pulls it
# in): 0.3-0.4 s a traceback, enough to throttle a failing loop under test and hide whether it
# backs off. Plain tracebacks, as delivery.ops.logs configures the processes.
structlog.configure(
    processors=[
        *structlog.get_config()["processors"][:-1],
        structlog.dev.ConsoleRenderer(exception_formatter=structlog.dev.plain_traceback),
    ]
)


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
        allow_private_targets=True,  # the tests' subscribers listen on 127.0.0.1
    )
    await delete_broker_objects(services.amqp_url, Names(prefix))


async def delete_broker_objects(amqp_url: str, names: Names) -> None:
    """Leave the shared broker as we found it."""
    with contextlib.suppress(Exception):
        connection = await aio_pika.connect(amqp_url, timeout=5)
        async with connection:
            await delete(connection, names)


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    # Longest files first, so that the two xdist workers finish together (tests/schedule.py).
    # Only in an xdist worker: a serial run (the mutation check's kill tests, listed fastest
    # first for -x) keeps the order it was given.
    if hasattr(config, "workerinput"):
        items[:] = longest_first(items)


# The mutation check's score, when an xdist worker ran it (tests/mutation/conftest.py).
_worker_summaries: list[str] = []


@pytest.hookimpl(optionalhook=True)
def pytest_testnodedown(node: object, error: object) -> None:
    _worker_summaries.extend(getattr(node, "workeroutput", {}).get("mutation_summary", []))


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    for line in _worker_summaries:
        terminalreporter.write_line(line)
