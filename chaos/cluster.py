"""Everything a scenario breaks: throwaway servers, fault proxies in front of them, and the
platform's own processes pointed at the proxies.

Links are named ``<service>.<client>``: ``pg.producer``, ``pg.relay``, ``pg.worker``,
``amqp.relay``, ``amqp.worker`` (and ``pg.run`` / ``amqp.run`` for single-node processes,
``pg.api`` / ``amqp.api`` for `delivery api`, which only the scenarios that need it run).
A fault picks its links with a selector: ``"pg"`` (all PostgreSQL links), ``"amqp.worker"``,
``"*"``. The chaos runner itself (checker, settle probes) talks to the servers directly.

``Layout(standby=True)``: PostgreSQL is a primary and a synchronous standby
(``LocalPostgresPair``), and every client, producer and runner included, is given the multi-host
URL of the two (``target_session_attrs=read-write``) with no proxy on the way: the fault there is
the server's death, and a dead server refuses connections, which is what makes a multi-host
client try the next host (a proxy would accept and then drop them).
"""

from __future__ import annotations

import asyncio
import contextlib
import secrets
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import aio_pika
import aiohttp

from chaos.processes import ManagedProcess, Role
from chaos.proxy import FaultProxy
from chaos.rabbit_cluster import RabbitNet
from delivery.broker.topology import Names, delete
from delivery.settings import load_settings
from delivery.store.migrations import migrate, migrations_dir
from delivery.testing.env import environment_without_settings
from delivery.testing.postgres import LocalPostgres
from delivery.testing.postgres_standby import LocalPostgresPair, LocalStandby
from delivery.testing.processes import HOST, free_port
from delivery.testing.rabbitmq import LocalRabbitMQ
from delivery.testing.services import create_database, drop_database

__all__ = ["PLATFORM_ENV", "Cluster", "Layout", "Servers"]

# Knobs every chaos run sets: short timeouts and schedules so recovery happens in seconds, and
# enough retry steps that a flapping subscriber never exhausts them (exhausted = lost here).
PLATFORM_ENV: dict[str, str] = {
    "DELIVERY_RETRY_SCHEDULE": ",".join(["100ms", "250ms", "500ms", "1s"] + ["2s"] * 26),
    "DELIVERY_HTTP_TIMEOUT_S": "2",
    "DELIVERY_HTTP_CONNECT_TIMEOUT_S": "1",
    "DELIVERY_DELIVERY_LEASE_S": "4",
    "DELIVERY_CIRCUIT_COOLDOWN_S": "1",
    "DELIVERY_RELAY_POLL_INTERVAL_S": "0.5",
    "DELIVERY_SCHEDULER_POLL_INTERVAL_S": "0.25",
    "DELIVERY_PUBLISH_TIMEOUT_S": "3",
    "DELIVERY_SHUTDOWN_TIMEOUT_S": "5",
    # Events the broker lost after confirming them are re-driven this soon (the relay's sweep
    # itself runs every 15 s, only when the dispatch queue is empty).
    "DELIVERY_REDRIVE_AFTER_S": "3",
    "DELIVERY_LOG_FORMAT": "json",
    # The chaos subscribers listen on 127.0.0.1, which the SSRF guard refuses by default.
    "DELIVERY_ALLOW_PRIVATE_TARGETS": "true",
    "DELIVERY_LOG_LEVEL": "info",
}
# A process starts in seconds; at load 50 (seven sessions running chaos at once) a relay was
# not ready after 90 s.
_READY_TIMEOUT_S = 240.0
# A free-disk limit no machine meets trips the disk alarm at once; 50MB is RabbitMQ's default.
_DISK_LIMIT_ALARM = "1000000GB"
_DISK_LIMIT_NORMAL = "50MB"
AlarmKind = Literal["memory", "disk"]


