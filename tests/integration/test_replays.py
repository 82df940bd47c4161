"""Replay of a time window through the real pipeline: each matching event committed in the
window reaches the subscription again with its webhook-id, none outside it; a subscription
made afterwards gets the window's events it never had; oversized windows are refused whole."""

from __future__ import annotations

from collections import Counter
from datetime import UTC, datetime, timedelta

import asyncpg
import pytest

from delivery import publish_many
from delivery.errors import InputError, NotFoundError
from delivery.store import replays, subscriptions
from delivery.store.states import SubscriptionState
from delivery.testing.factories import add_subscription, balance, trade
from delivery.testing.receiver import Receiver
from tests.support import run_until_idle

pytestmark = pytest.mark.integration


async def _publish(conn: asyncpg.Connection, events: list[dict[str, object]]) -> None:
    async with conn.transaction():
        await publish_many(conn, events)


async def test_a_window_is_sent_again_with_the_same_ids_and_nothing_outside_it(settings):
    conn = await asyncpg.connect(settings.database_url)
    async with Receiver() as receiver:
        # Given a subscription to trades, and events before, inside and after a window
        trades = await add_subscription(conn, receiver, "/trades", patterns="trade.*")
        await _publish(conn, [trade(1, id="evt_before_t"), balance(1, id="evt_before_b")])
        since = await conn.fetchval("SELECT clock_timestamp()")
        await _publish(
            conn,
            [
                trade(2, id="evt_in_t1"),
                balance(2, id="evt_in_b1"),
                trade(3, account="acc_2", id="evt_in_t2"),
                balance(3, account="acc_2", id="evt_in_b2"),
            ],
        )
        until = await conn.fetchval("SELECT clock_timestamp()")
        await _publish(conn, [trade(4, id="evt_after_t")])
        await run_until_idle(settings)
        assert receiver.unique_ids("/trades") == {
            "evt_before_t", "evt_in_t1", "evt_in_t2", "evt_after_t"
        }
        # ... and one for account acc_2 made only afterwards (it never had a delivery)
        late = await add_subscription(conn, receiver, "/late", patterns="*", account_id="acc_2")

        # When the window is replayed to each
        assert await replays.replay_window(conn, trades.id, since, until) == 2
        assert await replays.replay_window(conn, late.id, since, until) == 2
        await run_until_idle(settings)

        # Then each matching event of the window arrived again, with its webhook-id; none
        # outside the window, and none that does not match
        counts = Counter(a.webhook_id for a in receiver.delivered("/trades"))
        assert counts == {"evt_before_t": 1, "evt_in_t1": 2, "evt_in_t2": 2, "evt_after_t": 1}
        assert Counter(a.webhook_id for a in receiver.delivered("/late")) == {
            "evt_in_t2": 1,
            "evt_in_b2": 1,
        }
        assert all(a.signature_ok for a in receiver.arrivals)
        # The replayed delivery started a fresh schedule: one attempt since the replay.
        attempts = await conn.fetchval(
            "SELECT attempts FROM delivery.deliveries"
            " WHERE event_id = 'evt_in_t1' AND subscription_id = $1",
            trades.id,
        )
        assert attempts == 1
    await conn.close()


async def test_windows_that_are_too_big_or_wrong_are_refused_and_replay_nothing(
    settings, monkeypatch
):
    conn = await asyncpg.connect(settings.database_url)
    try:
        sub = await subscriptions.add(conn, url="http://127.0.0.1:9/h", patterns="*")
        await _publish(conn, [trade(i) for i in range(3)])
        now = datetime.now(UTC)
        since, until = now - timedelta(hours=1), now + timedelta(hours=1)
        with pytest.raises(InputError, match="at most 31 days"):
            await replays.replay_window(conn, sub.id, now - timedelta(days=32), now)
        with pytest.raises(InputError, match="later than since"):
            await replays.replay_window(conn, sub.id, until, since)
        monkeypatch.setattr(replays, "MAX_REPLAY_EVENTS", 2)
        with pytest.raises(InputError, match="over 2 matching events"):
            await replays.replay_window(conn, sub.id, since, until)
        assert await conn.fetchval("SELECT count(*) FROM delivery.deliveries") == 0
        monkeypatch.setattr(replays, "MAX_REPLAY_EVENTS", 3)
        assert await replays.replay_window(conn, sub.id, since, until) == 3
        # Not another tenant's, and not a disabled one (enable it first).
        await conn.execute("INSERT INTO delivery.tenants (id, name) VALUES ('ten_o', 'o')")
        with pytest.raises(NotFoundError, match="does not exist"):
            await replays.replay_window(conn, sub.id, since, until, tenant_id="ten_o")
        await subscriptions.set_state(conn, sub.id, SubscriptionState.DISABLED)
        with pytest.raises(InputError, match="is disabled"):
            await replays.replay_window(conn, sub.id, since, until)
    finally:
        await conn.close()
