"""``delivery api`` through real HTTP on a real process: publishing (idempotent, batches all or
nothing, the size limit), listing with cursors, subscriptions (CRUD, the SSRF guard),
revocation, metrics and the access log, the SIGTERM drain."""

from __future__ import annotations

import asyncio
import contextlib
import signal
import socket
import sys

import aiohttp
import asyncpg
import pytest
from asyncpg.transaction import Transaction

from delivery.store import keys
from delivery.testing.api import api_process
from delivery.testing.factories import trade
from tests.support import key_for, settings_env, tenant_with_key

pytestmark = pytest.mark.integration


async def _outbox_ids(settings) -> list[str]:
    conn = await asyncpg.connect(settings.database_url)
    try:
        return [r["event_id"] for r in await conn.fetch("SELECT event_id FROM delivery.outbox")]
    finally:
        await conn.close()


async def test_publish_is_idempotent_single_by_header_and_batch_by_ids(settings):
    tenant, key = await tenant_with_key(settings, "idem")
    async with api_process(settings_env(settings)) as api, api.client(key) as http:
        answers = []
        for _ in range(2):
            async with http.post(
                "/v1/events", json=trade(1), headers={"Idempotency-Key": "evt_once"}
            ) as answer:
                assert answer.status == 202
                answers.append(await answer.json())
        assert answers == [
            {"published": 1, "duplicates": 0, "ids": ["evt_once"]},
            {"published": 0, "duplicates": 1, "ids": ["evt_once"]},
        ]
        batch = {"events": [trade(i, id=f"evt_b{i}") for i in range(3)]}
        async with http.post("/v1/events", json=batch) as first:
            assert (await first.json())["published"] == 3
        batch["events"].append(trade(9, id="evt_b9"))
        async with http.post("/v1/events", json=batch) as again:
            assert await again.json() == {
                "published": 1,
                "duplicates": 3,
                "ids": ["evt_b0", "evt_b1", "evt_b2", "evt_b9"],
            }
        # A header that contradicts the body's id is refused, naming the field.
        async with http.post(
            "/v1/events", json=trade(2, id="evt_x"), headers={"Idempotency-Key": "evt_y"}
        ) as answer:
            assert answer.status == 400
            assert (await answer.json())["error"]["field"] == "id"
        async with http.get("/v1/events/evt_once") as answer:
            detail = await answer.json()
            assert detail["event"]["sequence"] == 1 and detail["event"]["id"] == "evt_once"
    assert sorted(await _outbox_ids(settings)) == [
        "evt_b0",
        "evt_b1",
        "evt_b2",
        "evt_b9",
        "evt_once",
    ]
    assert tenant


async def test_a_batch_is_all_or_nothing_and_names_the_failing_index(settings):
    _, key = await tenant_with_key(settings, "atomic")
    events = [trade(i) for i in range(5)]
    events[3]["data"] = {**events[3]["data"], "price": 64000.5}  # a float: refused
    async with api_process(settings_env(settings)) as api, api.client(key) as http:
        async with http.post("/v1/events", json={"events": events}) as answer:
            assert answer.status == 400
            error = (await answer.json())["error"]
        assert error["code"] == "invalid_request"
        assert error["field"] == "events[3].data.price"
        assert "decimal string" in error["message"]
        async with http.post("/v1/events", data=b"{not json") as answer:
            assert answer.status == 400
            assert (await answer.json())["error"]["code"] == "invalid_request"
        # aiohttp's own answers, in the same shape.
        async with http.get("/v1/nowhere") as answer:
            assert answer.status == 404
            assert (await answer.json())["error"]["code"] == "not_found"
        async with http.put("/v1/events", json={}) as answer:
            assert answer.status == 405 and answer.headers["Allow"]
            assert (await answer.json())["error"]["code"] == "method_not_allowed"
        async with http.post("/v1/events", json={"events": [trade(0)] * 1001}) as answer:
            assert answer.status == 400
            assert (await answer.json())["error"]["field"] == "events"
    assert await _outbox_ids(settings) == []


