"""A paused subscription through the real pipeline: its events wait as pending deliveries
(never attempted, never parked), and go out in order once it is resumed."""

from __future__ import annotations

import asyncpg
import orjson
import pytest

from delivery import publish_many
from delivery.errors import InputError, NotFoundError
from delivery.store import dead_letters, pausing, subscriptions
from delivery.store.pool import create_pool
from delivery.store.states import SubscriptionState
from delivery.testing.factories import add_subscription, trade
from delivery.testing.metrics import counter_value
from delivery.testing.receiver import Receiver
from tests.support import run_until_idle

pytestmark = pytest.mark.integration


async def _states(conn: asyncpg.Connection, sub_id: str) -> list[tuple[str, int]]:
    rows = await conn.fetch(
        "SELECT state, attempts FROM delivery.deliveries WHERE subscription_id = $1", sub_id
    )
    return sorted((r["state"], r["attempts"]) for r in rows)


async def test_a_paused_subscription_gets_nothing_until_resumed_then_everything_in_order(
    settings,
):
    # One request at a time to the subscriber, so the order of arrival is the order sent.
    settings = settings.model_copy(update={"per_subscription_max_in_flight": 1})
    conn = await asyncpg.connect(settings.database_url)
    async with Receiver() as receiver:
        # Given a paused subscription beside an active one
        paused = await add_subscription(conn, receiver, "/paused", patterns="*")
        await add_subscription(conn, receiver, "/active", patterns="*")
        sub = await pausing.pause(conn, paused.id)
        assert sub.state == SubscriptionState.PAUSED
        # When events are published and the pipeline runs until nothing is left to do
        async with conn.transaction():
            await publish_many(conn, [trade(i, id=f"evt_p{i}") for i in range(6)])
        await run_until_idle(settings)
        # Then the active one got them all, the paused one nothing: its deliveries wait,
        # pending and never attempted (not parked as dead letters)
        assert receiver.unique_count("/active") == 6
        assert receiver.delivered_count("/paused") == 0
        assert await _states(conn, paused.id) == [("pending", 0)] * 6
        # A dead letter of a paused subscription is replayed too (it waits for the resume).
        await conn.execute(
            "UPDATE delivery.deliveries SET state = 'dead', dead_at = now(), attempts = 3"
            " WHERE subscription_id = $1 AND event_id = 'evt_p5'",
            paused.id,
        )
        selector = dead_letters.Selector(subscription_id=paused.id)
        pool = await create_pool(settings.database_url, min_size=1, max_size=1)
        try:
            assert await dead_letters.replay(pool, selector) == (1, 0)
        finally:
            await pool.close()
        assert await _states(conn, paused.id) == [("pending", 0)] * 6
        assert counter_value("delivery_subscriptions", state="paused") == 1
        # When it is resumed, then every event arrives once, in the order published
        assert (await pausing.resume(conn, paused.id)).state == SubscriptionState.ACTIVE
        await run_until_idle(settings)
        sequences = [orjson.loads(a.body)["sequence"] for a in receiver.delivered("/paused")]
        assert sequences == [1, 2, 3, 4, 5, 6]
        assert await _states(conn, paused.id) == [("delivered", 1)] * 6
    await conn.close()


async def test_pause_and_resume_are_idempotent_and_refuse_what_they_cannot_do(settings):
    conn = await asyncpg.connect(settings.database_url)
    try:
        sub = await subscriptions.add(conn, url="http://127.0.0.1:9/h", patterns="*")
        await conn.execute(
            "UPDATE delivery.subscriptions SET failing_since = now() - interval '9 days'"
        )
        await pausing.pause(conn, sub.id)
        assert (await pausing.pause(conn, sub.id)).state == SubscriptionState.PAUSED
        # A resume forgets the failing time, so a long pause does not auto-disable it.
        assert (await pausing.resume(conn, sub.id)).failing_since is None
        assert (await pausing.resume(conn, sub.id)).state == SubscriptionState.ACTIVE
        # A disabled subscription is enabled, not resumed: its events are dead letters.
        await subscriptions.set_state(conn, sub.id, SubscriptionState.DISABLED)
        with pytest.raises(InputError, match="is disabled and cannot be paused"):
            await pausing.pause(conn, sub.id)
        with pytest.raises(InputError, match="is disabled and cannot be resumed"):
            await pausing.resume(conn, sub.id)
        # Another tenant's subscription answers exactly as one that does not exist.
        await conn.execute(
            "INSERT INTO delivery.tenants (id, name) VALUES ('ten_other', 'other')"
        )
        with pytest.raises(NotFoundError) as theirs:
            await pausing.pause(conn, sub.id, tenant_id="ten_other")
        with pytest.raises(NotFoundError) as nobody:
            await pausing.pause(conn, "sub_nobody", tenant_id="ten_other")
        assert str(theirs.value) == str(nobody.value).replace("sub_nobody", sub.id)
    finally:
        await conn.close()
