"""Throwaway PostgreSQL and RabbitMQ servers from the installed binaries: start, use, break, clean.

Real servers, no mocks. Each server is started once per module (RabbitMQ takes ~5 s to boot) and
tests that stop or kill it leave it for the next test to start again.
"""

from __future__ import annotations

import asyncio
import os
import secrets
from collections.abc import Iterator
from pathlib import Path

import aio_pika
import asyncpg
import pytest

from delivery.testing.env import IN_CI
from delivery.testing.postgres import LocalPostgres, find_postgres_bindir
from delivery.testing.processes import ProvisionError, free_port
from delivery.testing.rabbitmq import LocalRabbitMQ
from delivery.testing.services import (
    ENV_AMQP_URL,
    ENV_DATABASE_URL,
    Services,
    asyncpg_url,
    create_database,
    drop_database,
    provision_services,
)
from delivery.testing.waits import wait_until


def _have_postgres() -> bool:
    try:
        find_postgres_bindir()
    except ProvisionError:
        return False
    return True


def _have_rabbitmq() -> bool:
    return any(Path(d, "rabbitmq-server").exists() for d in ("/usr/sbin", "/usr/lib/rabbitmq/bin"))


# Locally a missing server skips; in CI (CI=1) it must fail instead of hiding.
needs_postgres = pytest.mark.skipif(
    not IN_CI and not _have_postgres(), reason="PostgreSQL server binaries not installed"
)
needs_rabbitmq = pytest.mark.skipif(
    not IN_CI and not _have_rabbitmq(), reason="rabbitmq-server not installed"
)


# --- helpers that look at the machine independently of the code under test -----------------


def _proc_entries() -> Iterator[tuple[int, str, list[bytes]]]:
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            cmdline = Path("/proc", entry, "cmdline").read_bytes().replace(b"\0", b" ").decode()
            environ = Path("/proc", entry, "environ").read_bytes().split(b"\0")
        except OSError:
            continue
        yield int(entry), cmdline, environ


def rabbit_node_processes(node: str) -> list[int]:
    """Live processes that belong to the node (zombies have no environ and don't count)."""
    marker = f"RABBITMQ_NODENAME={node}".encode()
    return [pid for pid, cmd, env in _proc_entries() if marker in env or node in cmd]


def live(pids: set[int]) -> set[int]:
    """The pids still running (a zombie waiting for init to reap it is not running)."""
    running = set()
    for pid in pids:
        try:
            state = Path("/proc", str(pid), "stat").read_text().rsplit(")", 1)[1].split()[0]
        except OSError:
            continue
        if state != "Z":
            running.add(pid)
    return running


def postgres_pids(postmaster: int) -> set[int]:
    """The postmaster and its children."""
    pids = {postmaster}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                status = Path("/proc", entry, "status").read_text()
            except OSError:
                continue
            ppid = next(line for line in status.splitlines() if line.startswith("PPid:"))
            if int(ppid.split()[1]) == postmaster:
                pids.add(int(entry))
    return pids


async def select_one(url: str) -> int:
    conn = await asyncpg.connect(url, timeout=10)
    try:
        return int(await conn.fetchval("select 1"))
    finally:
        await conn.close()


async def publish(url: str, queue_name: str, body: bytes, *, timeout_s: float = 5.0) -> None:
    """Publish one persistent message to a durable queue and wait for the broker's confirm."""
    connection = await aio_pika.connect(url, timeout=10)
    try:
        channel = await connection.channel(publisher_confirms=True)
        await channel.declare_queue(queue_name, durable=True)
        async with asyncio.timeout(timeout_s):
            await channel.default_exchange.publish(
                aio_pika.Message(body, delivery_mode=aio_pika.DeliveryMode.PERSISTENT),
                routing_key=queue_name,
            )
    finally:
        await connection.close()


async def get_one(url: str, queue_name: str) -> bytes | None:
    connection = await aio_pika.connect(url, timeout=10)
    try:
        channel = await connection.channel()
        queue = await channel.declare_queue(queue_name, durable=True)
        # Acked only once read: a get that times out on a loaded machine leaves the message in
        # the queue (with no_ack it would be gone, and the next poll would find nothing).
        message = await queue.get(no_ack=False, fail=False, timeout=5)
        if message is None:
            return None
        await message.ack()
        return message.body
    finally:
        await connection.close()


# --- fixtures --------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def postgres_server() -> Iterator[LocalPostgres]:
    server = LocalPostgres()
    try:
        yield server
    finally:
        server.close()


