"""Find or start PostgreSQL and RabbitMQ for the demo, the test suite and the chaos suite.

Order of preference: URLs from the environment, then containers when a Docker engine answers,
then throwaway local servers started from the installed binaries (own port, own directory, torn
down on exit: ``delivery.testing.postgres`` and ``delivery.testing.rabbitmq``, which are also the
handles the chaos suite uses to stop, kill and restart a server). Also the databases that
isolate tests on one server.
"""

from __future__ import annotations

import contextlib
import importlib
import os
import re
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, Final
from urllib.parse import quote, urlsplit, urlunsplit

import asyncpg

from delivery.testing.postgres import LocalPostgres
from delivery.testing.processes import Progress, ProvisionError, _noop
from delivery.testing.rabbitmq import RABBIT_START_TIMEOUT_S, LocalRabbitMQ

__all__ = [
    "ENV_AMQP_URL",
    "ENV_DATABASE_URL",
    "Services",
    "asyncpg_url",
    "create_database",
    "docker_engine_available",
    "drop_database",
    "provision_services",
]


ENV_DATABASE_URL: Final = "DELIVERY_DATABASE_URL"
ENV_AMQP_URL: Final = "DELIVERY_AMQP_URL"
POSTGRES_IMAGE: Final = "postgres:15"
RABBITMQ_IMAGE: Final = "rabbitmq:3.10-management"
DOCKER_PING_TIMEOUT_S: Final = 2.0
DB_CONNECT_TIMEOUT_S: Final = 10.0
_RABBIT_READY_LINE: Final = "Server startup complete"


@dataclass(frozen=True)
class Services:
    """Where the platform's servers are; `source` is "env", "testcontainers" or "local"."""

    database_url: str
    amqp_url: str
    source: str


def _quote_ident(name: str) -> str:
    return '"' + name.replace('"', '""') + '"'


def _with_database(url: str, name: str) -> str:
    parts = urlsplit(url)
    return urlunsplit(parts._replace(path="/" + quote(name, safe="")))


async def create_database(admin_url: str, name: str, template: str | None = None) -> str:
    """Create database `name` (optionally from `template`) and return its URL."""
    sql = f"CREATE DATABASE {_quote_ident(name)}"
    if template is not None:
        sql += f" TEMPLATE {_quote_ident(template)}"
    conn = await asyncpg.connect(admin_url, timeout=DB_CONNECT_TIMEOUT_S)
    try:
        await conn.execute(sql)
    finally:
        await conn.close()
    return _with_database(admin_url, name)


async def drop_database(admin_url: str, name: str) -> None:
    """Drop database `name` if it exists, disconnecting whoever is still connected."""
    conn = await asyncpg.connect(admin_url, timeout=DB_CONNECT_TIMEOUT_S)
    try:
        await conn.execute(f"DROP DATABASE IF EXISTS {_quote_ident(name)} WITH (FORCE)")
    finally:
        await conn.close()


def docker_engine_available(timeout_s: float = DOCKER_PING_TIMEOUT_S) -> bool:
    """True when a Docker engine answers a ping (the docker client alone is not enough)."""
    try:
        docker: Any = importlib.import_module("docker")
        client = docker.from_env(timeout=timeout_s)
        try:
            return bool(client.ping())
        finally:
            client.close()
    except Exception:  # any failure (no package, no socket, no engine) means "no"
        return False


def asyncpg_url(url: str) -> str:
    """`postgresql+psycopg2://...` (SQLAlchemy style) -> `postgresql://...` for asyncpg."""
    return re.sub(r"^postgres(?:ql)?(?:\+\w+)?://", "postgresql://", url)


def _import_first(*modules: str) -> Any:
    """The first of `modules` that imports (testcontainers moved its modules in 4.x)."""
    error: ImportError | None = None
    for name in modules:
        try:
            return importlib.import_module(name)
        except ImportError as exc:
            error = exc
    raise ProvisionError(f"cannot import {' or '.join(modules)}: {error}")


def _start_postgres_container(stack: contextlib.ExitStack, say: Progress) -> str:
    module = _import_first("testcontainers.community.postgres", "testcontainers.postgres")
    container = module.PostgresContainer(POSTGRES_IMAGE, driver=None)
    stack.callback(_quietly, container.stop)
    say(f"starting container {POSTGRES_IMAGE}")
    container.start()
    return asyncpg_url(str(container.get_connection_url()))