@dataclass
class Servers:
    """One throwaway PostgreSQL (real fsync) and one RabbitMQ node, or a three-node RabbitMQ
    cluster (``rabbits``; ``rabbit`` is then its first node). A scenario owns them, or (in the
    test suite) several scenarios share them one after another.

    With a ``standby`` (``start(standby=True)``, ``pair_beside``), ``pg`` is the primary of a
    synchronously replicated pair (fsync off: see ``start``); such servers serve one scenario
    only (a failover spends the pair)."""

    pg: LocalPostgres
    rabbit: LocalRabbitMQ
    alarms: set[AlarmKind] = field(default_factory=set)
    standby: LocalStandby | None = None
    rabbits: RabbitNet | None = None

    @classmethod
    async def start(
        cls, base_dir: Path | None = None, *, standby: bool = False, rabbit_nodes: int = 1
    ) -> Servers:
        """``rabbit_nodes``: 1, or 3 for a cluster (chaos.rabbit_cluster); ``standby``: a
        synchronous PostgreSQL pair (one RabbitMQ node)."""
        if rabbit_nodes not in (1, 3):
            raise ValueError(f"a chaos run has 1 or 3 RabbitMQ nodes, not {rabbit_nodes}")
        if rabbit_nodes == 3:
            if standby:
                raise ValueError("a chaos run has a PostgreSQL standby or a RabbitMQ cluster")
            pg = LocalPostgres(fast=False, base_dir=base_dir)
            net = RabbitNet(base_dir=base_dir)
            try:
                await asyncio.gather(asyncio.to_thread(pg.start), net.start())
            except BaseException:
                await asyncio.gather(asyncio.to_thread(pg.close), net.close())
                raise
            return cls(pg=pg, rabbit=net.nodes[0], rabbits=net)
        rabbit = LocalRabbitMQ(base_dir=base_dir)
        if standby:
            # fsync off (fast): the pair's fault is kill -9 of the server's processes, and what
            # they wrote is in the page cache, which survives them; fsync matters only when the
            # machine dies. It costs ~10 s of initdb and base backup at a loaded CI's start.
            pair = LocalPostgresPair(synchronous=True, fast=True, base_dir=base_dir)
            pg, replica, start_pg, close_pg = pair.primary, pair.standby, pair.start, pair.close
        else:
            pg, replica = LocalPostgres(fast=False, base_dir=base_dir), None
            start_pg, close_pg = pg.start, pg.close
        try:
            await asyncio.gather(asyncio.to_thread(start_pg), asyncio.to_thread(rabbit.start))
        except BaseException:
            await asyncio.gather(asyncio.to_thread(close_pg), asyncio.to_thread(rabbit.close))
            raise
        return cls(pg=pg, rabbit=rabbit, standby=replica)

    @classmethod
    async def pair_beside(cls, rabbit: LocalRabbitMQ, base_dir: Path | None = None) -> Servers:
        """A fresh primary and standby beside a RabbitMQ node that outlives them (the test
        suite's shared one): close them with ``close_pg``."""
        pair = LocalPostgresPair(synchronous=True, fast=True, base_dir=base_dir)
        try:
            await asyncio.to_thread(pair.start)
        except BaseException:
            await asyncio.to_thread(pair.close)
            raise
        return cls(pg=pair.primary, rabbit=rabbit, standby=pair.standby)

    async def close_pg(self) -> None:
        closing = [self.pg.close]
        if self.standby is not None:
            closing.append(self.standby.close)
        await asyncio.gather(*(asyncio.to_thread(c) for c in closing))

    @property
    def rabbit_nodes(self) -> int:
        return 1 if self.rabbits is None else len(self.rabbits.nodes)

    @property
    def amqp_url(self) -> str:
        """One node's URL, for the runner's own probes: with a cluster, one that runs and is
        not cut off."""
        return self.rabbit.url if self.rabbits is None else self.rabbits.reachable_url()

    async def close(self) -> None:
        rabbit = self.rabbits.close() if self.rabbits else asyncio.to_thread(self.rabbit.close)
        await asyncio.gather(self.close_pg(), rabbit)

    def pg_url(self, database: str) -> str:
        """The URL a client of ``database`` is given: the primary's, or with a standby the
        multi-host URL of both (whichever accepts writes)."""
        if self.standby is None:
            return f"postgresql://postgres@{HOST}:{self.pg.port}/{database}"
        return (
            f"postgresql://postgres@{HOST}:{self.pg.port},{HOST}:{self.standby.port}"
            f"/{database}?target_session_attrs=read-write"
        )

    async def heal(self) -> None:
        """Whatever a scenario left broken on the servers, put right (for the next scenario).

        A primary that died with a standby beside it stays down: started again it would be a
        second primary (split brain), first in every client's multi-host URL. Rebuilding it as
        the new primary's standby is an operator's job (runbooks/database-failover.md)."""
        if self.standby is None and not self.pg.is_running():
            await asyncio.to_thread(self.pg.start)
        if self.rabbits is not None:
            await self.rabbits.heal()
            await self.rabbits.wait_whole()
        elif not self.rabbit.is_running():
            await asyncio.to_thread(self.rabbit.start)
        for kind in list(self.alarms):
            await self.set_alarm(kind, False)

    async def set_alarm(self, kind: AlarmKind, on: bool) -> None:
        """Raise or clear RabbitMQ's memory or disk alarm (both block publishers)."""
        if kind == "memory":
            await asyncio.to_thread(self.rabbit.set_memory_alarm, on)
        else:
            limit = _DISK_LIMIT_ALARM if on else _DISK_LIMIT_NORMAL
            await asyncio.to_thread(self.rabbit.ctl, "set_disk_free_limit", limit)
        if on:
            self.alarms.add(kind)
        else:
            self.alarms.discard(kind)


