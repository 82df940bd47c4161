"""One shared feed of newly committed outbox rows per ``delivery api`` process, fanned out to
its stream clients.

One connection LISTENs on ``delivery_outbox`` (the relay's wake-up, sent at commit) and one
task reads the new rows (``store.stream_reads.read_new``: by writing transaction, so a row
whose lower pk commits late is not skipped) and renders each once. Offering a frame to a
client never waits: a client whose buffer is full is marked behind and closed by its own
handler, so a slow client slows neither the others nor the webhook path (the feed only reads).
"""

from __future__ import annotations

import asyncio
import contextlib
from collections import deque
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

import asyncpg
import structlog
from aiohttp import web

from delivery.aio import wait_any
from delivery.api.stream_protocol import Subscription
from delivery.events import envelope_from_row, render_body
from delivery.ops import metrics
from delivery.settings import Settings
from delivery.store import stream_reads
from delivery.store.listen import Listener

log = structlog.get_logger("delivery.api.feed")

NOTIFY_CHANNEL = "delivery_outbox"
# Reads happen on every NOTIFY; this fallback catches a notification lost with the connection
# and the rows of a transaction that was still running at the previous read.
_POLL_FALLBACK_S = 1.0


@dataclass(frozen=True, slots=True)
class Frame:
    account_id: str
    sequence: int
    type: str
    text: str  # the webhook body, rendered once for every client
    created_at_s: float  # the outbox commit (created_at), for delivery_stream_frame_lag_seconds


@dataclass(eq=False)
class Client:
    """One connection's bounded buffer of frames, filled by the feed."""

    tenant_id: str
    subscription: Subscription
    limit: int
    frames: deque[Frame] = field(default_factory=deque)
    ready: asyncio.Event = field(default_factory=asyncio.Event)  # frames are waiting
    fell_behind: asyncio.Event = field(default_factory=asyncio.Event)

    @property
    def behind(self) -> bool:
        return self.fell_behind.is_set()

    def offer(self, frame: Frame) -> None:
        if self.behind or not self.subscription.wants(frame.account_id, frame.type):
            return
        if len(self.frames) >= self.limit:
            self.fell_behind.set()
            self.frames.clear()  # its memory goes now; the client resumes with `after`
            return
        self.frames.append(frame)
        self.ready.set()


class Feed:
    def __init__(self, settings: Settings, pool: asyncpg.Pool) -> None:
        self._settings = settings
        self._pool = pool
        self._clients: dict[str, set[Client]] = {}
        # Who gets a row, found without asking every client of the tenant: with 1,000 clients
        # of one account each, offering every row to all of them cost ~1,000 calls per row.
        self._by_account: dict[tuple[str, str], set[Client]] = {}  # (tenant, account)
        self._every_account: dict[str, set[Client]] = {}  # tenant -> clients of all accounts
        self._wake = asyncio.Event()
        # Set when the process stops: every stream handler closes its client (1001) and ends.
        self.closing = asyncio.Event()

    def count(self, tenant_id: str) -> int:
        return len(self._clients.get(tenant_id, ()))

    def admit(self, client: Client) -> bool:
        """Register ``client`` unless its tenant is at its client limit."""
        clients = self._clients.setdefault(client.tenant_id, set())
        if len(clients) >= self._settings.stream_max_clients_per_tenant:
            return False
        clients.add(client)
        for index, key in self._index_keys(client):
            index.setdefault(key, set()).add(client)
        metrics.STREAM_CLIENTS.inc()
        return True

    def leave(self, client: Client) -> None:
        clients = self._clients.get(client.tenant_id)
        if clients is not None and client in clients:
            clients.discard(client)
            for index, key in self._index_keys(client):
                listed = index[key]
                listed.discard(client)
                if not listed:
                    del index[key]
            metrics.STREAM_CLIENTS.dec()
            if not clients:
                del self._clients[client.tenant_id]

    def _index_keys(self, client: Client) -> list[tuple[dict[Any, set[Client]], Any]]:
        """Where ``client`` is listed: under each of its accounts, or as a client of all."""
        accounts = client.subscription.accounts
        if accounts is None:
            return [(self._every_account, client.tenant_id)]
        return [(self._by_account, (client.tenant_id, a)) for a in accounts]

    async def run(self, stop: asyncio.Event) -> None:
        async with asyncio.TaskGroup() as tasks:
            listener = Listener(
                self._settings.database_url,
                {NOTIFY_CHANNEL: lambda _payload: self._wake.set()},
                resync=lambda _reason: self._wake.set(),  # rows committed while not listening
                name="stream_feed",
            )
            tasks.create_task(listener.run(stop))
            tasks.create_task(self._read(stop))

    async def _read(self, stop: asyncio.Event) -> None:
        horizon: int | None = None
        passed: dict[int, int] = {}  # pk -> tx of rows already fanned out, tx >= horizon
        while not stop.is_set():
            try:
                async with self._pool.acquire() as conn:
                    if horizon is None:
                        horizon = await stream_reads.horizon(conn)
                    read = await stream_reads.read_new(conn, horizon)
            except Exception as exc:  # the database is away: the next wake or poll tries again
                log.warning("stream_feed_read_failed", error=repr(exc)[:300])
                await wait_any(stop, timeout_s=_POLL_FALLBACK_S)
                continue
            for row in read.rows:
                if row["pk"] in passed:
                    continue
                passed[row["pk"]] = int(row["tx"])
                self._fan_out(row)
            horizon = read.horizon
            for pk in [pk for pk, tx in passed.items() if tx < horizon]:
                del passed[pk]
            await wait_any(stop, self._wake, timeout_s=_POLL_FALLBACK_S)
            self._wake.clear()

    def _fan_out(self, row: Any) -> None:
        tenant_id = row["tenant_id"]
        of_account = self._by_account.get((tenant_id, row["account_id"]), ())
        of_all = self._every_account.get(tenant_id, ())
        if not of_account and not of_all:
            return
        frame = Frame(
            row["account_id"],
            row["sequence"],
            row["type"],
            render_body(envelope_from_row(row)).decode(),
            row["created_at_s"],
        )
        for client in of_account:
            client.offer(frame)
        for client in of_all:
            client.offer(frame)


FEED = web.AppKey("stream_feed", Feed)


@contextlib.asynccontextmanager
async def running_feed(settings: Settings, pool: asyncpg.Pool) -> AsyncIterator[Feed]:
    """The feed, reading until the block ends."""
    feed = Feed(settings, pool)
    stop = asyncio.Event()
    task = asyncio.create_task(feed.run(stop), name="stream-feed")
    try:
        yield feed
    finally:
        feed.closing.set()
        stop.set()
        await task
