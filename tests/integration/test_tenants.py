"""Tenants through the data path, on the real services: an event reaches only its own tenant's
subscriptions; sequences count per (tenant, account); event ids stay unique across tenants;
the store acts within one tenant and answers for another tenant's object exactly as for a
missing one; the subscription quota holds under concurrency."""

from __future__ import annotations

import asyncio
import collections
import secrets
import shutil
from collections.abc import AsyncIterator
from datetime import UTC, datetime

import asyncpg
import orjson
import pytest
import pytest_asyncio

from delivery import publish, publish_many
from delivery.errors import EventIdTakenError, InputError, NotFoundError, QuotaExceededError
from delivery.signing import generate_secret
from delivery.store import dead_letters as dlq
from delivery.store import subscriptions, tenants
from delivery.store.migrations import DEFAULT_MIGRATIONS_DIR, migrate
from delivery.store.states import SubscriptionState
from delivery.testing.factories import add_subscription, trade
from delivery.testing.receiver import Behaviour, Receiver
from delivery.testing.services import create_database, drop_database
from tests.support import run_until_idle

pytestmark = pytest.mark.integration


async def _sequences(conn: asyncpg.Connection) -> dict[tuple[str, str], list[int]]:
    rows = await conn.fetch(
        "SELECT tenant_id, account_id, array_agg(sequence ORDER BY sequence) s"
        " FROM delivery.outbox GROUP BY 1, 2"
    )
    return {(r["tenant_id"], r["account_id"]): r["s"] for r in rows}


async def test_migrate_creates_the_default_tenant(settings):
    conn = await asyncpg.connect(settings.database_url)
    try:
        assert [tuple(r) for r in await conn.fetch("SELECT id, name FROM delivery.tenants")] == [
            ("default", "default")
        ]
    finally:
        await conn.close()


async def test_an_event_reaches_only_its_own_tenants_subscriptions(settings):
    conn = await asyncpg.connect(settings.database_url)
    a = await tenants.add(conn, "tenant-a")
    b = await tenants.add(conn, "tenant-b")
    async with Receiver() as receiver:
        await add_subscription(conn, receiver, "/a", patterns="*", tenant_id=a.id)
        await add_subscription(conn, receiver, "/b", patterns="*", tenant_id=b.id)
        await add_subscription(conn, receiver, "/default", patterns="*")
        # The same account in every tenant: each is its own account there.
        await publish_many(conn, [trade(1, id="evt_b1"), trade(2, id="evt_b2")], tenant=b.id)
        await publish(conn, trade(3, id="evt_a1"), tenant=a.id)
        await publish(conn, trade(4, id="evt_d1"))
        await run_until_idle(settings)
        got = collections.Counter((x.path, x.webhook_id) for x in receiver.arrivals)
        assert got == {
            ("/b", "evt_b1"): 1,
            ("/b", "evt_b2"): 1,
            ("/a", "evt_a1"): 1,
            ("/default", "evt_d1"): 1,
        }
        assert all(x.signature_ok for x in receiver.arrivals)
        sequences = {
            x.webhook_id: orjson.loads(x.body)["sequence"] for x in receiver.arrivals
        }
        assert sequences == {"evt_b1": 1, "evt_b2": 2, "evt_a1": 1, "evt_d1": 1}
    await conn.close()


async def test_sequences_count_per_tenant_and_account(settings):
    conn = await asyncpg.connect(settings.database_url)
    other = await tenants.add(conn, "other")
    await publish_many(conn, [trade(i, id=f"evt_d{i}") for i in range(3)])
    await publish_many(conn, [trade(i, id=f"evt_o{i}") for i in range(2)], tenant=other.id)
    await publish(conn, trade(9, id="evt_d9"))
    assert await _sequences(conn) == {
        ("default", "acc_1"): [1, 2, 3, 4],
        (other.id, "acc_1"): [1, 2],
    }
    counters = {
        (r["tenant_id"], r["account_id"]): r["last_sequence"]
        for r in await conn.fetch("SELECT * FROM delivery.account_sequences")
    }
    assert counters == {("default", "acc_1"): 4, (other.id, "acc_1"): 2}
    await conn.close()


