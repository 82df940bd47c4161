"""A system under test, behind one interface, run as real subprocesses: ``bench.ours.Ours``
(``python -m delivery run``; its entry point is the outbox) and the peers in
``bench.peers.systems`` (their entry point is their RabbitMQ queue).

Every system gets its own database and queue names (a random tag), a fresh receiver process,
and is torn down completely (processes, database, queues) afterwards.
"""

from __future__ import annotations

import asyncio
import contextlib
import secrets
import shutil
import signal
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import ClassVar
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

import aio_pika
import asyncpg

from bench.processes import signal_tree, terminate
from bench.receiver import ReceiverProcess
from bench.workload import Event, make_workload
from delivery.signing import generate_secret
from delivery.testing.services import create_database, drop_database

WARMUP_EVENTS = 20
START_TIMEOUT_S = 90.0
# Long enough that a worker paused (SIGSTOP) while its backlog is staged keeps its broker link.
AMQP_HEARTBEAT_S = 120


def with_heartbeat(url: str, heartbeat_s: int = AMQP_HEARTBEAT_S) -> str:
    parts = urlsplit(url)
    query = dict(parse_qsl(parts.query))
    query.setdefault("heartbeat", str(heartbeat_s))
    return urlunsplit(parts._replace(query=urlencode(query)))


class System:
    """One system under test, set up for one measurement session."""

    name: ClassVar[str]
    label: ClassVar[str]
    # The module an optional peer needs (a bench extra): without it the system is skipped.
    requires: ClassVar[str | None] = None

    def __init__(self, admin_db_url: str, amqp_url: str, log_dir: Path | None = None) -> None:
        self.tag = secrets.token_hex(3)
        self.admin_db_url = admin_db_url
        self.amqp_url = with_heartbeat(amqp_url)
        self.db_name = f"bench_{self.name}_{self.tag}"
        self.prefix = self.db_name  # queue and exchange names: bench_<system>_<tag>...
        self.db_url = ""
        self.secret = generate_secret()
        self.log_dir = log_dir or Path(tempfile.mkdtemp(prefix=f"bench-{self.name}-"))
        self.receiver = ReceiverProcess(self.secret, self.log_dir)
        self.procs: list[asyncio.subprocess.Process] = []
        self.conn: asyncpg.Connection | None = None
        self.fanout = 1
        self.delivered_base = 0

    @property
    def roots(self) -> list[int]:
        return [p.pid for p in self.procs]

    def subscriber_path(self, k: int) -> str:
        """The receiver's path for the system's ``k``-th subscriber (of ``fanout``)."""
        return f"/s{k}"

    def pause(self) -> None:
        for p in self.procs:
            signal_tree(p.pid, signal.SIGSTOP)

    def resume(self) -> None:
        for p in self.procs:
            signal_tree(p.pid, signal.SIGCONT)

    async def setup(self, *, processes: int = 1, fanout: int = 1, start: bool = True) -> None:
        self.fanout = fanout
        await self.receiver.start([self.subscriber_path(k) for k in range(fanout)])
        self.db_url = await create_database(self.admin_db_url, self.db_name)
        self.conn = await asyncpg.connect(self.db_url)
        await self.prepare_database()
        if start:
            await self.start_processes(processes)
            await self.warm_up()

    async def warm_up(self) -> None:
        events = make_workload(WARMUP_EVENTS, f"{self.tag}w")
        await self.publish(events, rate=0)
        await self.receiver.wait(
            WARMUP_EVENTS * self.fanout, START_TIMEOUT_S, f"{self.name} warm-up"
        )
        await self.wait_recorded(WARMUP_EVENTS * self.fanout, 30)
        self.delivered_base = 0
        await self.receiver.reset()

    async def wait_recorded(self, expected: int, timeout_s: float) -> int:
        """Wait until the system recorded ``expected`` more deliveries than at the last reset."""
        deadline = time.monotonic() + timeout_s
        while True:
            n = await self.recorded() - self.delivered_base
            if n >= expected or time.monotonic() > deadline:
                return n
            await asyncio.sleep(0.02)

    async def mark_recorded(self) -> None:
        self.delivered_base = await self.recorded()

    async def teardown(self, *, keep_logs: bool = False) -> None:
        """Stop everything and remove the database, the queues and (unless asked to keep
        them, after a failure) the logs."""
        await terminate(self.procs)
        self.procs = []
        await self.receiver.stop()
        if self.conn is not None:
            with contextlib.suppress(Exception):
                await self.conn.close()
        with contextlib.suppress(Exception):
            await drop_database(self.admin_db_url, self.db_name)
        with contextlib.suppress(Exception):
            connection = await aio_pika.connect(self.amqp_url)
            async with connection:
                for queue in self.queues():
                    channel = await connection.channel()
                    with contextlib.suppress(Exception):
                        await channel.queue_delete(queue)
                for exchange in self.exchanges():
                    channel = await connection.channel()
                    with contextlib.suppress(Exception):
                        await channel.exchange_delete(exchange)
        if not keep_logs:
            shutil.rmtree(self.log_dir, ignore_errors=True)

    # -- per system ---------------------------------------------------------------------------

    async def prepare_database(self) -> None:
        raise NotImplementedError

    async def start_processes(self, processes: int) -> None:
        raise NotImplementedError

    async def publish(self, events: Sequence[Event], rate: float) -> dict[str, float]:
        """Publish at the system's entry point (flat out when ``rate`` is 0); the time each
        event's publish returned (committed, for ours), by id."""
        raise NotImplementedError

    async def recorded(self) -> int:
        raise NotImplementedError

    def queues(self) -> list[str]:
        return []

    def exchanges(self) -> list[str]:
        return []

    def describe(self) -> str:
        return self.label
