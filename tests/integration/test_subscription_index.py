"""Each worker matches events from an in-memory subscription index: it follows every change
(create, edit, disable, pause, remove) through LISTEN/NOTIFY, and it never matches an event
against subscriptions older than the event's own publish (the version rule of migration 0025),
whether or not the notification has arrived yet."""

from __future__ import annotations

import asyncio

import asyncpg
import pytest

from delivery import publish_many
from delivery.secrets import NO_KEYS
from delivery.store import pausing, subscriptions
from delivery.store.states import SubscriptionState
from delivery.store.subscription_changes import update
from delivery.testing.factories import add_subscription, trade
from delivery.testing.metrics import counter_value
from delivery.testing.receiver import Receiver
from delivery.testing.waits import wait_until
from delivery.worker.feed import VERSION, SubscriptionFeed
from tests.support import running

pytestmark = pytest.mark.integration

_RELOADS = "delivery_subscription_index_reloads_total"


async def _deliveries(conn: asyncpg.Connection, event_id: str) -> dict[str, str]:
    rows = await conn.fetch(
        "SELECT subscription_id, state FROM delivery.deliveries WHERE event_id = $1", event_id
    )
    return {r["subscription_id"]: r["state"] for r in rows}


async def test_a_running_worker_follows_create_edit_disable_pause_and_remove(settings):
    # No periodic resync within the test: only notifications (and the version) keep it fresh.
    settings = settings.model_copy(update={"subscription_resync_s": 3600.0})
    conn = await asyncpg.connect(settings.database_url)
    async with Receiver() as receiver, running(settings):
        witness = await add_subscription(conn, receiver, "/w", patterns="*", account_id="acc_1")

        async def publish(n: int) -> str:
            event_id = f"evt_ix{n}"
            await publish_many(conn, [trade(n, account="acc_1", id=event_id)])
            # Dispatch handled it once the witness has it (its pairs commit together).
            await receiver.wait_for(
                lambda r: event_id in r.unique_ids("/w"), timeout_s=30, what=event_id
            )
            await wait_until(
                lambda: _deliveries(conn, event_id), timeout_s=10, what=f"{event_id} recorded"
            )
            return event_id

        await publish(0)  # the index is loaded and in use
        reloads = counter_value(_RELOADS, reason="start") + counter_value(_RELOADS, reason="behind")
        # Created: the next event goes to it.
        sub = await add_subscription(conn, receiver, "/s", patterns="trade.*", account_id="acc_1")
        e1 = await publish(1)
        await receiver.wait_for(lambda r: e1 in r.unique_ids("/s"), timeout_s=30, what="created")
        # Edited to patterns that no longer match: nothing more for it.
        await update(conn, sub.id, tenant_id="default", patterns=["account.*"])
        e2 = await publish(2)
        assert sub.id not in await _deliveries(conn, e2)
        await update(conn, sub.id, tenant_id="default", patterns=["trade.*"])
        # Disabled: its events are kept as dead letters, never sent.
        await subscriptions.set_state(conn, sub.id, SubscriptionState.DISABLED)
        e3 = await publish(3)
        assert (await _deliveries(conn, e3))[sub.id] == "dead"
        # Paused: its events wait, pending.
        await subscriptions.set_state(conn, sub.id, SubscriptionState.ACTIVE)
        await pausing.pause(conn, sub.id)
        e4 = await publish(4)
        assert (await _deliveries(conn, e4))[sub.id] == "pending"
        # Removed: matched to nothing.
        await subscriptions.remove(conn, sub.id)
        e5 = await publish(5)
        assert set(await _deliveries(conn, e5)) == {witness.id}
        assert receiver.unique_ids("/s") == {e1}
        # All of it through notifications: no full reload was needed on the way.
        after = counter_value(_RELOADS, reason="start") + counter_value(_RELOADS, reason="behind")
        assert after == reloads
    await conn.close()