async def test_an_id_another_tenant_holds_is_refused_and_nothing_of_the_batch_is_written(
    settings,
):
    conn = await asyncpg.connect(settings.database_url)
    other = await tenants.add(conn, "other")
    await publish(conn, trade(1, id="evt_shared"))
    async with conn.transaction():
        await publish(conn, trade(2, id="evt_mine"), tenant=other.id)
        with pytest.raises(EventIdTakenError, match="'evt_shared' is already used by another"):
            await publish_many(
                conn, [trade(3, id="evt_fresh"), trade(4, id="evt_shared")], tenant=other.id
            )
        # The caller's transaction goes on: only the refused call was rolled back.
        await publish(conn, trade(5, id="evt_after"), tenant=other.id)
    ids = {r["event_id"]: r["tenant_id"] for r in await conn.fetch("SELECT * FROM delivery.outbox")}
    assert ids == {"evt_shared": "default", "evt_mine": other.id, "evt_after": other.id}
    assert await _sequences(conn) == {("default", "acc_1"): [1], (other.id, "acc_1"): [1, 2]}
    # Within its own tenant an id seen before is still a duplicate, not a refusal.
    again = await publish(conn, trade(1, id="evt_shared"))
    assert again.duplicates == ["evt_shared"] and again.published == []
    await conn.close()


async def test_two_tenants_racing_on_one_id_leave_one_owner_and_no_gap(settings):
    # In lockstep, so they race on every id: the loser either sees the winner's row at once or
    # has its statement fail (serialization_failure) and sees it on the retry; both ways it is
    # refused, and the sequence it had counted is rolled back.
    setup = await asyncpg.connect(settings.database_url)
    a = await tenants.add(setup, "tenant-a")
    b = await tenants.add(setup, "tenant-b")
    conns = [await asyncpg.connect(settings.database_url) for _ in range(2)]
    try:
        for i in range(20):
            event = trade(i, id=f"evt_race_{i}")
            results = await asyncio.gather(
                publish(conns[0], event, tenant=a.id),
                publish(conns[1], event, tenant=b.id),
                return_exceptions=True,
            )
            published = [r for r in results if not isinstance(r, BaseException)]
            refused = [r for r in results if isinstance(r, BaseException)]
            assert len(published) == 1 and published[0].published == [event["id"]]
            assert len(refused) == 1 and isinstance(refused[0], EventIdTakenError), refused
        for tenant_id, numbers in (await _sequences(setup)).items():
            assert numbers == list(range(1, len(numbers) + 1)), tenant_id
        assert await setup.fetchval("SELECT count(*) FROM delivery.outbox") == 20
    finally:
        for c in (setup, *conns):
            await c.close()


async def test_an_unknown_or_malformed_tenant_is_refused_by_name(settings):
    conn = await asyncpg.connect(settings.database_url)
    with pytest.raises(NotFoundError, match="tenant 'ten_nobody' does not exist"):
        await publish(conn, trade(1, id="evt_1"), tenant="ten_nobody")
    with pytest.raises(InputError, match="is not a tenant id"):
        await publish(conn, trade(1, id="evt_1"), tenant="bad tenant")
    with pytest.raises(NotFoundError, match="tenant 'ten_nobody' does not exist"):
        await subscriptions.add(conn, url="http://127.0.0.1:9/h", patterns="*", tenant_id="ten_nobody")
    assert await conn.fetchval("SELECT count(*) FROM delivery.outbox") == 0
    await conn.close()