@pytest.fixture
def postgres(postgres_server: LocalPostgres) -> LocalPostgres:
    if not postgres_server.is_running():
        postgres_server.start()
    return postgres_server


@pytest.fixture(scope="module")
def rabbit_server() -> Iterator[LocalRabbitMQ]:
    server = LocalRabbitMQ()
    try:
        yield server
    finally:
        server.close()


@pytest.fixture
def rabbit(rabbit_server: LocalRabbitMQ) -> LocalRabbitMQ:
    if not rabbit_server.is_running():
        rabbit_server.start()
    return rabbit_server


# --- pure helpers ----------------------------------------------------------------------------


def test_free_port_never_hands_out_the_same_port_twice() -> None:
    ports = [free_port() for _ in range(20)]
    assert len(set(ports)) == 20


def test_free_ports_lie_outside_the_kernels_ephemeral_range() -> None:
    """An ephemeral port can become the source port of any outgoing connection between the
    check and the server's bind; a port below that range cannot."""
    low, high = (int(n) for n in Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split())
    ports = [free_port() for _ in range(200)]
    assert not [p for p in ports if low <= p <= high]


def test_asyncpg_url_drops_the_sqlalchemy_driver() -> None:
    assert asyncpg_url("postgresql+psycopg2://t:t@h:1/db") == "postgresql://t:t@h:1/db"
    assert asyncpg_url("postgres://t@h/db") == "postgresql://t@h/db"
    assert asyncpg_url("postgresql://t@h/db") == "postgresql://t@h/db"


