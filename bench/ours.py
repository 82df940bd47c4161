"""Ours as a system under test: ``python -m delivery run`` (or one relay + N ``delivery worker``).
Its entry point is the outbox (``delivery.publish_many``), so its path is outbox -> relay ->
RabbitMQ -> dispatch -> delivery."""

from __future__ import annotations

import asyncio
import sys
import time
from collections.abc import Sequence
from typing import Any

import asyncpg

from bench.processes import env, spawn
from bench.system import System
from bench.workload import Event
from delivery.outbox import publish_many
from delivery.store import subscriptions
from delivery.store.migrations import migrate

PACED_PRODUCERS = 8


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
                self.conn,
                url=self.receiver.url(self.subscriber_path(k)),
                patterns="*",
                secret=self.secret,
            )

    def process_env(self) -> dict[str, str]:
        return env(
            {
                "DELIVERY_DATABASE_URL": self.db_url,
                "DELIVERY_AMQP_URL": self.amqp_url,
                "DELIVERY_AMQP_PREFIX": self.prefix,
                "DELIVERY_ADMIN_PORT": "0",
                "DELIVERY_LOG_LEVEL": "warning",
                "DELIVERY_LOG_FORMAT": "json",
                # The bench's subscribers listen on 127.0.0.1 (the SSRF guard refuses it).
                "DELIVERY_ALLOW_PRIVATE_TARGETS": "true",
                **self.extra_env,
            }
        )

    async def start_processes(self, processes: int) -> None:
        self.processes = processes
        environ = self.process_env()
        roles = ["relay"] + ["worker"] * processes if self.split else ["run"] * processes
        for i, role in enumerate(roles):
            self.procs.append(
                await spawn(
                    [sys.executable, "-m", "delivery", role],
                    environ,
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