async def test_another_tenants_subscription_is_answered_as_a_missing_one(settings):
    conn = await asyncpg.connect(settings.database_url)
    other = await tenants.add(conn, "other")
    theirs = await subscriptions.add(
        conn, url="http://127.0.0.1:9/h", patterns="*", tenant_id=other.id
    )
    mine = await subscriptions.add(conn, url="http://127.0.0.1:9/m", patterns="*")
    assert [s.id for s in await subscriptions.list_all(conn)] == [mine.id]
    assert [s.id for s in await subscriptions.list_all(conn, tenant_id=other.id)] == [theirs.id]

    async def refusals(subscription_id: str) -> list[str]:
        messages = []
        for action in (
            lambda: subscriptions.get(conn, subscription_id),
            lambda: subscriptions.exists(conn, subscription_id),
            lambda: subscriptions.set_state(conn, subscription_id, SubscriptionState.DISABLED),
            lambda: subscriptions.rotate_secret(conn, subscription_id, grace_s=60),
            lambda: subscriptions.remove(conn, subscription_id),
            lambda: subscriptions.remove(conn, subscription_id, keep_history=False),
        ):
            with pytest.raises(NotFoundError) as info:
                await action()
            messages.append(str(info.value).replace(subscription_id, "ID"))
        return messages

    assert await refusals(theirs.id) == await refusals("sub_0000000000000000")
    # And nothing was done to it.
    assert await subscriptions.get(conn, theirs.id, tenant_id=other.id) == theirs
    await conn.close()


async def test_dead_letters_are_listed_replayed_and_purged_within_their_tenant(settings):
    conn = await asyncpg.connect(settings.database_url)
    other = await tenants.add(conn, "other")
    async with Receiver() as receiver:
        receiver.set_behaviour("/refuse", Behaviour(status=400))
        mine = await add_subscription(conn, receiver, "/refuse", patterns="*")
        theirs = await add_subscription(conn, receiver, "/refuse", patterns="*", tenant_id=other.id)
        await publish(conn, trade(1, id="evt_mine"))
        await publish(conn, trade(2, id="evt_theirs"), tenant=other.id)
        await run_until_idle(settings)
    (dead_mine,) = await dlq.list_dead(conn)
    (dead_theirs,) = await dlq.list_dead(conn, tenant_id=other.id)
    assert (dead_mine.event_id, dead_mine.subscription_id) == ("evt_mine", mine.id)
    assert (dead_theirs.event_id, dead_theirs.subscription_id) == ("evt_theirs", theirs.id)
    assert await dlq.list_dead(conn, subscription_id=theirs.id) == []

    pool = await asyncpg.create_pool(settings.database_url, min_size=1, max_size=2)
    try:
        # Named by id or by subscription from the wrong tenant: nothing is selected.
        assert await dlq.replay(pool, dlq.Selector(ids=(dead_theirs.id,))) == (0, 0)
        assert await dlq.count(pool, dlq.Selector(subscription_id=theirs.id)) == 0
        assert await dlq.purge(pool, dlq.Selector(ids=(dead_theirs.id,))) == 0
        assert await dlq.purge(pool, dlq.Selector(everything=True)) == 1
        assert await dlq.count(pool, dlq.Selector(everything=True, tenant_id=other.id)) == 1
        theirs_all = dlq.Selector(everything=True, tenant_id=other.id)
        assert await dlq.replay(pool, theirs_all) == (1, 0)
    finally:
        await pool.close()
    states = dict(await conn.fetch("SELECT event_id, state FROM delivery.deliveries"))
    assert states == {"evt_theirs": "pending"}
    await conn.close()