async def test_a_body_over_the_limit_answers_413_in_the_error_shape(settings):
    _, key = await tenant_with_key(settings, "big")
    env = settings_env(settings, DELIVERY_API_MAX_BODY_BYTES="2048")
    async with api_process(env) as api, api.client(key) as http:
        batch = {"events": [trade(i) for i in range(20)]}  # about 5 KB
        async with http.post("/v1/events", json=batch) as answer:
            assert answer.status == 413
            assert (await answer.json())["error"]["code"] == "payload_too_large"
        async with http.post("/v1/events", json=trade(1)) as answer:
            assert answer.status == 202  # a small one still passes
    assert len(await _outbox_ids(settings)) == 1


async def test_events_are_listed_newest_first_in_cursor_pages(settings):
    _, key = await tenant_with_key(settings, "pages")
    async with api_process(settings_env(settings)) as api, api.client(key) as http:
        for i in range(7):
            async with http.post("/v1/events", json=trade(i, id=f"evt_p{i}")) as answer:
                assert answer.status == 202
        seen: list[str] = []
        sizes = []
        cursor = None
        while True:
            params = {"limit": "3", **({"cursor": cursor} if cursor else {})}
            async with http.get("/v1/events", params=params) as answer:
                assert answer.status == 200
                page = await answer.json()
            sizes.append(len(page["items"]))
            seen += [e["id"] for e in page["items"]]
            cursor = page["next_cursor"]
            if cursor is None:
                break
        assert sizes == [3, 3, 1]
        assert seen == [f"evt_p{i}" for i in reversed(range(7))]
        async with http.get("/v1/events", params={"type": "account.closed"}) as answer:
            assert (await answer.json()) == {"items": [], "next_cursor": None}
        async with http.get("/v1/events", params={"cursor": "bm9wZQ"}) as answer:
            assert answer.status == 400
            assert (await answer.json())["error"]["field"] == "cursor"
        async with http.get("/v1/events", params={"limit": "1000"}) as answer:
            assert answer.status == 400
            assert (await answer.json())["error"]["field"] == "limit"


async def test_subscription_create_read_change_rotate_pause_remove(settings):
    _, key = await tenant_with_key(settings, "crud")
    async with api_process(settings_env(settings)) as api, api.client(key) as http:
        body = {"url": "http://127.0.0.1:9/hook", "events": ["trade.*"], "retry_schedule": "1s,5s"}
        async with http.post("/v1/subscriptions", json=body) as answer:
            assert answer.status == 201
            created = await answer.json()
        sub = created["id"]
        assert created["secret"].startswith("whsec_") and created["retry_schedule"] == "1s,5s"
        # No worker runs here: the event waits for dispatch, and says for whom.
        async with http.post("/v1/events", json=trade(1, id="evt_waits")) as answer:
            assert answer.status == 202
        async with http.get("/v1/events/evt_waits") as answer:
            waiting = await answer.json()
            assert waiting["awaiting_dispatch"] == [sub] and waiting["deliveries"] == []
        async with http.get(f"/v1/subscriptions/{sub}") as answer:
            shown = await answer.json()
            assert "secret" not in shown and shown["events"] == ["trade.*"]
        async with http.patch(f"/v1/subscriptions/{sub}", json={"events": ["account.*"]}) as answer:
            assert answer.status == 200
            assert (await answer.json())["events"] == ["account.*"]
        async with http.post(f"/v1/subscriptions/{sub}/rotate-secret") as answer:
            rotated = await answer.json()
            assert rotated["secret"].startswith("whsec_") and rotated["secret"] != created["secret"]
        async with http.post(f"/v1/subscriptions/{sub}/pause") as answer:
            assert (await answer.json())["state"] == "paused"
        async with http.post(f"/v1/subscriptions/{sub}/resume") as answer:
            assert (await answer.json())["state"] == "active"
        async with http.post("/v1/subscriptions", json={**body, "ordered": True}) as answer:
            assert answer.status == 201
            ordered = await answer.json()
            assert ordered["ordered"] is True
        async with http.post("/v1/subscriptions", json={**body, "events": ["nothing.*"]}) as answer:
            assert answer.status == 422
            assert (await answer.json())["error"]["field"] == "events"
        signed = {"url": "http://127.0.0.1:9/ed", "events": ["*"], "signing": "ed25519"}
        async with http.post("/v1/subscriptions", json=signed) as answer:
            assert answer.status == 201
            ed = await answer.json()
            # The platform keeps the whsk_ secret key; the subscriber gets the public key.
            assert ed["signing"] == "ed25519" and ed["secret"] is None
            assert ed["public_key"].startswith("whpk_")
        async with http.get(f"/v1/subscriptions/{sub}/deliveries") as answer:
            assert await answer.json() == {"items": [], "next_cursor": None}
        async with http.delete(f"/v1/subscriptions/{sub}") as answer:
            assert answer.status == 204
        async with http.get(f"/v1/subscriptions/{sub}") as answer:
            assert answer.status == 404
        async with http.get("/v1/subscriptions") as answer:
            assert [s["id"] for s in (await answer.json())["items"]] == [ordered["id"], ed["id"]]
    conn = await asyncpg.connect(settings.database_url)
    try:  # removed, not deleted: its history stays
        assert await conn.fetchval("SELECT state FROM delivery.subscriptions WHERE id=$1", sub) == (
            "removed"
        )
    finally:
        await conn.close()