def test_both_environment_urls_are_used_as_they_are(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(ENV_DATABASE_URL, "postgresql://u@db.example:5432/x")
    monkeypatch.setenv(ENV_AMQP_URL, "amqp://u:p@mq.example:5672/")
    lines: list[str] = []
    with provision_services(progress=lines.append) as services:
        assert services == Services(
            "postgresql://u@db.example:5432/x", "amqp://u:p@mq.example:5672/", "env"
        )
    assert lines == [f"using {ENV_DATABASE_URL} and {ENV_AMQP_URL} from the environment"]


def test_a_missing_binary_is_one_clear_line(tmp_path: Path) -> None:
    server = LocalPostgres(bindir=tmp_path, base_dir=tmp_path)
    with pytest.raises(ProvisionError, match=r"initdb not found") as info:
        server.start()
    assert "\n" not in str(info.value)
    server.close()


# --- PostgreSQL ------------------------------------------------------------------------------


@pytest.mark.integration
@needs_postgres
async def test_postgres_answers_and_survives_a_restart(postgres: LocalPostgres) -> None:
    assert postgres.url == f"postgresql://postgres@127.0.0.1:{postgres.port}/postgres"
    assert await select_one(postgres.url) == 1

    port = postgres.port
    postgres.restart()

    assert postgres.port == port
    assert await select_one(postgres.url) == 1


@pytest.mark.integration
@needs_postgres
async def test_postgres_keeps_committed_data_across_a_kill(postgres: LocalPostgres) -> None:
    conn = await asyncpg.connect(postgres.url)
    await conn.execute("create table if not exists survivors (id int primary key)")
    await conn.execute("insert into survivors values (1) on conflict do nothing")
    await conn.close()
    postmaster = postgres.postmaster_pid()
    assert postmaster is not None
    pids = postgres_pids(postmaster)

    postgres.kill()

    assert not live(pids)
    assert not postgres.is_running()
    postgres.start()  # crash recovery, same port, same data
    conn = await asyncpg.connect(postgres.url)
    assert await conn.fetchval("select count(*) from survivors") == 1
    await conn.close()


@pytest.mark.integration
@needs_postgres
async def test_databases_for_isolation_are_created_and_dropped(postgres: LocalPostgres) -> None:
    name = f"t_{secrets.token_hex(4)}"
    url = await create_database(postgres.url, name)
    assert url == f"postgresql://postgres@127.0.0.1:{postgres.port}/{name}"
    held = await asyncpg.connect(url)  # WITH (FORCE) must not mind a connected session

    await drop_database(postgres.url, name)

    assert held.is_closed() or await _is_dead(held)
    with pytest.raises(asyncpg.InvalidCatalogNameError):
        await select_one(url)


async def _is_dead(conn: asyncpg.Connection) -> bool:
    try:
        await conn.fetchval("select 1")
    except (asyncpg.PostgresError, asyncpg.InterfaceError, OSError):
        return True
    return False


@pytest.mark.integration
@needs_postgres
def test_postgres_stop_and_cleanup_leave_nothing(postgres: LocalPostgres) -> None:
    postmaster = postgres.postmaster_pid()
    assert postmaster is not None
    pids = postgres_pids(postmaster)
    directory = postgres.dir

    postgres.stop()
    postgres.cleanup()

    assert not live(pids)
    assert not directory.exists()


# --- RabbitMQ --------------------------------------------------------------------------------


@pytest.mark.integration
@needs_rabbitmq
async def test_rabbitmq_takes_a_message_and_gives_it_back(rabbit: LocalRabbitMQ) -> None:
    assert rabbit.url == f"amqp://guest:guest@127.0.0.1:{rabbit.port}/"

    await publish(rabbit.url, "roundtrip", b"hello")

    assert await get_one(rabbit.url, "roundtrip") == b"hello"


@pytest.mark.integration
@needs_rabbitmq
async def test_rabbitmq_memory_alarm_blocks_publishers_until_cleared(
    rabbit: LocalRabbitMQ,
) -> None:
    rabbit.set_memory_alarm(True)
    try:
        with pytest.raises(TimeoutError):
            await publish(rabbit.url, "alarmed", b"blocked", timeout_s=1.0)
    finally:
        rabbit.set_memory_alarm(False)

    await publish(rabbit.url, "alarmed", b"flows again")
    bodies = {await get_one(rabbit.url, "alarmed"), await get_one(rabbit.url, "alarmed")}
    assert b"flows again" in bodies


@pytest.mark.integration
@needs_rabbitmq
async def test_rabbitmq_restart_keeps_port_and_durable_messages(rabbit: LocalRabbitMQ) -> None:
    await publish(rabbit.url, "durable", b"kept")
    port, node = rabbit.port, rabbit.node

    rabbit.restart()

    assert (rabbit.port, rabbit.node) == (port, node)
    assert await get_one(rabbit.url, "durable") == b"kept"


@pytest.mark.integration
@needs_rabbitmq
async def test_rabbitmq_kill_leaves_no_process_and_confirmed_messages_survive(
    rabbit: LocalRabbitMQ,
) -> None:
    await publish(rabbit.url, "crash", b"confirmed")
    assert rabbit_node_processes(rabbit.node)

    rabbit.kill()

    assert rabbit_node_processes(rabbit.node) == []
    rabbit.start()
    # Queues are recovered asynchronously after an unclean stop: wait for it, with a deadline
    # that only a failure reaches (with three suites sharing two cores, the message store's
    # recovery after a kill -9 took over 30 s).
    got: list[bytes | None] = []

    async def recovered() -> bool:
        try:
            got.append(await get_one(rabbit.url, "crash"))
        except (TimeoutError, aio_pika.exceptions.AMQPError, ConnectionError):
            return False  # still booting its queues
        return got[-1] is not None

    await wait_until(recovered, timeout_s=120, what="the queue recovered", interval_s=0.2)
    assert got[-1] == b"confirmed"


@pytest.mark.integration
@needs_rabbitmq
def test_rabbitmq_stop_and_cleanup_leave_no_process(rabbit: LocalRabbitMQ) -> None:
    directory = rabbit.dir

    rabbit.stop()
    rabbit.cleanup()

    assert rabbit_node_processes(rabbit.node) == []
    assert not directory.exists()


# --- provisioning ----------------------------------------------------------------------------


@pytest.mark.integration
@needs_postgres
@needs_rabbitmq
async def test_local_servers_are_started_together_and_torn_down_on_error() -> None:
    lines: list[str] = []

    with (
        pytest.raises(RuntimeError, match="boom"),
        provision_services(use_env=False, progress=lines.append) as services,
    ):
        assert services.source == "local"
        assert await select_one(services.database_url) == 1
        await publish(services.amqp_url, "provisioned", b"ok")
        node = next(line.split()[3] for line in lines if line.startswith("starting throwaway R"))
        raise RuntimeError("boom")

    assert rabbit_node_processes(node) == []
    with pytest.raises(OSError):
        await select_one(services.database_url)


@pytest.mark.integration
@needs_postgres
async def test_one_environment_url_provisions_only_the_other_server(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.delenv(ENV_DATABASE_URL, raising=False)
    monkeypatch.setenv(ENV_AMQP_URL, "amqp://u:p@mq.example:5672/")

    with provision_services() as services:
        assert services.amqp_url == "amqp://u:p@mq.example:5672/"
        assert services.source == "local"
        assert await select_one(services.database_url) == 1
