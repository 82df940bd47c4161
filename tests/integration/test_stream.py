"""The live stream and the balances snapshot through a real ``delivery api`` process and a real
WebSocket client: the seam between stored and live events under concurrent publishing, resume
with ``after``, a slow client closed with 4008 beside a fast one, keys, tenants, the client
limit and heartbeats."""

from __future__ import annotations

import asyncio
import itertools
from collections.abc import Sequence
from decimal import Decimal

import aiohttp
import asyncpg
import pytest

from delivery.outbox import publish_many
from delivery.testing.api import api_process
from delivery.testing.factories import balance, trade
from delivery.testing.stream import rebuild_balances, stream_client
from tests.support import key_for, settings_env, tenant_with_key

pytestmark = pytest.mark.integration

_ASSETS = ("USD", "BTC", "ETH")
_ids = itertools.count(1)


def _balance_event(account: str, i: int) -> dict[str, object]:
    event = balance(i, account, id=f"evt_{next(_ids)}")
    data = dict(event["data"])  # type: ignore[call-overload]
    data["asset"] = _ASSETS[i % len(_ASSETS)]
    data["balance"] = f"{i}.{i % 100:02d}"
    return {**event, "data": data}


async def _publish(
    settings,
    tenant: str,
    events: Sequence[dict[str, object]],
    conn: asyncpg.Connection | None = None,
) -> None:
    own = conn is None
    conn = conn or await asyncpg.connect(settings.database_url)
    try:
        async with conn.transaction():
            await publish_many(conn, events, tenant=tenant)
    finally:
        if own:
            await conn.close()


async def _publish_concurrently(
    settings, tenant: str, accounts: Sequence[str], rounds: int
) -> None:
    """Small transactions from three connections at once, so pks commit out of order."""

    async def producer(worker: int) -> None:
        conn = await asyncpg.connect(settings.database_url)
        try:
            for i in range(rounds):
                account = accounts[(i + worker) % len(accounts)]
                events = [
                    _balance_event(account, i * 10 + worker),
                    trade(i, account, id=f"evt_{next(_ids)}"),
                ]
                await _publish(settings, tenant, events, conn)
        finally:
            await conn.close()

    async with asyncio.TaskGroup() as tasks:
        for worker in range(3):
            tasks.create_task(producer(worker))


async def _balances(http: aiohttp.ClientSession, account: str) -> dict[str, object]:
    async with http.get(f"/v1/accounts/{account}/balances") as answer:
        assert answer.status == 200, await answer.text()
        return await answer.json()


async def test_snapshot_then_stream_rebuilds_balances_while_events_are_published(settings):
    tenant, key = await tenant_with_key(settings, "rebuild")
    accounts = ["acc_a", "acc_b", "acc_c"]
    await _publish(settings, tenant, [_balance_event(a, i) for a in accounts for i in range(5)])
    async with api_process(settings_env(settings)) as api, api.client(key) as http:
        publishing = asyncio.create_task(_publish_concurrently(settings, tenant, accounts, 60))
        try:
            # Snapshots taken while the producers run, then the stream after each one's N.
            snapshots = {a: await _balances(http, a) for a in accounts}
            after = {a: int(s["sequence"]) for a, s in snapshots.items()}
            async with stream_client(http, accounts=accounts, after=after) as sc:
                await publishing
                final = {a: await _balances(http, a) for a in accounts}
                await sc.wait_for(
                    lambda s: all(s.last(a) >= final[a]["sequence"] for a in accounts),
                    timeout_s=20,
                    what="every account streamed up to its final sequence",
                )
                for a in accounts:
                    # No gap and no duplicate at the seam: exactly N+1 .. final, in order.
                    expected = list(range(after[a] + 1, int(final[a]["sequence"]) + 1))
                    assert sc.sequences(a) == expected, a
                    rebuilt = rebuild_balances(snapshots[a], sc.events)
                    assert rebuilt == {k: Decimal(v) for k, v in final[a]["balances"].items()}
                assert any(e["type"] == "trade.executed" for e in sc.events)
        finally:
            if not publishing.done():
                publishing.cancel()