def _start_rabbitmq_container(stack: contextlib.ExitStack, say: Progress) -> str:
    say(f"starting container {RABBITMQ_IMAGE}")
    try:
        module = _import_first("testcontainers.community.rabbitmq", "testcontainers.rabbitmq")
        container = module.RabbitMqContainer(RABBITMQ_IMAGE)
    except ProvisionError:
        # RabbitMqContainer imports pika at module level for its readiness probe; without pika
        # a plain container waiting for the boot message does the same job.
        core = _import_first("testcontainers.core.container")
        container = core.DockerContainer(RABBITMQ_IMAGE).with_exposed_ports(5672)
        stack.callback(_quietly, container.stop)
        try:
            strategies = importlib.import_module("testcontainers.core.wait_strategies")
        except ImportError:  # older testcontainers: only the (now deprecated) wait_for_logs
            waits = _import_first("testcontainers.core.waiting_utils")
            container.start()
            waits.wait_for_logs(container, _RABBIT_READY_LINE, timeout=RABBIT_START_TIMEOUT_S)
        else:
            ready = strategies.LogMessageWaitStrategy(_RABBIT_READY_LINE)
            container.waiting_for(ready.with_startup_timeout(int(RABBIT_START_TIMEOUT_S)))
            container.start()
    else:
        stack.callback(_quietly, container.stop)
        container.start()
    host = str(container.get_container_host_ip())
    port = int(container.get_exposed_port(5672))
    return f"amqp://guest:guest@{host}:{port}/"


def _quietly(stop: Callable[[], object]) -> None:
    """Teardown must not hide the exception that caused it."""
    with contextlib.suppress(Exception):
        stop()


def _start_parallel(
    starts: list[Callable[[], str]], on_interrupt: list[Callable[[], None]]
) -> list[str]:
    """Run the start functions in threads; their results in order, or the first error."""
    if len(starts) == 1:
        return [starts[0]()]
    with ThreadPoolExecutor(max_workers=len(starts), thread_name_prefix="provision") as pool:
        futures: list[Future[str]] = [pool.submit(start) for start in starts]
        try:
            return [future.result() for future in futures]
        except BaseException:
            # Ctrl-C or one failed start: tell the others to give up rather than finish
            # booting a server that is about to be torn down.
            for abort in on_interrupt:
                abort()
            raise


def _start_local(
    stack: contextlib.ExitStack, need_db: bool, need_amqp: bool, say: Progress
) -> tuple[str | None, str | None]:
    starts: list[Callable[[], str]] = []
    aborts: list[Callable[[], None]] = []
    if need_db:
        pg = LocalPostgres(progress=say)
        stack.callback(pg.close)

        def start_pg() -> str:
            pg.start()
            return pg.url

        starts.append(start_pg)
    if need_amqp:
        rabbit = LocalRabbitMQ(progress=say)
        stack.callback(rabbit.close)
        aborts.append(rabbit.abort_start)

        def start_rabbit() -> str:
            rabbit.start()
            return rabbit.url

        starts.append(start_rabbit)
    urls = iter(_start_parallel(starts, aborts))
    return (next(urls) if need_db else None, next(urls) if need_amqp else None)


def _start_containers(
    stack: contextlib.ExitStack, need_db: bool, need_amqp: bool, say: Progress
) -> tuple[str | None, str | None]:
    starts: list[Callable[[], str]] = []
    if need_db:
        starts.append(lambda: _start_postgres_container(stack, say))
    if need_amqp:
        starts.append(lambda: _start_rabbitmq_container(stack, say))
    urls = iter(_start_parallel(starts, []))
    return (next(urls) if need_db else None, next(urls) if need_amqp else None)


@contextlib.contextmanager
def provision_services(
    *, use_env: bool = True, progress: Progress | None = None
) -> Iterator[Services]:
    """Yield URLs of a PostgreSQL and a RabbitMQ: from the environment, containers or local.

    What this started is torn down on exit, exceptions and Ctrl-C included. When only one of
    the two variables is set, it is used and only the other server is provisioned; `source`
    then names how that one was obtained.
    """
    say = progress or _noop
    env_db = (os.environ.get(ENV_DATABASE_URL) or None) if use_env else None
    env_amqp = (os.environ.get(ENV_AMQP_URL) or None) if use_env else None
    if env_db is not None and env_amqp is not None:
        say(f"using {ENV_DATABASE_URL} and {ENV_AMQP_URL} from the environment")
        yield Services(database_url=env_db, amqp_url=env_amqp, source="env")
        return
    for name, value in ((ENV_DATABASE_URL, env_db), (ENV_AMQP_URL, env_amqp)):
        if value is not None:
            say(f"using {name} from the environment")
    with contextlib.ExitStack() as stack:
        need_db, need_amqp = env_db is None, env_amqp is None
        if docker_engine_available():
            say("a Docker engine answers: using testcontainers")
            db, amqp = _start_containers(stack, need_db, need_amqp, say)
            source = "testcontainers"
        else:
            say("no Docker engine: starting throwaway servers from the installed binaries")
            db, amqp = _start_local(stack, need_db, need_amqp, say)
            source = "local"
        database_url = env_db or db
        amqp_url = env_amqp or amqp
        assert database_url is not None and amqp_url is not None  # one of each is always set
        yield Services(database_url=database_url, amqp_url=amqp_url, source=source)