async def test_subscriptions_created_right_before_a_publish_always_get_its_event(settings):
    settings = settings.model_copy(update={"subscription_resync_s": 3600.0})
    conn = await asyncpg.connect(settings.database_url)
    async with Receiver() as receiver, running(settings):
        await add_subscription(conn, receiver, "/w", patterns="*", account_id="acc_0")
        await publish_many(conn, [trade(0, account="acc_0", id="evt_warm")])
        await receiver.wait_for(lambda r: r.unique_count("/w") == 1, timeout_s=30, what="warm")
        # Each subscription committed just before its event, in one go: no waiting between.
        for n in range(1, 11):
            await add_subscription(conn, receiver, f"/s{n}", patterns="*", account_id=f"acc_{n}")
            await publish_many(conn, [trade(n, account=f"acc_{n}", id=f"evt_n{n}")])
        await receiver.wait_for(
            lambda r: all(r.unique_ids(f"/s{n}") == {f"evt_n{n}"} for n in range(1, 11)),
            timeout_s=30,
            what="each new subscription's event",
        )
    await conn.close()


async def test_the_index_reaches_the_version_read_with_the_outbox_without_notifications(settings):
    """The rule itself, with no notification to help: the feed's listener is not running, as
    when a notification is late. Given the version read after a commit, it reloads."""
    pool = await asyncpg.create_pool(settings.database_url, min_size=1, max_size=2)
    conn = await asyncpg.connect(settings.database_url)
    feed = SubscriptionFeed(settings.database_url, NO_KEYS, resync_s=3600.0)
    async with pool.acquire() as dispatch_conn:
        index = await feed.current(dispatch_conn, await dispatch_conn.fetchval(VERSION))
        assert len(index) == 0
        sub = await subscriptions.add(conn, url="https://example.com/h", patterns="trade.*")
        version = await dispatch_conn.fetchval(VERSION)
        index = await feed.current(dispatch_conn, version)
        assert [s.id for s in index.match("default", "trade.executed", "acc_9")] == [sub.id]
        # Circuit and pacing bookkeeping (every failure writes it) does not bump the version.
        await conn.execute(
            "UPDATE delivery.subscriptions SET consecutive_failures = 3, paced_until = now()"
        )
        assert await dispatch_conn.fetchval(VERSION) == version
        # A state change does: the index follows it.
        await subscriptions.set_state(conn, sub.id, SubscriptionState.DISABLED)
        index = await feed.current(dispatch_conn, await dispatch_conn.fetchval(VERSION))
        assert index.get(sub.id).state == SubscriptionState.DISABLED  # type: ignore[union-attr]
    await pool.close()
    await conn.close()


async def test_a_lost_listen_connection_is_followed_by_a_full_reload(settings):
    pool = await asyncpg.create_pool(settings.database_url, min_size=1, max_size=2)
    conn = await asyncpg.connect(settings.database_url)
    feed = SubscriptionFeed(settings.database_url, NO_KEYS, resync_s=3600.0)
    stop = asyncio.Event()
    listener = asyncio.create_task(feed.listen(stop))
    try:
        async with pool.acquire() as dispatch_conn:

            async def listening() -> bool:
                return bool(
                    await conn.fetchval(
                        "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database()"
                        " AND query LIKE 'LISTEN %'"
                    )
                )

            await wait_until(listening, timeout_s=10, what="the feed listening")
            # Nothing changed since the load: the index is used as it is, without waiting for
            # notifications (a wait here held every batch for seconds).
            waits = counter_value("delivery_subscription_index_waits_total")
            for _ in range(3):
                await feed.current(dispatch_conn, await dispatch_conn.fetchval(VERSION))
            assert counter_value("delivery_subscription_index_waits_total") == waits
            # A change notified while listening: applied without a reload.
            reconnects = counter_value(_RELOADS, reason="reconnect")
            sub = await subscriptions.add(conn, url="https://example.com/h", patterns="*")

            async def applied() -> bool:
                await feed.current(dispatch_conn, 0)
                return sub.id in feed.index

            await wait_until(applied, timeout_s=10, what="the new subscription notified")
            # When the LISTEN connection is cut, the next use reloads everything.
            await conn.execute(
                "SELECT pg_terminate_backend(pid) FROM pg_stat_activity"
                " WHERE datname = current_database() AND query LIKE 'LISTEN %'"
            )

            async def reloaded() -> bool:
                await feed.current(dispatch_conn, 0)
                return counter_value(_RELOADS, reason="reconnect") > reconnects

            await wait_until(reloaded, timeout_s=15, what="a reload after the reconnect")
            assert sub.id in feed.index
    finally:
        stop.set()
        await asyncio.wait_for(listener, 10)
        await pool.close()
        await conn.close()