@dataclass(frozen=True)
class Layout:
    """How many of each process a scenario runs (``apis``: `delivery api` processes, for the
    scenarios that publish over HTTP or hold live-stream clients)."""

    relays: int = 2
    workers: int = 2
    runs: int = 0
    apis: int = 0
    # PostgreSQL as a primary and a synchronous standby (module docstring).
    standby: bool = False

    def slots(self) -> list[tuple[str, Role]]:
        names: list[tuple[str, Role]] = []
        roles: tuple[tuple[Role, int], ...] = (
            ("relay", self.relays),
            ("worker", self.workers),
            ("run", self.runs),
            ("api", self.apis),
        )
        for role, count in roles:
            names += [(f"{role}-{i}", role) for i in range(1, count + 1)]
        return names


@dataclass
class Cluster:
    servers: Servers
    out_dir: Path
    label: str
    layout: Layout = field(default_factory=Layout)
    env: Mapping[str, str] = field(default_factory=dict)

    prefix: str = ""
    database: str = ""
    proxies: dict[str, FaultProxy] = field(default_factory=dict)
    processes: list[ManagedProcess] = field(default_factory=list)
    # `delivery api` processes' HTTP ports, by process name.
    api_ports: dict[str, int] = field(default_factory=dict)

    # -- addresses --------------------------------------------------------------------------

    @property
    def db_url(self) -> str:
        """Direct (unproxied) URL: for the chaos runner's own probes and the checker."""
        return self.servers.pg_url(self.database)

    @property
    def amqp_url(self) -> str:
        return self.servers.amqp_url

    @property
    def names(self) -> Names:
        return Names(self.prefix)

    def api_url(self, name: str = "api-1") -> str:
        """Where the `delivery api` process ``name`` answers HTTP (its port survives restarts)."""
        return f"http://{HOST}:{self.api_ports[name]}"

    def link_db_url(self, client: str) -> str:
        if self.servers.standby is not None:
            return self.db_url  # no proxies in front of a pair (module docstring)
        return self._pg_url(self.proxies[f"pg.{client}"].port)

    def link_amqp_url(self, client: str) -> str:
        """With a cluster, every node's link of ``client`` (``amqp.<client>.n<k>``) in order,
        comma-separated: DELIVERY_AMQP_URL's form for a cluster."""
        if self.servers.rabbits is None:
            return f"amqp://guest:guest@{HOST}:{self.proxies[f'amqp.{client}'].port}/"
        return ",".join(
            f"amqp://guest:guest@{HOST}:{self.proxies[f'amqp.{client}.n{k}'].port}/"
            for k in range(self.servers.rabbit_nodes)
        )

    def _pg_url(self, port: int) -> str:
        return f"postgresql://postgres@{HOST}:{port}/{self.database}"

    # -- life cycle -------------------------------------------------------------------------

    async def start(self) -> None:
        tag = secrets.token_hex(3)
        safe = "".join(c if c.isalnum() else "_" for c in self.label)[:30]
        self.prefix = f"chaos.{safe}.{tag}"
        self.database = f"chaos_{safe}_{tag}".lower()
        await create_database(self.servers.pg_url("postgres"), self.database)
        # DELIVERY_MIGRATIONS_DIR as `delivery migrate` reads it (the processes' own
        # environments are stripped of settings, and they never migrate).
        await migrate(self.db_url, migrations_dir(load_settings(require=()).migrations_dir))
        await self._start_proxies()
        logs = self.out_dir / "logs"
        logs.mkdir(parents=True, exist_ok=True)
        for name, role in self.layout.slots():
            port = free_port()
            env = self._process_env(role, admin_port=port)
            if role == "api":
                self.api_ports[name] = free_port()
                env["DELIVERY_API_PORT"] = str(self.api_ports[name])
            self.processes.append(ManagedProcess(name, role, env, port, logs / f"{name}.log"))

    async def _start_proxies(self) -> None:
        clients = ["producer", *sorted({role for _n, role in self.layout.slots()})]
        for client in clients:
            if self.servers.standby is None:
                self.proxies[f"pg.{client}"] = FaultProxy(
                    f"pg.{client}", HOST, self.servers.pg.port
                )
            if client == "producer":
                continue
            if self.servers.rabbits is None:
                self.proxies[f"amqp.{client}"] = FaultProxy(
                    f"amqp.{client}", HOST, self.servers.rabbit.port
                )
                continue
            for k, node in enumerate(self.servers.rabbits.nodes):
                name = f"amqp.{client}.n{k}"
                self.proxies[name] = FaultProxy(name, HOST, node.port)
        for proxy in self.proxies.values():
            await proxy.start()

    def _process_env(self, role: Role, *, admin_port: int) -> dict[str, str]:
        env = environment_without_settings()
        env.update(PLATFORM_ENV)
        env.update(
            DELIVERY_DATABASE_URL=self.link_db_url(role),
            DELIVERY_AMQP_URL=self.link_amqp_url(role),
            DELIVERY_AMQP_PREFIX=self.prefix,
            DELIVERY_ADMIN_PORT=str(admin_port),
        )
        env.update(self.env)
        return env

    async def start_processes(self, session: aiohttp.ClientSession) -> None:
        await asyncio.gather(*(p.start() for p in self.processes))
        await asyncio.gather(*(p.wait_ready(session, _READY_TIMEOUT_S) for p in self.processes))

    async def stop(self) -> dict[str, int | None]:
        """SIGTERM every process (graceful drain), then close the proxies; exit codes by name."""
        codes = await asyncio.gather(*(p.terminate() for p in self.processes))
        for proc in self.processes:
            proc.close()
        for proxy in self.proxies.values():
            with contextlib.suppress(Exception):
                await proxy.close()
        return {p.name: code for p, code in zip(self.processes, codes, strict=True)}

    async def kill_all(self) -> None:
        """Teardown after a failure: nothing graceful."""
        for proc in self.processes:
            with contextlib.suppress(Exception):
                await proc.kill()
            proc.close()
        for proxy in self.proxies.values():
            with contextlib.suppress(Exception):
                await proxy.close()

    async def dispatch_consumers(self) -> int | None:
        """Consumers on the dispatch queue now (None: the queue or the broker is missing)."""
        return await self._dispatch_queue_fact("consumer_count")

    async def dispatch_depth(self) -> int | None:
        """Messages ready in the dispatch queue now (None: the queue or broker is missing)."""
        return await self._dispatch_queue_fact("message_count")

    async def _dispatch_queue_fact(self, name: str) -> int | None:
        try:
            connection = await aio_pika.connect(self.amqp_url, timeout=10)
        except Exception:
            return None
        async with connection:
            channel = await connection.channel()
            try:
                queue = await channel.declare_queue(self.names.dispatch_queue, passive=True)
            except aio_pika.exceptions.ChannelClosed:
                return None
            value = getattr(queue.declaration_result, name)
            return None if value is None else int(value)

    async def remove(self) -> None:
        """Drop this run's database and broker objects (when the servers outlive the run)."""
        with contextlib.suppress(Exception):
            await drop_database(self.servers.pg_url("postgres"), self.database)
        with contextlib.suppress(Exception):
            connection = await aio_pika.connect(self.amqp_url, timeout=10)
            async with connection:
                await delete(connection, self.names)

    # -- picking things to break ------------------------------------------------------------

    def links(self, selector: str) -> list[FaultProxy]:
        """``"*"``, a service (``"pg"``), or one link (``"amqp.worker"``)."""
        found = [
            p
            for name, p in self.proxies.items()
            if selector in ("*", name) or name.startswith(selector + ".")
        ]
        if not found:
            raise KeyError(f"no link matches {selector!r} (have {sorted(self.proxies)})")
        return found

    def by_role(self, *roles: Role) -> Sequence[ManagedProcess]:
        return [p for p in self.processes if p.role in roles]