async def test_a_client_from_zero_during_publishing_gets_every_event_once(settings):
    tenant, key = await tenant_with_key(settings, "seam")
    accounts = ["acc_x", "acc_y"]
    await _publish(settings, tenant, [_balance_event(a, i) for a in accounts for i in range(300)])
    async with api_process(settings_env(settings)) as api, api.client(key) as http:
        publishing = asyncio.create_task(_publish_concurrently(settings, tenant, accounts, 80))
        # History (300+ per account, read in pages) is replayed while live events arrive.
        async with stream_client(http, accounts=accounts, after=dict.fromkeys(accounts, 0)) as sc:
            await publishing
            final = {a: int((await _balances(http, a))["sequence"]) for a in accounts}
            await sc.wait_for(
                lambda s: all(s.last(a) >= final[a] for a in accounts),
                timeout_s=20,
                what="1..final for every account",
            )
            for a in accounts:
                assert sc.sequences(a) == list(range(1, final[a] + 1))


async def test_resume_with_after_gives_exactly_the_missing_events(settings):
    tenant, key = await tenant_with_key(settings, "resume")
    await _publish(settings, tenant, [trade(i, "acc_r", id=f"evt_r{i}") for i in range(10)])
    async with api_process(settings_env(settings)) as api, api.client(key) as http:
        async with stream_client(http, accounts=["acc_r"], after={"acc_r": 0}) as first:
            await first.wait_for(lambda s: s.last("acc_r") >= 10, timeout_s=10, what="10 events")
            seen = first.sequences("acc_r")[:4]  # the client kept only the first 4
        await _publish(settings, tenant, [trade(i, "acc_r", id=f"evt_r{i}") for i in range(10, 15)])
        async with stream_client(http, accounts=["acc_r"], after={"acc_r": seen[-1]}) as again:
            await again.wait_for(lambda s: s.last("acc_r") >= 15, timeout_s=10, what="to 15")
            assert again.sequences("acc_r") == list(range(5, 16))
            assert [e["id"] for e in again.events] == [f"evt_r{i}" for i in range(4, 15)]


async def _metric(http: aiohttp.ClientSession, url: str, name: str) -> float:
    async with http.get(url + "/metrics") as answer:
        for line in (await answer.text()).splitlines():
            if line.startswith(name + " "):
                return float(line.split()[1])
    return 0.0


async def test_a_slow_client_is_closed_with_4008_while_a_fast_one_keeps_receiving(settings):
    tenant, key = await tenant_with_key(settings, "slow")
    env = settings_env(settings, DELIVERY_STREAM_BUFFER_EVENTS="1000")
    async with (
        api_process(env) as api,
        api.client(key) as http,
        aiohttp.ClientSession() as plain,
        # after 0: the first batch may commit before the server has read the subscribe.
        stream_client(http, accounts=["acc_s"], after={"acc_s": 0}) as fast,
        stream_client(http, accounts=["acc_s"], after={"acc_s": 0}, read=False) as slow,
    ):
        published = 0

        async def behind() -> bool:
            return await _metric(plain, api.admin_url, "delivery_stream_clients_behind_total") >= 1

        # Publish until the slow client's socket and its 1,000-frame buffer are full (a batch
        # of 500 at once fits the fast client's buffer).
        while not await behind():
            assert published < 60_000, "the slow client was never closed"
            batch = [trade(published + i, "acc_s", id=f"evt_s{published + i}") for i in range(500)]
            await _publish(settings, tenant, batch)
            published += len(batch)
            await fast.wait_for(
                lambda s, n=published: s.last("acc_s") >= n, timeout_s=20, what="the fast client"
            )
        assert fast.sequences("acc_s") == list(range(1, published + 1))
        slow.start_reading()
        await asyncio.wait_for(slow.closed.wait(), 20)
        assert slow.close_code == 4008
        got = slow.sequences("acc_s")
        assert got == list(range(1, len(got) + 1)) and len(got) < published
        # It resumes with `after` and gets exactly the rest.
        async with stream_client(http, accounts=["acc_s"], after={"acc_s": len(got)}) as resumed:
            await resumed.wait_for(
                lambda s: s.last("acc_s") >= published, timeout_s=20, what="the rest"
            )
            assert resumed.sequences("acc_s") == list(range(len(got) + 1, published + 1))
        # The fast client was never closed.
        assert not fast.closed.is_set()


