"""The subscription index kept fresh: LISTEN/NOTIFY for each change, a full reload at start,
after a lost LISTEN connection and every ``subscription_resync_s`` (a safety net).

The rule dispatch relies on (migration 0025): every change to what decides a match or a webhook
bumps ``delivery.subscriptions_version`` in its own transaction, and those commit in version
order. Dispatch reads the version in the statement that reads a batch's outbox rows, then asks
``current(conn, version)``: the index is brought to that version first. So an event is matched
against the subscriptions as they were at some moment after its own publish committed; a
subscription created, changed, paused, disabled or removed before the publish committed is
always seen as such. Bringing it there waits for the notifications (at most ``CATCH_UP_S``),
then re-reads the rows they named; if they are late or the LISTEN connection is down, it
reloads everything instead. Circuit and pacing bookkeeping (written by outcomes on every
failure) does not bump the version: it is re-read when its notification arrives, so dispatch
may see it one notification's latency late (it only decides whether a first attempt is made at
once or left to the scheduler, which reads the row itself).

Only dispatch calls ``current``, one batch at a time, so the index has one writer; the listener
only records what changed. Sealed secrets are opened by the worker's ``SecretBox``, which
memoises each sealed value: a reload does not decrypt them again.
"""

from __future__ import annotations

import asyncio
import time

import asyncpg
import structlog

from delivery.aio import wait_any
from delivery.ops import metrics
from delivery.secrets import SecretBox
from delivery.store.listen import Listener
from delivery.store.pool import is_connection_error
from delivery.store.subscriptions import Subscription, select_list
from delivery.worker.index import SubscriptionIndex

log = structlog.get_logger("delivery.feed")

CHANNEL = "delivery_subscriptions"
CATCH_UP_S = 2.0  # how long dispatch waits for late notifications before reloading instead
VERSION = "SELECT version FROM delivery.subscriptions_version"
_ALL = f"SELECT {select_list('s', '')} FROM delivery.subscriptions s WHERE s.state <> 'removed'"
_ALL_IDS = "SELECT id FROM delivery.subscriptions WHERE state <> 'removed'"
_SOME = f"SELECT {select_list('s', '')} FROM delivery.subscriptions s WHERE s.id = ANY($1::text[])"


async def _load(
    conn: asyncpg.Connection, box: SecretBox, ids: list[str] | None
) -> list[Subscription]:
    """The rows (all but removed ones, or those of ``ids``); one that cannot be loaded (a value
    Python cannot hold, like a year-33715 expiry) is skipped, logged and counted instead of
    failing every batch."""
    try:
        rows = await (conn.fetch(_ALL) if ids is None else conn.fetch(_SOME, ids))
        return [Subscription.from_row(r, box=box) for r in rows]
    except Exception as exc:
        if is_connection_error(exc):
            raise
    # One at a time, to find the bad rows (rare: only after a failure like the above).
    loaded = []
    for subscription_id in [r["id"] for r in await conn.fetch(_ALL_IDS)] if ids is None else ids:
        try:
            row = await conn.fetchrow(_SOME, [subscription_id])
            if row is not None:
                loaded.append(Subscription.from_row(row, box=box))
        except Exception as exc:
            if is_connection_error(exc):
                raise
            metrics.SUBSCRIPTIONS_UNLOADABLE.inc()
            log.warning(
                "subscription_unloadable", subscription_id=subscription_id, error=repr(exc)[:200]
            )
    return loaded


class SubscriptionFeed:
    def __init__(self, database_url: str, box: SecretBox, *, resync_s: float) -> None:
        self._box = box
        self._resync_s = resync_s
        self.index = SubscriptionIndex()
        self.version = 0  # every change up to it is applied, or named in _changed
        self._notified_version = 0
        self._changed: set[str] = set()  # ids notified and not re-read yet
        self._reload: str | None = "start"  # why the next ``current`` reloads everything
        self._next_resync_s = 0.0
        self._notified = asyncio.Event()
        self._listener = Listener(
            database_url,
            {CHANNEL: self._on_notification},
            resync=self._on_resync,
            name="subscription_feed",
        )

    def _on_notification(self, payload: str) -> None:
        version, _, subscription_id = payload.partition(" ")
        self._notified_version = max(self._notified_version, int(version))
        self._changed.add(subscription_id)
        self._notified.set()

    def _on_resync(self, reason: str) -> None:
        # Whatever changed before this LISTEN took effect was not notified.
        self._reload = reason

    async def listen(self, stop: asyncio.Event) -> None:
        """Keep the LISTEN connection; each new one is followed by a full reload, for what
        changed while none listened."""
        await self._listener.run(stop)

    async def current(self, conn: asyncpg.Connection, version: int) -> SubscriptionIndex:
        """The index with every subscription change up to ``version`` applied."""
        self.version = max(self.version, self._notified_version)
        if self._reload is None and self.version < version and self._listener.listening:
            metrics.SUBSCRIPTION_INDEX_WAITS.inc()
            deadline = time.monotonic() + CATCH_UP_S
            while self._notified_version < version and time.monotonic() < deadline:
                self._notified.clear()
                await wait_any(self._notified, timeout_s=deadline - time.monotonic())
            self.version = max(self.version, self._notified_version)
        if self._reload is None and time.monotonic() >= self._next_resync_s:
            self._reload = "resync"
        if self._reload is None and self.version < version:
            self._reload = "behind"
        if self._reload is not None:
            await self._reload_all(conn, self._reload)
        if self._changed:
            changed, self._changed = self._changed, set()
            try:
                loaded = {s.id: s for s in await _load(conn, self._box, sorted(changed))}
            except BaseException:
                self._changed |= changed
                raise
            for subscription_id in changed:
                if (sub := loaded.get(subscription_id)) is not None:
                    self.index.put(sub)
                else:  # deleted, or unloadable: matched to nothing, as before
                    self.index.discard(subscription_id)
            metrics.SUBSCRIPTION_INDEX_SIZE.set(len(self.index))
        return self.index

    async def _reload_all(self, conn: asyncpg.Connection, reason: str) -> None:
        # The version and the rows from one snapshot. What is notified meanwhile stays in
        # _changed and is re-read after: harmless if the reload already had it.
        self._reload = None
        try:
            async with conn.transaction(isolation="repeatable_read", readonly=True):
                version = int(await conn.fetchval(VERSION))
                subscriptions = await _load(conn, self._box, None)
        except BaseException:
            self._reload = reason
            raise
        self.index = SubscriptionIndex(subscriptions)
        self.version = max(self.version, version)
        self._next_resync_s = time.monotonic() + self._resync_s
        metrics.SUBSCRIPTION_INDEX_RELOADS.labels(reason).inc()
        metrics.SUBSCRIPTION_INDEX_SIZE.set(len(self.index))
        log.info("subscription_index_loaded", reason=reason, subscriptions=len(subscriptions))
