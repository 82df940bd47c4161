"""Ordered subscriptions through the real pipeline (issue #15, the contract's "Ordered
delivery"): per account, event N+1 is not POSTed until N succeeded, or its dead letter was
replayed and succeeded, or was skipped; accounts go on in parallel."""

from __future__ import annotations

from collections import defaultdict
from datetime import UTC, datetime, timedelta

import asyncpg
import orjson
import pytest

from delivery import publish_many
from delivery.store import dead_letters, pausing, replays, subscriptions
from delivery.store.pool import create_pool
from delivery.store.status import BLOCKED_ACCOUNTS, collect
from delivery.testing.api import api_process
from delivery.testing.factories import add_subscription, trade
from delivery.testing.receiver import (
    Arrival,
    Behaviour,
    Receiver,
    RefusingSubscriber,
    scripted_subscriber,
)
from delivery.testing.waits import wait_until
from tests.support import (
    cli,
    run_until_idle,
    running,
    settings_env,
    start_worker,
    stop_gracefully,
    tenant_with_key,
)

pytestmark = pytest.mark.integration


def _first_receipts(arrivals: list[Arrival]) -> dict[str, list[int]]:
    """Per account, the sequences of the first successful receipt of each event, in the
    order the subscriber answered them."""
    seen: set[str] = set()
    out: dict[str, list[int]] = defaultdict(list)
    for arrival in arrivals:
        if arrival.webhook_id in seen:
            continue
        seen.add(arrival.webhook_id)
        body = orjson.loads(arrival.body)
        out[body["account_id"]].append(body["sequence"])
    return dict(out)


async def _no_queues() -> tuple[dict[str, int | None], str | None]:
    return {}, None


async def test_a_failing_subscriber_still_sees_each_accounts_events_in_sequence(settings):
    # Retries soon, and no circuit breaking: half the requests fail, at random.
    settings = settings.model_copy(
        update={"retry_schedule_s": (0.05,) * 30, "circuit_failure_threshold": 10_000}
    )
    conn = await asyncpg.connect(settings.database_url)
    async with Receiver() as receiver:
        # Given an ordered subscription whose subscriber fails half of its requests
        sub = await add_subscription(conn, receiver, "/ordered", patterns="*", ordered=True)
        assert sub.ordered
        receiver.set_behaviour("/ordered", Behaviour(fail_rate=0.5, seed=15))
        # When three accounts publish interleaved events
        accounts = ("acc_a", "acc_b", "acc_c")
        async with conn.transaction():
            await publish_many(conn, [trade(i, account=a) for i in range(12) for a in accounts])
        await run_until_idle(settings, timeout_s=120)
        # Then per account, the first successful receipts come in increasing sequence, every
        # one of them, and each account's requests did fail on the way
        assert _first_receipts(receiver.delivered("/ordered")) == {
            a: list(range(1, 13)) for a in accounts
        }
        failed = [a for a in receiver.arrivals if not a.delivered]
        assert len(failed) > 5
        # And a replay of the window sends them again, in order again
        now = datetime.now(UTC)
        before = len(receiver.delivered("/ordered"))
        replayed = await replays.replay_window(
            conn, sub.id, now - timedelta(minutes=5), now + timedelta(minutes=1)
        )
        assert replayed == 36
        receiver.set_behaviour("/ordered", Behaviour())
        await run_until_idle(settings, timeout_s=60)
        again = receiver.delivered("/ordered")[before:]
        assert _first_receipts(again) == {a: list(range(1, 13)) for a in accounts}
    await conn.close()


async def test_order_holds_across_a_worker_killed_with_sigkill(settings):
    # Two processes (relay + worker each) on a subscriber failing half its requests; one is
    # killed mid-run: its leased deliveries wait out their lease, then another takes them.
    settings = settings.model_copy(update={"retry_schedule_s": (0.05,) * 30})
    conn = await asyncpg.connect(settings.database_url)
    async with Receiver() as receiver:
        await add_subscription(conn, receiver, "/ordered", patterns="*", ordered=True)
        receiver.set_behaviour("/ordered", Behaviour(fail_rate=0.5, seed=9))
        accounts = [f"acc_{n}" for n in range(5)]
        async with conn.transaction():
            await publish_many(conn, [trade(i, account=a) for i in range(20) for a in accounts])
        env = {"DELIVERY_CIRCUIT_FAILURE_THRESHOLD": "10000", "DELIVERY_LOG_LEVEL": "warning"}
        doomed = await start_worker(settings, "run", **env)
        survivor = await start_worker(settings, "run", **env)
        try:
            await receiver.wait_for(
                lambda r: r.unique_count("/ordered") >= 30, timeout_s=60, what="30 delivered"
            )
            doomed.kill()
            await doomed.wait()
            await receiver.wait_for(
                lambda r: r.unique_count("/ordered") == 100, timeout_s=120, what="all delivered"
            )
        finally:
            if doomed.returncode is None:
                doomed.kill()
            assert await stop_gracefully(survivor) == 0
        assert _first_receipts(receiver.delivered("/ordered")) == {
            a: list(range(1, 21)) for a in accounts
        }
    await conn.close()