async def test_keys_tenants_client_limit_and_heartbeats(settings):
    tenant_a, key_a = await tenant_with_key(settings, "alpha")
    tenant_b, key_b = await tenant_with_key(settings, "beta")
    _, publish_only = await key_for(settings, tenant_a, "publish")
    env = settings_env(
        settings, DELIVERY_STREAM_HEARTBEAT_S="0.2", DELIVERY_STREAM_MAX_CLIENTS_PER_TENANT="1"
    )
    async with api_process(env) as api:
        for key, status in ((None, 401), ("dk_wrong", 401), (publish_only, 403)):
            async with api.client(key) as http:
                with pytest.raises(aiohttp.WSServerHandshakeError) as refused:
                    await http.ws_connect("/v1/stream")
                assert refused.value.status == status
        async with (
            api.client(key_a) as http_a,
            api.client(key_b) as http_b,
            # after 0: events published before the server has read the subscribe are in too.
            stream_client(http_b, accounts=["acc_1"], after={"acc_1": 0}) as b_client,
        ):
            # Both tenants publish to the same account id: B sees only its own.
            await _publish(settings, tenant_a, [_balance_event("acc_1", 1)])
            await _publish(settings, tenant_b, [trade(1, "acc_1", id="evt_b_only")])
            await _publish(settings, tenant_a, [_balance_event("acc_1", 2)])
            await b_client.wait_for(lambda s: len(s.events) >= 1, timeout_s=10, what="B's event")
            await b_client.wait_for(lambda s: s.heartbeats >= 2, timeout_s=10, what="heartbeats")
            assert [e["id"] for e in b_client.events] == ["evt_b_only"]
            # A second client of B is over its limit of 1: closed with 1013 and a reason.
            async with stream_client(http_b, accounts=["acc_1"]) as over:
                await asyncio.wait_for(over.closed.wait(), 10)
                assert over.close_code == 1013
            # The snapshot of A's account; B sees its own acc_1 (no balance event) and gets for
            # an account only A published the 404 an account nobody published gets.
            snapshot = await _balances(http_a, "acc_1")
            assert snapshot == {
                "account_id": "acc_1",
                "sequence": 2,
                "balances": {"BTC": "1.01", "ETH": "2.02"},
            }
            assert await _balances(http_b, "acc_1") == {
                "account_id": "acc_1",
                "sequence": 1,
                "balances": {},
            }
            await _publish(settings, tenant_a, [_balance_event("acc_only_a", 3)])
            assert (await _balances(http_a, "acc_only_a"))["balances"] == {"USD": "3.03"}
            errors = []
            for account in ("acc_only_a", "acc_nobody"):
                async with http_b.get(f"/v1/accounts/{account}/balances") as answer:
                    assert answer.status == 404
                    error = (await answer.json())["error"]
                    errors.append({**error, "message": error["message"].replace(account, "ID")})
            assert errors[0] == errors[1]


async def test_a_row_whose_lower_pk_commits_later_is_still_streamed(settings):
    tenant, key = await tenant_with_key(settings, "late")
    async with api_process(settings_env(settings)) as api, api.client(key) as http:
        # after 0 for both: nothing depends on when the server reads the subscribe.
        after = {"acc_early": 0, "acc_late": 0}
        async with stream_client(http, accounts=list(after), after=after) as sc:
            held = await asyncpg.connect(settings.database_url)
            try:
                slow_tx = held.transaction()
                await slow_tx.start()
                await publish_many(held, [trade(1, "acc_late", id="evt_late")], tenant=tenant)
                # A higher pk commits first and is streamed while the lower one is in flight.
                await _publish(settings, tenant, [trade(2, "acc_early", id="evt_early")])
                await sc.wait_for(lambda s: s.last("acc_early") == 1, timeout_s=10, what="early")
                pks = await held.fetch("SELECT event_id, pk FROM delivery.outbox ORDER BY pk")
                assert [r["event_id"] for r in pks] == ["evt_late", "evt_early"]
                await slow_tx.commit()
            finally:
                await held.close()
            await sc.wait_for(lambda s: s.last("acc_late") == 1, timeout_s=10, what="late")
            assert [e["id"] for e in sc.events] == ["evt_early", "evt_late"]


async def test_sigterm_closes_stream_clients_with_1001_and_the_api_exits_0(settings):
    tenant, key = await tenant_with_key(settings, "drain")
    await _publish(settings, tenant, [trade(1, "acc_d", id="evt_d1")])
    async with (
        api_process(settings_env(settings)) as api,
        api.client(key) as http,
        stream_client(http, accounts=["acc_d"], after={"acc_d": 0}) as sc,
    ):
        await sc.wait_for(lambda s: s.last("acc_d") == 1, timeout_s=10, what="the event")
        # Within DELIVERY_SHUTDOWN_TIMEOUT_S (5 s here): an open stream is not waited on.
        assert await api.stop(timeout_s=4) == 0
        await asyncio.wait_for(sc.closed.wait(), 5)
        assert sc.close_code == 1001
