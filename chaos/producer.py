"""Producers: publish events into the outbox at a chosen rate, through the fault proxy, and keep
an exact record of what committed.

Every batch is one ``publish_many`` transaction retried whole on connection-class errors
(``delivery.store.pool.with_retries``). A batch whose COMMIT outcome is unknown is simply tried
again with the same ids: ids already committed come back as duplicates, which proves they
committed.
An id is ``committed`` once a call returns with it (published or duplicate); an id still
unconfirmed when the producer gives up stays ``uncertain`` (Jepsen's indeterminate writes).
"""

from __future__ import annotations

import asyncio
import random
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import asyncpg
import structlog

from delivery.outbox import publish_many
from delivery.store.pool import create_pool, is_connection_error, with_retries

__all__ = ["EventSpec", "Producer", "ProducerRecord"]

log = structlog.get_logger("chaos.producer")

_TYPES: tuple[tuple[str, float], ...] = (
    ("trade.executed", 0.45),
    ("account.balance_changed", 0.30),
    ("trade.cancelled", 0.15),
    ("account.created", 0.07),
    ("account.closed", 0.03),
)
_BATCH_RETRY_DEADLINE_S = 20.0


@dataclass(frozen=True, slots=True)
class EventSpec:
    id: str
    type: str
    account_id: str


@dataclass
class ProducerRecord:
    attempted: dict[str, EventSpec] = field(default_factory=dict)
    committed_at: dict[str, float] = field(default_factory=dict)  # id -> wall time of the ack
    # Ids that came back as duplicates on a retry: their first COMMIT's outcome was unknown.
    recovered_unknown: set[str] = field(default_factory=set)
    transaction_retries: int = 0
    # Errors the platform's with_retries let through although the connection was the problem.
    client_state_errors: int = 0

    @property
    def uncertain(self) -> set[str]:
        return set(self.attempted) - set(self.committed_at)

    def committed_before(self, at: float) -> int:
        return sum(1 for t in self.committed_at.values() if t <= at)


def _data(event_type: str, n: int, rng: random.Random) -> dict[str, Any]:
    if event_type == "trade.executed":
        return {
            "trade_id": f"t{n}",
            "order_id": f"o{n}",
            "instrument": rng.choice(("BTC-USD", "ETH-USD", "EUR-USD")),
            "side": rng.choice(("buy", "sell")),
            "quantity": f"{rng.randint(1, 5000) / 100:.2f}",
            "price": f"{rng.randint(100, 9_000_000) / 100:.2f}",
            "executed_at": "2026-01-01T00:00:00Z",
        }
    if event_type == "trade.cancelled":
        return {"trade_id": f"t{n}", "order_id": f"o{n}", "reason": "user request"}
    if event_type == "account.created":
        return {"owner": f"owner{n}", "currency": "USD"}
    if event_type == "account.balance_changed":
        return {
            "asset": "USD",
            "delta": f"-{rng.randint(1, 999) / 100:.2f}",
            "balance": f"{rng.randint(0, 10**7) / 100:.2f}",
            "reason": rng.choice(("deposit", "withdrawal", "trade", "fee", "adjustment")),
        }
    return {"reason": "closed by chaos"}


class _Pacer:
    """Hands out event numbers 0..total-1 at ``rate`` per second (changeable at any time).

    Credit accrues with time; a producer blocked by a fault finds its backlog of credit when it
    comes back and catches up in full batches, as a real producer with queued work would.
    """

    def __init__(self, total: int, rate: float) -> None:
        self.total = total
        self.rate = rate
        self._next = 0
        self._credit = 0.0
        self._at = time.monotonic()

    @property
    def exhausted(self) -> bool:
        return self._next >= self.total

    async def take(self, max_n: int) -> range:
        while True:
            now = time.monotonic()
            self._credit = min(self._credit + (now - self._at) * self.rate, self.rate * 30)
            self._at = now
            left = self.total - self._next
            if left <= 0:
                return range(0)
            n = min(int(self._credit), max_n, left)
            if n >= 1:
                self._credit -= n
                start, self._next = self._next, self._next + n
                return range(start, start + n)
            await asyncio.sleep(max((1 - self._credit) / self.rate, 0.002))