async def test_a_dead_letter_holds_its_account_only_until_skipped_or_replayed(settings):
    conn = await asyncpg.connect(settings.database_url)
    pool = await create_pool(settings.database_url, min_size=1, max_size=2)
    subscriber = RefusingSubscriber(refused={("acc_skip", 2), ("acc_replay", 3)})
    async with scripted_subscriber(subscriber.answer) as base:
        # Given an ordered subscription whose subscriber refuses one event of two accounts
        sub = await subscriptions.add(conn, url=f"{base}/hook", patterns="*", ordered=True)
        accounts = ("acc_skip", "acc_replay", "acc_free")
        async with conn.transaction():
            await publish_many(conn, [trade(i, account=a) for a in accounts for i in range(5)])
        await run_until_idle(settings)
        # Then the account without a dead letter got everything, each of the others stopped at
        # its dead letter: its later events were never attempted
        assert subscriber.of("acc_free") == [1, 2, 3, 4, 5]
        assert subscriber.of("acc_skip") == [1]
        assert subscriber.of("acc_replay") == [1, 2]
        held = await conn.fetch(
            "SELECT account_id, sequence, attempts FROM delivery.deliveries"
            " WHERE subscription_id = $1 AND state = 'pending' ORDER BY account_id, sequence",
            sub.id,
        )
        assert [(r["account_id"], r["sequence"], r["attempts"]) for r in held] == [
            ("acc_replay", 4, 0),
            ("acc_replay", 5, 0),
            ("acc_skip", 3, 0),
            ("acc_skip", 4, 0),
            ("acc_skip", 5, 0),
        ]
        # And status names the two blocked accounts, with the dead letter holding each
        assert await conn.fetchval(BLOCKED_ACCOUNTS) == 2
        report = await collect(conn, _no_queues)
        blocked = {b["account_id"]: b["sequence"] for b in report["blocked_accounts"]}
        assert blocked == {"acc_skip": 2, "acc_replay": 3}
        assert report["subscriptions"][0]["blocked_accounts"] == 2
        assert len(await dead_letters.list_dead(conn)) == 2
        ids = {
            r["account_id"]: r["id"]
            for r in await conn.fetch(
                "SELECT id, account_id FROM delivery.deliveries WHERE state = 'dead'"
            )
        }
        # When on-call skips one and replays the other (now accepted)
        skipped = await dead_letters.skip(pool, dead_letters.Selector(ids=(ids["acc_skip"],)))
        assert skipped == 1
        subscriber.refused.clear()
        replay = dead_letters.Selector(ids=(ids["acc_replay"],))
        assert await dead_letters.replay(pool, replay) == (1, 0)
        await run_until_idle(settings)
        # Then the skipped event is never sent and the rest follow it in order; the replayed
        # one goes first, then the rest
        assert subscriber.of("acc_skip") == [1, 3, 4, 5]
        assert subscriber.of("acc_replay") == [1, 2, 3, 4, 5]
        assert await conn.fetchval(BLOCKED_ACCOUNTS) == 0
        states = await conn.fetch(
            "SELECT state, count(*) AS n FROM delivery.deliveries GROUP BY state ORDER BY state"
        )
        assert {r["state"]: r["n"] for r in states} == {"delivered": 14, "skipped": 1}
    await pool.close()
    await conn.close()


async def test_a_paused_ordered_subscription_resumes_in_order_per_account(settings):
    conn = await asyncpg.connect(settings.database_url)
    async with Receiver() as receiver:
        # Given a paused ordered subscription
        sub = await add_subscription(conn, receiver, "/ordered", patterns="*", ordered=True)
        await pausing.pause(conn, sub.id)
        # When two accounts publish, the pipeline runs, and then it is resumed
        async with conn.transaction():
            await publish_many(conn, [trade(i, account=a) for i in range(6) for a in "xy"])
        await run_until_idle(settings)
        assert receiver.delivered_count("/ordered") == 0
        await pausing.resume(conn, sub.id)
        await run_until_idle(settings)
        # Then each account's events arrive once, in sequence
        assert _first_receipts(receiver.delivered("/ordered")) == {
            "x": [1, 2, 3, 4, 5, 6],
            "y": [1, 2, 3, 4, 5, 6],
        }
        assert receiver.duplicates("/ordered") == {}
    await conn.close()


async def test_the_cli_adds_an_ordered_subscription_shows_a_blocked_account_and_skips(settings):
    conn = await asyncpg.connect(settings.database_url)
    subscriber = RefusingSubscriber(refused={("acc_1", 1)})
    async with scripted_subscriber(subscriber.answer) as base:
        added = cli(settings, "subscriptions", "add", f"{base}/h", "--events", "*", "--ordered")
        assert added.returncode == 0, added.stderr
        assert orjson.loads(added.stdout)["ordered"] is True
        async with conn.transaction():
            await publish_many(conn, [trade(i) for i in range(3)])
        await run_until_idle(settings)
        assert subscriber.delivered == []
        status = cli(settings, "status", "--json")
        assert [b["sequence"] for b in orjson.loads(status.stdout)["blocked_accounts"]] == [1]
        text = cli(settings, "status").stdout
        assert "blocked accounts: 1" in text
        dead_id = await conn.fetchval("SELECT id FROM delivery.deliveries WHERE state = 'dead'")
        assert cli(settings, "dlq", "skip", "nope").returncode == 2
        skipped = cli(settings, "dlq", "skip", str(dead_id))
        assert skipped.returncode == 0, skipped.stderr
        assert orjson.loads(skipped.stdout) == {"skipped": 1}
        await run_until_idle(settings)
        assert subscriber.of("acc_1") == [2, 3]
    await conn.close()