@pytest.mark.parametrize(
    "url",
    [
        "http://127.0.0.1:5432/",
        "http://169.254.169.254/latest/meta-data/",
        "http://[::ffff:10.0.0.1]/hook",
        "http://2130706433/hook",
        "http://metadata.google.internal/",
    ],
)
async def test_a_blocked_target_is_refused_with_422_naming_url(settings, url):
    _, key = await tenant_with_key(settings, "ssrf")
    env = settings_env(settings, DELIVERY_ALLOW_PRIVATE_TARGETS="false")
    async with api_process(env) as api, api.client(key) as http:
        async with http.post("/v1/subscriptions", json={"url": url, "events": ["*"]}) as answer:
            assert answer.status == 422, await answer.text()
            assert (await answer.json())["error"]["field"] == "url"
        async with http.get("/v1/subscriptions") as answer:
            assert (await answer.json())["items"] == []


async def test_a_revoked_key_is_refused_at_once_by_every_api_process(settings):
    tenant, _ = await tenant_with_key(settings, "revoke")
    key_id, key = await key_for(settings, tenant, "read")
    env = settings_env(settings)
    async with api_process(env) as one, api_process(env) as two:
        for api in (one, two):
            async with api.client(key) as http, http.get("/v1/events") as answer:
                assert answer.status == 200
        conn = await asyncpg.connect(settings.database_url)
        try:
            await keys.revoke(conn, key_id)
        finally:
            await conn.close()
        for api in (one, two):  # the very next request, no cache to expire
            async with api.client(key) as http, http.get("/v1/events") as answer:
                assert answer.status == 401


async def test_metrics_count_route_templates_and_the_access_log_never_holds_the_key(settings):
    _, key = await tenant_with_key(settings, "observed")
    async with api_process(settings_env(settings, DELIVERY_LOG_LEVEL="info")) as api:
        async with api.client(key) as http:
            async with http.post("/v1/events", json=trade(1, id="evt_m1")):
                pass
            async with http.get("/v1/events/evt_m1"):
                pass
            async with http.get("/v1/events/evt_nope"):
                pass
            async with http.request("PROPFIND", "/v1/events"):  # a method we never serve
                pass
        async with api.client() as http, http.get(api.admin_url + "/metrics") as answer:
            exposition = await answer.text()
        log = api.log()
    assert 'route="/v1/events/{id}",status="200"' in exposition
    assert 'route="/v1/events/{id}",status="404"' in exposition
    assert "evt_m1" not in exposition  # the template, never the raw path
    assert 'method="other"' in exposition and "PROPFIND" not in exposition
    assert "delivery_api_request_duration_seconds_bucket" in exposition
    assert '"route": "/v1/events/{id}"' in log and '"key_id": "key_' in log
    assert key not in log and "Bearer" not in log


