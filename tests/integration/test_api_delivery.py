"""``delivery api`` with the pipeline running: a replay of a time window reaches the receiver
again (same webhook-id), dead letters are listed, replayed and purged over HTTP, an event shows
its deliveries with their attempts; and the tenant's ingest rate holds across two API
processes (429 with Retry-After and the RateLimit headers)."""

from __future__ import annotations

import time

import asyncpg
import pytest

from delivery.testing.api import api_process
from delivery.testing.factories import trade
from delivery.testing.receiver import Behaviour, Receiver
from delivery.testing.waits import wait_until
from tests.support import running, settings_env, tenant_with_key

pytestmark = pytest.mark.integration


async def _json(http, method: str, path: str, status: int, body: object = None) -> dict:
    async with http.request(method, path, json=body) as answer:
        payload = await answer.json(content_type=None)
        assert answer.status == status, (path, payload)
        return payload


async def test_a_replayed_time_window_reaches_the_receiver_again(settings):
    _, key = await tenant_with_key(settings, "replayer")
    async with (
        Receiver() as receiver,
        api_process(settings_env(settings)) as api,
        api.client(key) as http,
        running(settings),
    ):
        sub = await _json(
            http,
            "POST",
            "/v1/subscriptions",
            201,
            {"url": receiver.url("/hook"), "events": ["trade.*"]},
        )
        receiver.expect_secret("/hook", sub["secret"])
        for i in range(3):
            await _json(http, "POST", "/v1/events", 202, trade(i, id=f"evt_r{i}"))
        await receiver.wait_for(lambda r: r.unique_count("/hook") == 3, 30, "3 first deliveries")

        async def all_recorded() -> bool:
            # A delivery still being attempted is left to that attempt by a replay: wait
            # until the worker has recorded all three.
            page = await _json(http, "GET", f"/v1/subscriptions/{sub['id']}/deliveries", 200)
            return [d["state"] for d in page["items"]] == ["delivered"] * 3

        await wait_until(all_recorded, timeout_s=30, what="3 deliveries recorded")
        listed = (await _json(http, "GET", "/v1/events", 200))["items"]
        created = {e["id"]: e["created_at"] for e in listed}
        window = {"since": created["evt_r1"], "until": created["evt_r2"]}  # [since, until)

        replayed = await _json(http, "POST", f"/v1/subscriptions/{sub['id']}/replay", 202, window)

        assert replayed == {"replayed": 1}
        await receiver.wait_for(
            lambda r: r.duplicates("/hook").get("evt_r1") == 2, 30, "evt_r1 sent again"
        )
        assert all(a.signature_ok for a in receiver.delivered("/hook"))
        assert "evt_r0" not in receiver.duplicates("/hook")
        assert "evt_r2" not in receiver.duplicates("/hook")

        async def recorded() -> bool:  # the receiver answered; the worker records it after
            detail = await _json(http, "GET", "/v1/events/evt_r1", 200)
            return [(d["state"], len(d["attempt_log"])) for d in detail["deliveries"]] == [
                ("delivered", 2)
            ]

        await wait_until(recorded, timeout_s=30, what="the replayed attempt recorded")
        detail = await _json(http, "GET", "/v1/events/evt_r1", 200)
        [delivery] = detail["deliveries"]
        assert detail["awaiting_dispatch"] == []  # dispatched
        assert delivery["subscription_id"] == sub["id"]
        assert [a["status"] for a in delivery["attempt_log"]] == [200, 200]


async def test_dead_letters_are_listed_replayed_and_purged_over_http(settings):
    _, key = await tenant_with_key(settings, "dead")
    async with (
        Receiver() as receiver,
        api_process(settings_env(settings)) as api,
        api.client(key) as http,
        running(settings),
    ):
        receiver.set_behaviour("/refuses", Behaviour(status=400))  # a 4xx: dead at once
        sub = await _json(
            http,
            "POST",
            "/v1/subscriptions",
            201,
            {"url": receiver.url("/refuses"), "events": ["*"]},
        )
        for i in range(2):
            await _json(http, "POST", "/v1/events", 202, trade(i, id=f"evt_d{i}"))

        async def dead() -> list[dict]:
            return (await _json(http, "GET", "/v1/dead-letters", 200))["items"]

        await wait_until(lambda: _has(dead, 2), timeout_s=30, what="2 dead letters")
        letters = await dead()
        assert {d["event_id"] for d in letters} == {"evt_d0", "evt_d1"}
        assert all(d["last_status"] == 400 and d["subscription_id"] == sub["id"] for d in letters)
        page = await _json(http, "GET", "/v1/dead-letters?limit=1", 200)
        assert len(page["items"]) == 1 and page["next_cursor"]

        receiver.set_behaviour("/refuses", Behaviour(status=200))
        first = next(d for d in letters if d["event_id"] == "evt_d0")
        again = await _json(http, "POST", "/v1/dead-letters/replay", 200, {"ids": [first["id"]]})
        assert again == {"replayed": 1, "skipped": 0}
        await receiver.wait_for(
            lambda r: any(a.webhook_id == "evt_d0" for a in r.delivered("/refuses")),
            30,
            "evt_d0 delivered on replay",
        )
        purged = await _json(
            http, "POST", "/v1/dead-letters/purge", 200, {"subscription_id": sub["id"]}
        )
        assert purged == {"purged": 1}
        assert await dead() == []
        mixed = await _json(http, "POST", "/v1/dead-letters/purge", 400, {"ids": [1], "all": True})
        assert mixed["error"]["field"] == "ids"
        assert not any(a.webhook_id == "evt_d1" for a in receiver.delivered("/refuses"))


async def _has(listing, n: int) -> bool:
    return len(await listing()) >= n


async def test_the_ingest_rate_is_shared_by_two_api_processes(settings):
    tenant, key = await tenant_with_key(settings, "limited", max_events_per_s=5)
    env = settings_env(settings)
    async with api_process(env) as one, api_process(env) as two:
        answers = []
        async with one.client(key) as first, two.client(key) as second:
            started = time.monotonic()
            for i in range(6):  # alternating; each batch is a whole burst (5 events)
                http = (first, second)[i % 2]
                batch = {"events": [trade(i * 5 + j) for j in range(5)]}
                async with http.post("/v1/events", json=batch) as answer:
                    answers.append((i % 2, answer.status, dict(answer.headers)))
            elapsed_s = time.monotonic() - started
    accepted = [a for a in answers if a[1] == 202]
    refused = [a for a in answers if a[1] == 429]
    assert len(accepted) + len(refused) == 6
    # GCRA over both processes: one burst (5 events) plus 5 per second since. Two limiters of
    # their own would have taken the second batch at once, on the other process.
    assert len(accepted) * 5 <= 5 + 5 * elapsed_s, (elapsed_s, [a[1] for a in answers])
    assert answers[0][1] == 202
    assert answers[1][1] == 429 or elapsed_s >= 1, "process two ignored process one's burst"
    assert refused and {process for process, _, _ in refused} >= {1}
    for _, _, headers in refused:
        assert int(headers["Retry-After"]) >= 1
        assert headers["RateLimit-Limit"] == "5"
        assert int(headers["RateLimit-Remaining"]) < 5  # less than this batch
        assert int(headers["RateLimit-Reset"]) >= 1
    assert accepted[0][2]["RateLimit-Limit"] == "5"
    conn = await asyncpg.connect(settings.database_url)
    try:
        stored = await conn.fetchval(
            "SELECT count(*) FROM delivery.outbox WHERE tenant_id = $1", tenant
        )
    finally:
        await conn.close()
    assert stored == 5 * len(accepted)  # a refusal wrote nothing