class Producer:
    """``streams`` concurrent producers, each owning its accounts (no lock contention between
    streams, so per-account order is the commit order of one stream)."""

    def __init__(
        self,
        db_url: str,
        *,
        key: str,
        total: int,
        rate: float,
        seed: int,
        streams: int = 4,
        accounts_per_stream: int = 5,
        batch_max: int = 20,
    ) -> None:
        self._db_url = db_url
        self._key = key
        self._seed = seed
        self._streams = streams
        self._accounts_per_stream = accounts_per_stream
        self._batch_max = batch_max
        self.pacer = _Pacer(total, rate)
        self.base_rate = rate
        self.record = ProducerRecord()
        self.done = asyncio.Event()
        self.started_at = 0.0
        self.finished_at = 0.0
        self.on_commit: Callable[[int], None] = lambda _n: None

    @property
    def total(self) -> int:
        return self.pacer.total

    def set_rate(self, rate: float) -> None:
        self.pacer.rate = rate

    def event_id(self, n: int) -> str:
        return f"{self._key}-{n:07d}"

    def spec(self, n: int, stream: int, rng: random.Random) -> EventSpec:
        kinds, weights = zip(*_TYPES, strict=True)
        event_type = rng.choices(kinds, weights)[0]
        account = f"acc-{stream}-{n % self._accounts_per_stream}"
        return EventSpec(self.event_id(n), event_type, account)

    async def run(self, give_up_at: float) -> None:
        """Publish everything (or until the wall-clock ``give_up_at``); sets ``done``."""
        self.started_at = time.time()
        pool = await _connect_pool(self._db_url, give_up_at)
        try:
            async with asyncio.TaskGroup() as tg:
                for stream in range(self._streams):
                    tg.create_task(self._stream(pool, stream, give_up_at))
        finally:
            self.finished_at = time.time()
            self.done.set()
            await pool.close()

    async def _stream(self, pool: asyncpg.Pool, stream: int, give_up_at: float) -> None:
        rng = random.Random(f"{self._seed}-{stream}")
        while time.time() < give_up_at:
            numbers = await self.pacer.take(self._batch_max)
            if not numbers:
                return
            specs = [self.spec(n, stream, rng) for n in numbers]
            events = [
                {
                    "id": s.id,
                    "type": s.type,
                    "account_id": s.account_id,
                    "data": _data(s.type, n, rng),
                }
                for s, n in zip(specs, numbers, strict=True)
            ]
            for spec in specs:
                self.record.attempted[spec.id] = spec
            await self._publish(pool, events, give_up_at)

    async def _publish(
        self, pool: asyncpg.Pool, events: list[dict[str, Any]], give_up_at: float
    ) -> None:
        tries = 0
        while time.time() < give_up_at:
            tries += 1
            try:
                result = await with_retries(
                    pool,
                    lambda conn: publish_many(conn, events),
                    deadline_s=min(_BATCH_RETRY_DEADLINE_S, max(give_up_at - time.time(), 1.0)),
                    what="chaos_produce",
                )
            except Exception as exc:
                if isinstance(exc, asyncpg.InternalClientError):
                    # Platform finding: after a server restart a pooled connection can come
                    # back half-used ("another operation is in progress"); with_retries does
                    # not retry that, and its expire_connections() call is never awaited.
                    self.record.client_state_errors += 1
                    await pool.expire_connections()
                elif not is_connection_error(exc):
                    raise
                self.record.transaction_retries += 1
                log.warning("produce_retry", error=repr(exc)[:200], tries=tries)
                await asyncio.sleep(0.2)
                continue
            now = time.time()
            for event_id in (*result.published, *result.duplicates):
                self.record.committed_at.setdefault(event_id, now)
            # A duplicate of our own fresh id: an earlier COMMIT whose answer we never got.
            self.record.recovered_unknown.update(result.duplicates)
            self.on_commit(len(events))
            return


async def _connect_pool(db_url: str, give_up_at: float) -> asyncpg.Pool:
    while True:
        try:
            return await create_pool(db_url, min_size=1, max_size=8)
        except Exception as exc:
            if not is_connection_error(exc) or time.time() > give_up_at:
                raise
            await asyncio.sleep(0.2)