async def test_sigterm_finishes_the_request_in_flight_and_exits_0(settings):
    tenant, key = await tenant_with_key(settings, "drain")
    conn = await asyncpg.connect(settings.database_url)
    try:
        async with api_process(settings_env(settings)) as api, api.client(key) as http:
            tx = await _hold_sequence_row(conn, tenant)
            request = asyncio.create_task(http.post("/v1/events", json=trade(1)))
            await _wait_for_lock_waiter(settings)
            stopping = asyncio.create_task(api.stop())
            await _wait_until_unready(api)
            await tx.rollback()  # release: the request in flight completes
            answer = await request
            assert answer.status == 202
            answer.release()
            assert await stopping == 0
    finally:
        await conn.close()


async def test_a_second_sigterm_cuts_the_drain_short_and_exits_0(settings):
    # A 60 s drain deadline the second signal must not wait for.
    settings = settings.model_copy(update={"shutdown_timeout_s": 60.0})
    tenant, key = await tenant_with_key(settings, "forced")
    conn = await asyncpg.connect(settings.database_url)
    try:
        async with api_process(settings_env(settings)) as api, api.client(key) as http:
            tx = await _hold_sequence_row(conn, tenant)
            request = asyncio.create_task(http.post("/v1/events", json=trade(1)))
            await _wait_for_lock_waiter(settings)
            # Given a drain waiting on a request that will not finish by itself
            stopping = asyncio.create_task(api.stop(timeout_s=90))
            await _wait_until_unready(api)
            # When a second SIGTERM arrives
            api.proc.send_signal(signal.SIGTERM)
            # Then the process ends far sooner than the drain deadline, and cleanly
            assert await asyncio.wait_for(stopping, 20) == 0
            assert "shutdown_forced" in api.log()
            with contextlib.suppress(aiohttp.ClientError):
                (await request).release()  # cut off: the answer, if any, does not matter
            await tx.rollback()
    finally:
        await conn.close()


async def _hold_sequence_row(conn: asyncpg.Connection, tenant: str) -> Transaction:
    """Lock the account's sequence row in an open transaction: a publish to ``acc_1`` waits for
    it, in flight, until the transaction ends."""
    await conn.execute(
        "INSERT INTO delivery.account_sequences (tenant_id, account_id, last_sequence)"
        " VALUES ($1, 'acc_1', 0)",
        tenant,
    )
    tx = conn.transaction()
    await tx.start()
    await conn.execute(
        "SELECT 1 FROM delivery.account_sequences"
        " WHERE tenant_id = $1 AND account_id = 'acc_1' FOR UPDATE",
        tenant,
    )
    return tx


async def _wait_for_lock_waiter(settings) -> None:
    from delivery.testing.waits import wait_until

    probe = await asyncpg.connect(settings.database_url)
    try:
        await wait_until(
            lambda: probe.fetchval(
                "SELECT count(*) > 0 FROM pg_stat_activity WHERE wait_event_type = 'Lock'"
                " AND datname = current_database()"
            ),
            timeout_s=10,
            what="the publish to wait for the row lock",
        )
    finally:
        await probe.close()


async def _wait_until_unready(api) -> None:
    import aiohttp

    from delivery.testing.waits import wait_until

    async def unready() -> bool:
        try:
            async with aiohttp.ClientSession() as http, http.get(api.admin_url + "/readyz") as a:
                return a.status == 503
        except aiohttp.ClientError:
            return False

    await wait_until(unready, timeout_s=10, what="the api to report draining")


async def test_a_port_in_use_stops_the_api_with_one_line_and_exit_2(settings):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        proc = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "delivery",
            "api",
            "--port",
            str(port),
            env=settings_env(settings),
            stdout=asyncio.subprocess.DEVNULL,
            stderr=asyncio.subprocess.PIPE,
        )
        _, stderr = await asyncio.wait_for(proc.communicate(), 30)
    assert proc.returncode == 2
    last = stderr.decode().strip().splitlines()[-1]
    assert "DELIVERY_API_HOST/DELIVERY_API_PORT" in last and str(port) in last
    assert "Traceback" not in stderr.decode()
