"""The systems under test behind one interface, each run as real subprocesses.

* ``Ours``: ``python -m delivery run`` (or one relay + N ``delivery worker``); its entry point is
  the outbox (``delivery.publish_many``), so its path is outbox -> relay -> RabbitMQ -> dispatch
  -> delivery.
* ``AsyncioPeer``, ``CeleryPeer``, ``DramatiqPeer``: their entry point is their RabbitMQ queue.

Every system gets its own database and queue names (a random tag), a fresh receiver process,
and is torn down completely (processes, database, queues) afterwards.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import secrets
import shutil
import signal
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

import aio_pika
import aiohttp
import asyncpg
import orjson

from bench.measure import tree_pids
from bench.peers.common import SCHEMA, PeerConfig
from delivery.events import Envelope, NewEvent, parse_event, render_body
from delivery.outbox import publish_many
from delivery.signing import generate_secret
from delivery.store import subscriptions
from delivery.store.migrations import migrate
from delivery.testing.services import create_database, drop_database

REPO = Path(__file__).resolve().parent.parent
WARMUP_EVENTS = 20
START_TIMEOUT_S = 90.0
STOP_TIMEOUT_S = 30.0
# Long enough that a worker paused (SIGSTOP) while its backlog is staged keeps its broker link.
AMQP_HEARTBEAT_S = 120
PACED_PRODUCERS = 8


def with_heartbeat(url: str, heartbeat_s: int = AMQP_HEARTBEAT_S) -> str:
    parts = urlsplit(url)
    query = dict(parse_qsl(parts.query))
    query.setdefault("heartbeat", str(heartbeat_s))
    return urlunsplit(parts._replace(query=urlencode(query)))


# -- workload -------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Event:
    id: str
    raw: dict[str, Any]  # what a producer hands to ``delivery.publish``
    body: bytes  # the envelope a subscriber receives (for the peers: what they POST)


def make_workload(n: int, tag: str) -> list[Event]:
    """``n`` realistic ~500-byte trade/account events with known ids."""
    from bench.e2e import make_events

    out: list[Event] = []
    for i, produced in enumerate(make_events(n)):
        raw = {**produced, "id": f"evt_{tag}_{i:07d}"}
        new: NewEvent = parse_event(raw)
        envelope = Envelope(new.id, new.type, new.account_id, i + 1, new.occurred_at, new.data)
        out.append(Event(new.id, raw, render_body(envelope)))
    return out


# -- the receiver process -------------------------------------------------------------------


class ReceiverProcess:
    """``python -m bench.receiver`` in its own process, and a client for its control API."""

    def __init__(self, secret: str, log_dir: Path) -> None:
        self.secret = secret
        self._log_dir = log_dir
        self._proc: asyncio.subprocess.Process | None = None
        self.port = 0
        self._http: aiohttp.ClientSession | None = None

    async def start(self) -> None:
        with open(self._log_dir / "receiver.log", "ab") as log:  # noqa: ASYNC230
            self._proc = await asyncio.create_subprocess_exec(
                sys.executable,
                "-m",
                "bench.receiver",
                "--secret",
                self.secret,
                cwd=REPO,
                env=_env(),
                stdout=asyncio.subprocess.PIPE,
                stderr=log,
                start_new_session=True,
            )
        assert self._proc.stdout is not None
        line = await asyncio.wait_for(self._proc.stdout.readline(), 30)
        if not line.startswith(b"READY "):
            raise RuntimeError(f"bench receiver did not start: {line!r}")
        self.port = int(line.split()[1])
        self._http = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=None))

    def url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.port}{path}"

    @property
    def pid(self) -> int:
        assert self._proc is not None
        return self._proc.pid

    async def _get(self, what: str, **query: object) -> Any:
        assert self._http is not None
        async with self._http.get(self.url(f"/_bench/{what}"), params=query) as r:
            r.raise_for_status()
            return orjson.loads(await r.read())

    async def stats(self) -> dict[str, Any]:
        return dict(await self._get("stats"))

    async def wait(self, count: int, timeout_s: float, what: str) -> dict[str, Any]:
        stats = await self._get("wait", count=count, timeout_s=timeout_s)
        if stats["count"] < count:
            raise TimeoutError(f"{what}: {stats['count']} of {count} arrived in {timeout_s:g}s")
        return dict(stats)

    async def arrivals(self) -> list[tuple[str, str, float]]:
        return [tuple(a) for a in await self._get("arrivals")]

    async def reset(self) -> None:
        assert self._http is not None
        async with self._http.post(self.url("/_bench/reset")) as r:
            r.raise_for_status()

    async def stop(self) -> None:
        if self._http is not None:
            await self._http.close()
        if self._proc is not None:
            await _terminate([self._proc])


# -- process helpers ------------------------------------------------------------------------


def _env(extra: dict[str, str] | None = None) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("DELIVERY_", "BENCH_"))}
    env["PYTHONPATH"] = str(REPO) + (
        os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else ""
    )
    env.update(extra or {})
    return env


async def _spawn(args: Sequence[str], env: dict[str, str], log: Path) -> asyncio.subprocess.Process:
    with open(log, "ab") as out:  # noqa: ASYNC230
        return await asyncio.create_subprocess_exec(
            *args,
            cwd=REPO,
            env=env,
            stdout=out,
            stderr=out,
            stdin=asyncio.subprocess.DEVNULL,
            start_new_session=True,
        )


async def _terminate(procs: Sequence[asyncio.subprocess.Process]) -> None:
    for p in procs:
        if p.returncode is None:
            _signal_tree(p.pid, signal.SIGCONT)  # a paused tree cannot act on SIGTERM
            with contextlib.suppress(ProcessLookupError):
                p.send_signal(signal.SIGTERM)
    for p in procs:
        try:
            await asyncio.wait_for(p.wait(), STOP_TIMEOUT_S)
        except TimeoutError:
            _signal_tree(p.pid, signal.SIGKILL)
            with contextlib.suppress(Exception):
                await asyncio.wait_for(p.wait(), 10)


def _signal_tree(root: int, sig: signal.Signals) -> None:
    for pid in tree_pids([root]):
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, sig)


# -- the systems ----------------------------------------------------------------------------


class System:
    """One system under test, set up for one measurement session."""

    name: ClassVar[str]
    label: ClassVar[str]

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

    def pause(self) -> None:
        for p in self.procs:
            _signal_tree(p.pid, signal.SIGSTOP)

    def resume(self) -> None:
        for p in self.procs:
            _signal_tree(p.pid, signal.SIGCONT)

    async def setup(self, *, processes: int = 1, fanout: int = 1, start: bool = True) -> None:
        self.fanout = fanout
        await self.receiver.start()
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
        await _terminate(self.procs)
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


async def _paced(
    events: Sequence[Event], rate: float, publish_one: Callable[[Event], Awaitable[None]]
) -> dict[str, float]:
    published: dict[str, float] = {}
    started = time.time()
    for i, event in enumerate(events):
        if rate:
            delay = started + i / rate - time.time()
            if delay > 0:
                await asyncio.sleep(delay)
        await publish_one(event)
        published[event.id] = time.time()
    return published


def _paced_sync(
    events: Sequence[Event], rate: float, publish_one: Callable[[Event], None]
) -> dict[str, float]:
    published: dict[str, float] = {}
    started = time.time()
    for i, event in enumerate(events):
        if rate:
            delay = started + i / rate - time.time()
            if delay > 0:
                time.sleep(delay)
        publish_one(event)
        published[event.id] = time.time()
    return published


class Ours(System):
    name = "ours"
    label = "ours (delivery run)"

    def __init__(self, *args: Any, split: bool = False, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.split = split  # one `delivery relay` + N `delivery worker` instead of N `run`
        self.processes = 1
        self.extra_env: dict[str, str] = {}

    def describe(self) -> str:
        if self.split:
            return f"ours (1 relay + {self.processes} worker)"
        return f"ours ({self.processes} x delivery run)"

    async def prepare_database(self) -> None:
        assert self.conn is not None
        await migrate(self.db_url)
        for k in range(self.fanout):
            await subscriptions.add(
                self.conn, url=self.receiver.url(f"/s{k}"), patterns="*", secret=self.secret
            )

    def process_env(self) -> dict[str, str]:
        return _env(
            {
                "DELIVERY_DATABASE_URL": self.db_url,
                "DELIVERY_AMQP_URL": self.amqp_url,
                "DELIVERY_AMQP_PREFIX": self.prefix,
                "DELIVERY_ADMIN_PORT": "0",
                "DELIVERY_LOG_LEVEL": "warning",
                "DELIVERY_LOG_FORMAT": "json",
                **self.extra_env,
            }
        )

    async def start_processes(self, processes: int) -> None:
        self.processes = processes
        env = self.process_env()
        roles = ["relay"] + ["worker"] * processes if self.split else ["run"] * processes
        for i, role in enumerate(roles):
            self.procs.append(
                await _spawn(
                    [sys.executable, "-m", "delivery", role],
                    env,
                    self.log_dir / f"ours-{role}-{i}.log",
                )
            )

    async def publish(self, events: Sequence[Event], rate: float) -> dict[str, float]:
        assert self.conn is not None
        conn = self.conn
        if rate:
            return await self._publish_paced(events, rate)
        published: dict[str, float] = {}
        for start in range(0, len(events), 1000):
            chunk = events[start : start + 1000]
            await publish_many(conn, [e.raw for e in chunk])
            published.update(dict.fromkeys((e.id for e in chunk), time.time()))
        return published

    async def _publish_paced(self, events: Sequence[Event], rate: float) -> dict[str, float]:
        """Producers committing one event per transaction, as an order service would. Several
        connections share the schedule (event i is due at i / rate), so the three round trips
        of a commit never hold the next event back."""
        conns = [await asyncpg.connect(self.db_url) for _ in range(PACED_PRODUCERS)]
        published: dict[str, float] = {}
        started = time.time() + 0.05

        async def producer(k: int) -> None:
            for i in range(k, len(events), PACED_PRODUCERS):
                delay = started + i / rate - time.time()
                if delay > 0:
                    await asyncio.sleep(delay)
                await publish_many(conns[k], [events[i].raw])
                published[events[i].id] = time.time()

        try:
            async with asyncio.TaskGroup() as tg:
                for k in range(PACED_PRODUCERS):
                    tg.create_task(producer(k))
        finally:
            for c in conns:
                await c.close()
        return published

    async def stages(
        self, published: dict[str, float], arrived: dict[str, float]
    ) -> dict[str, list[float]]:
        """Where an event's latency went, per stage (ms), from the rows' timestamps: commit ->
        relay marked it published (after the broker's confirm) -> dispatch inserted its inbox
        row -> the attempt started -> the subscriber got the POST -> the outcome committed."""
        assert self.conn is not None
        rows = await self.conn.fetch(
            """
            SELECT o.event_id, extract(epoch FROM o.published_at) AS published_at,
                   extract(epoch FROM i.received_at) AS inbox_at,
                   extract(epoch FROM d.first_attempt_at) AS attempt_at,
                   extract(epoch FROM d.delivered_at) AS delivered_at
            FROM delivery.outbox o
            JOIN delivery.inbox i USING (event_id)
            JOIN delivery.deliveries d USING (event_id)
            WHERE o.event_id = ANY($1::text[])
            """,
            list(published),
        )
        names = (
            "commit → relayed",
            "relayed → dispatched",
            "dispatched → attempt",
            "attempt → arrival",
            "arrival → outcome committed",
        )
        stages: dict[str, list[float]] = {n: [] for n in names}
        for r in rows:
            points = [
                published[r["event_id"]],
                float(r["published_at"]),
                float(r["inbox_at"]),
                float(r["attempt_at"]),
                arrived[r["event_id"]],
                float(r["delivered_at"]),
            ]
            for name, a, b in zip(names, points, points[1:], strict=False):
                stages[name].append((b - a) * 1000)
        return stages

    async def recorded(self) -> int:
        assert self.conn is not None
        return int(
            await self.conn.fetchval(
                "SELECT count(*) FROM delivery.deliveries WHERE state = 'delivered'"
            )
        )

    def queues(self) -> list[str]:
        return [f"{self.prefix}.dispatch", f"{self.prefix}.dispatch.dead"]

    def exchanges(self) -> list[str]:
        return [f"{self.prefix}.events", f"{self.prefix}.dead"]


class _Peer(System):
    def config(self) -> PeerConfig:
        return PeerConfig(
            database_url=self.db_url,
            amqp_url=self.amqp_url,
            queue=f"{self.prefix}.queue",
            target_url=self.receiver.url("/s0"),
            secret=self.secret,
            concurrency=32,
            prefetch=100,
        )

    async def prepare_database(self) -> None:
        assert self.conn is not None
        await self.conn.execute(SCHEMA)

    async def recorded(self) -> int:
        assert self.conn is not None
        return int(await self.conn.fetchval("SELECT count(*) FROM bench_deliveries"))

    def queues(self) -> list[str]:
        return [self.config().queue]


class AsyncioPeer(_Peer):
    name = "asyncio"
    label = "hand-written asyncio (aio-pika + aiohttp + asyncpg)"

    async def start_processes(self, processes: int) -> None:
        config = self.config()
        self._amqp = await aio_pika.connect(self.amqp_url)
        self._channel = await self._amqp.channel(publisher_confirms=False)
        await self._channel.declare_queue(config.queue, durable=True)
        self.procs.append(
            await _spawn(
                [sys.executable, "-m", "bench.peers.asyncio_peer"],
                _env(config.env()),
                self.log_dir / "asyncio.log",
            )
        )

    async def publish(self, events: Sequence[Event], rate: float) -> dict[str, float]:
        exchange = self._channel.default_exchange
        queue = self.config().queue

        async def one(event: Event) -> None:
            await exchange.publish(
                aio_pika.Message(
                    event.body,
                    message_id=event.id,
                    content_type="application/json",
                    delivery_mode=aio_pika.DeliveryMode.PERSISTENT,
                ),
                routing_key=queue,
            )

        return await _paced(events, rate, one)

    async def teardown(self, *, keep_logs: bool = False) -> None:
        if getattr(self, "_amqp", None) is not None:
            with contextlib.suppress(Exception):
                await self._amqp.close()
        await super().teardown(keep_logs=keep_logs)


class CeleryPeer(_Peer):
    name = "celery"
    label = "Celery (prefork, acks_late, concurrency 4)"

    async def start_processes(self, processes: int) -> None:
        from bench.peers.celery_peer import make_app

        config = self.config()
        self._app = make_app(self.amqp_url, config.queue)
        self._app.conf.worker_enable_remote_control = False
        env = _env({**config.env(), "CELERY_WORKER_ENABLE_REMOTE_CONTROL": "false"})
        self.procs.append(
            await _spawn(
                [
                    sys.executable,
                    "-m",
                    "celery",
                    "-A",
                    "bench.peers.celery_peer",
                    "worker",
                    "-P",
                    "prefork",
                    "-c",
                    "4",
                    "-Q",
                    config.queue,
                    "-l",
                    "warning",
                    "--without-gossip",
                    "--without-mingle",
                    "--without-heartbeat",
                    "-n",
                    f"{self.prefix}@%h",
                ],
                env,
                self.log_dir / "celery.log",
            )
        )

    async def publish(self, events: Sequence[Event], rate: float) -> dict[str, float]:
        from bench.peers.celery_peer import TASK_NAME

        queue = self.config().queue
        app = self._app

        def run() -> dict[str, float]:
            with app.producer_or_acquire() as producer:

                def one(event: Event) -> None:
                    app.send_task(
                        TASK_NAME,
                        args=[event.id, event.body.decode()],
                        queue=queue,
                        producer=producer,
                    )

                return _paced_sync(events, rate, one)

        return await asyncio.to_thread(run)

    def exchanges(self) -> list[str]:
        return [self.config().queue]

    async def teardown(self, *, keep_logs: bool = False) -> None:
        await super().teardown(keep_logs=keep_logs)
        if getattr(self, "_app", None) is not None:
            with contextlib.suppress(Exception):
                self._app.close()


class DramatiqPeer(_Peer):
    name = "dramatiq"
    label = "Dramatiq (RabbitmqBroker, 4 processes x 8 threads)"

    async def start_processes(self, processes: int) -> None:
        config = self.config()
        self.procs.append(
            await _spawn(
                [
                    sys.executable,
                    "-m",
                    "dramatiq",
                    "bench.peers.dramatiq_peer",
                    "--processes",
                    "4",
                    "--threads",
                    "8",
                    "--queues",
                    config.queue,
                ],
                _env(config.env()),
                self.log_dir / "dramatiq.log",
            )
        )
        self._executor_broker = None

    def _broker(self) -> Any:
        if self._executor_broker is None:
            from dramatiq.brokers.rabbitmq import RabbitmqBroker

            self._executor_broker = RabbitmqBroker(url=self.amqp_url)
        return self._executor_broker

    async def publish(self, events: Sequence[Event], rate: float) -> dict[str, float]:
        from dramatiq import Message

        from bench.peers.dramatiq_peer import ACTOR_NAME

        queue = self.config().queue

        def run() -> dict[str, float]:
            broker = self._broker()

            def one(event: Event) -> None:
                broker.enqueue(
                    Message(
                        queue_name=queue,
                        actor_name=ACTOR_NAME,
                        args=(event.id, event.body.decode()),
                        kwargs={},
                        options={},
                    )
                )

            return _paced_sync(events, rate, one)

        # Dramatiq's broker keeps a channel per thread: always publish from the same one.
        return await asyncio.get_running_loop().run_in_executor(self._executor(), run)

    def _executor(self) -> Any:
        from concurrent.futures import ThreadPoolExecutor

        if getattr(self, "_pool", None) is None:
            self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="dramatiq-pub")
        return self._pool

    def queues(self) -> list[str]:
        q = self.config().queue
        return [q, f"{q}.DQ", f"{q}.XQ"]

    async def teardown(self, *, keep_logs: bool = False) -> None:
        broker = getattr(self, "_executor_broker", None)
        if broker is not None:
            with contextlib.suppress(Exception):
                await asyncio.get_running_loop().run_in_executor(self._executor(), broker.close)
        if getattr(self, "_pool", None) is not None:
            self._pool.shutdown(wait=False)
        await super().teardown(keep_logs=keep_logs)


SYSTEMS: dict[str, type[System]] = {
    s.name: s for s in (Ours, AsyncioPeer, DramatiqPeer, CeleryPeer)
}