async def test_an_event_dispatched_before_the_one_ahead_of_it_waits_for_it(settings):
    # The trigger's rule, driven by hand with the statements dispatch and outcomes make: a
    # delivery is released only once every earlier event of its account that the subscription
    # matches is dispatched and settled for it. Relays and workers race, so event 4 may well be
    # dispatched before event 1; an event of a type it does not match is stepped over, never
    # waited for (nothing would wake the account when it is dispatched).
    conn = await asyncpg.connect(settings.database_url)
    try:
        sub = await subscriptions.add(
            conn, url="http://127.0.0.1:9/h", patterns="trade.*", ordered=True
        )
        closed = {"type": "account.closed", "account_id": "acc_1", "data": {"reason": "x"}}
        events = [trade(1, id="e1"), {**closed, "id": "e2"}, trade(3, id="e3"), trade(4, id="e4")]
        async with conn.transaction():
            await publish_many(conn, events)

        async def dispatch(event_id: str, sequence: int) -> None:
            await conn.execute("INSERT INTO delivery.inbox (event_id) VALUES ($1)", event_id)
            await conn.execute(
                "INSERT INTO delivery.deliveries"
                " (event_id, subscription_id, next_attempt_at, account_id, sequence)"
                " VALUES ($1, $2, 'infinity', 'acc_1', $3)",
                event_id,
                sub.id,
                sequence,
            )

        async def due() -> list[str]:
            rows = await conn.fetch(
                "SELECT event_id FROM delivery.deliveries WHERE state = 'pending'"
                " AND next_attempt_at <= clock_timestamp() ORDER BY event_id"
            )
            return [r["event_id"] for r in rows]

        async def delivered(event_id: str) -> None:
            await conn.execute(
                "UPDATE delivery.deliveries SET state = 'delivered' WHERE event_id = $1", event_id
            )

        await dispatch("e4", 4)
        assert await due() == []  # 1 and 3 are not dispatched yet
        await dispatch("e1", 1)
        assert await due() == ["e1"]
        await delivered("e1")
        assert await due() == []  # 2 is not its type, 3 is not dispatched yet
        await dispatch("e3", 3)
        assert await due() == ["e3"]
        await delivered("e3")
        assert await due() == ["e4"]
    finally:
        await conn.close()


async def test_over_http_an_ordered_subscription_is_created_and_a_dead_letter_skipped(settings):
    _, key = await tenant_with_key(settings, "orderly")
    subscriber = RefusingSubscriber(refused={("acc_1", 1)})
    async with (
        scripted_subscriber(subscriber.answer) as base,
        api_process(settings_env(settings)) as api,
        api.client(key) as http,
        running(settings),
    ):

        async def call(method: str, path: str, status: int, body: object = None) -> dict:
            async with http.request(method, path, json=body) as answer:
                payload = await answer.json(content_type=None)
                assert answer.status == status, (path, payload)
                return payload  # type: ignore[no-any-return]

        body = {"url": f"{base}/h", "events": ["*"], "ordered": True}
        sub = await call("POST", "/v1/subscriptions", 201, body)
        assert sub["ordered"] is True
        assert (await call("GET", f"/v1/subscriptions/{sub['id']}", 200))["ordered"] is True
        await call("POST", "/v1/events", 202, {"events": [trade(i) for i in range(3)]})

        async def dead() -> list[dict]:
            return (await call("GET", "/v1/dead-letters", 200))["items"]  # type: ignore[no-any-return]

        async def one_dead() -> bool:
            return len(await dead()) == 1

        await wait_until(one_dead, timeout_s=30, what="the refused event dead-lettered")
        assert subscriber.delivered == []  # 2 and 3 are held behind it
        [letter] = await dead()
        blocked_path = f"/v1/subscriptions/{sub['id']}/blocked-accounts"
        [held] = (await call("GET", blocked_path, 200))["items"]
        assert (held["account_id"], held["sequence"], held["dead_letter_id"]) == (
            "acc_1",
            1,
            letter["id"],
        )
        assert held["event_id"] == letter["event_id"] and held["last_status"] == 400
        skipped = await call("POST", "/v1/dead-letters/skip", 200, {"ids": [letter["id"]]})
        assert skipped == {"skipped": 1}
        assert (await call("GET", blocked_path, 200))["items"] == []
        await wait_until(
            lambda: subscriber.of("acc_1") == [2, 3], timeout_s=30, what="2 and 3 delivered"
        )
        assert await dead() == []