async def test_the_subscription_quota_holds_under_concurrent_adds(settings):
    setup = await asyncpg.connect(settings.database_url)
    small = await tenants.add(setup, "small", max_subscriptions=2)
    conns = [await asyncpg.connect(settings.database_url) for _ in range(5)]

    async def add(conn: asyncpg.Connection, i: int) -> object:
        async with conn.transaction():
            return await subscriptions.add(
                conn, url=f"http://127.0.0.1:9/{i}", patterns="*", tenant_id=small.id
            )

    try:
        results = await asyncio.gather(
            *(add(c, i) for i, c in enumerate(conns)), return_exceptions=True
        )
        refused = [r for r in results if isinstance(r, BaseException)]
        assert len(refused) == 3 and all(isinstance(r, QuotaExceededError) for r in refused)
        assert "max_subscriptions 2" in str(refused[0])
        # A removed subscription frees its place; another tenant's count is its own.
        held = await subscriptions.list_all(setup, tenant_id=small.id)
        assert len(held) == 2
        await subscriptions.remove(setup, held[0].id, tenant_id=small.id)
        await subscriptions.add(setup, url="http://127.0.0.1:9/x", patterns="*", tenant_id=small.id)
        with pytest.raises(QuotaExceededError):
            await subscriptions.add(
                setup, url="http://127.0.0.1:9/y", patterns="*", tenant_id=small.id
            )
        await subscriptions.add(setup, url="http://127.0.0.1:9/z", patterns="*")
    finally:
        for c in (setup, *conns):
            await c.close()


@pytest_asyncio.fixture(loop_scope="session")
async def empty_db(services) -> AsyncIterator[str]:
    name = f"dlv_ten_{secrets.token_hex(5)}"
    url = await create_database(services.database_url, name)
    yield url
    await drop_database(services.database_url, name)


async def test_a_database_from_before_tenants_migrates_its_rows_to_default(empty_db, tmp_path):
    before = tmp_path / "before"
    before.mkdir()
    for path in sorted(DEFAULT_MIGRATIONS_DIR.glob("*.sql")):
        if int(path.name[:4]) <= 13:
            shutil.copy(path, before / path.name)
    await migrate(empty_db, before)
    conn = await asyncpg.connect(empty_db)
    try:
        # What the previous release wrote: through its publish function, and a subscription.
        await conn.execute(
            "SELECT delivery.publish_events($1, $2, $3, $4, $5, $6)",
            ["evt_old1", "evt_old2"],
            ["account.closed"] * 2,
            ["acc_1"] * 2,
            [datetime.now(UTC)] * 2,
            ['{"reason": "x"}'] * 2,
            [None, None],
        )
        await conn.execute(
            "INSERT INTO delivery.subscriptions (id, url, event_patterns, secret)"
            " VALUES ('sub_old', 'http://127.0.0.1:9/h', '{*}', $1)",
            generate_secret(),
        )

        await migrate(empty_db)

        owners = await conn.fetch(
            "SELECT 'outbox' AS t, tenant_id FROM delivery.outbox"
            " UNION ALL SELECT 'seq', tenant_id FROM delivery.account_sequences"
            " UNION ALL SELECT 'sub', tenant_id FROM delivery.subscriptions"
        )
        assert sorted(tuple(r) for r in owners) == [
            ("outbox", "default"),
            ("outbox", "default"),
            ("seq", "default"),
            ("sub", "default"),
        ]
        assert (await subscriptions.get(conn, "sub_old")).tenant_id == "default"
        # The account's count goes on, through the new API and the old signature alike (a
        # producer of the previous release during a rolling upgrade).
        await publish(conn, trade(3, id="evt_new"))
        await conn.execute(
            "SELECT delivery.publish_events($1, $2, $3, $4, $5, $6)",
            ["evt_old3"],
            ["account.closed"],
            ["acc_1"],
            [datetime.now(UTC)],
            ['{"reason": "x"}'],
            [None],
        )
        assert await _sequences(conn) == {("default", "acc_1"): [1, 2, 3, 4]}
        # And a new tenant's acc_1 starts at 1.
        other = await tenants.add(conn, "other")
        await publish(conn, trade(5, id="evt_other"), tenant=other.id)
        assert (await _sequences(conn))[(other.id, "acc_1")] == [1]
    finally:
        await conn.close()
