"""The live stream through two real WebSocket clients and a real ``delivery api`` process: the
``websockets`` library across a disconnect and a resume, and the reference client
(``delivery.stream``) rebuilding balances while events are published and its connection is cut."""

from __future__ import annotations

import asyncio
import itertools
from collections.abc import Sequence
from decimal import Decimal
from typing import Any

import aiohttp
import asyncpg
import orjson
import pytest
import websockets

from delivery.errors import StreamRefusedError
from delivery.outbox import publish_many
from delivery.stream import BalanceStream
from delivery.testing.api import api_process
from delivery.testing.factories import balance, trade
from delivery.testing.waits import wait_until
from tests.support import settings_env, tenant_with_key

pytestmark = pytest.mark.integration

_ASSETS = ("USD", "BTC", "ETH")
_ids = itertools.count(1)


def _balance_event(account: str, i: int) -> dict[str, object]:
    event = balance(i, account, id=f"evt_c{next(_ids)}")
    data = dict(event["data"])  # type: ignore[call-overload]
    data["asset"] = _ASSETS[i % len(_ASSETS)]
    data["balance"] = f"{i}.{i % 100:02d}"
    return {**event, "data": data}


async def _publish(settings, tenant: str, events: Sequence[dict[str, object]]) -> None:
    conn = await asyncpg.connect(settings.database_url)
    try:
        async with conn.transaction():
            await publish_many(conn, events, tenant=tenant)
    finally:
        await conn.close()


async def _balances(http: aiohttp.ClientSession, account: str) -> dict[str, Any]:
    async with http.get(f"/v1/accounts/{account}/balances") as answer:
        assert answer.status == 200, await answer.text()
        return await answer.json()


async def test_websockets_library_across_a_disconnect_and_a_resume(settings):
    tenant, key = await tenant_with_key(settings, "ws")
    accounts = ["acc_w1", "acc_w2"]
    await _publish(
        settings,
        tenant,
        [trade(i, a, id=f"evt_c{next(_ids)}") for a in accounts for i in range(20)],
    )
    async with api_process(settings_env(settings)) as api:
        url = api.url.replace("http://", "ws://") + "/v1/stream"
        headers = {"Authorization": f"Bearer {key}"}
        seen: dict[str, list[int]] = {a: [] for a in accounts}

        async def read(ws: websockets.ClientConnection, until: dict[str, int]) -> None:
            async for raw in ws:
                obj = orjson.loads(raw)
                if obj.get("op") == "heartbeat":
                    continue
                seen[obj["account_id"]].append(obj["sequence"])
                if all(seen[a] and seen[a][-1] >= n for a, n in until.items()):
                    return

        def after() -> dict[str, int]:
            return {a: (s[-1] if s else 0) for a, s in seen.items()}

        async with websockets.connect(url, additional_headers=headers) as ws:
            await ws.send(
                orjson.dumps({"op": "subscribe", "accounts": accounts, "after": after()}).decode()
            )
            await asyncio.wait_for(read(ws, {"acc_w1": 7, "acc_w2": 3}), 20)
        # Disconnected (the client closed after a few); more events are committed meanwhile.
        await _publish(
            settings,
            tenant,
            [trade(i, a, id=f"evt_c{next(_ids)}") for a in accounts for i in range(20, 30)],
        )
        async with websockets.connect(url, additional_headers=headers) as ws:
            await ws.send(
                orjson.dumps({"op": "subscribe", "accounts": accounts, "after": after()}).decode()
            )
            await _publish(
                settings,
                tenant,
                [trade(i, a, id=f"evt_c{next(_ids)}") for a in accounts for i in range(30, 35)],
            )
            await asyncio.wait_for(read(ws, dict.fromkeys(accounts, 35)), 20)
        for a in accounts:
            assert seen[a] == list(range(1, 36)), a
        # The reference client gives up at once, with one error, on a key the API refuses.
        with pytest.raises(StreamRefusedError, match="401"):
            async with BalanceStream(api.url, "dk_wrong", accounts):
                pass


async def test_reference_client_rebuilds_balances_across_an_api_restart_while_publishing(
    settings,
):
    tenant, key = await tenant_with_key(settings, "refclient")
    accounts = ["acc_r1", "acc_r2", "acc_r3"]
    await _publish(settings, tenant, [_balance_event(a, i) for a in accounts for i in range(5)])
    env = settings_env(settings)
    async with (
        api_process(env) as first,
        BalanceStream(first.url, key, accounts, backoff_initial_s=0.05) as stream,
    ):
        assert {a: stream.last_sequence(a) for a in accounts} == dict.fromkeys(accounts, 5)
        received: dict[str, list[int]] = {a: [] for a in accounts}

        events = aiter(stream)  # from now on every applied event is also queued for us

        async def drain() -> None:
            async for event in events:
                received[event["account_id"]].append(event["sequence"])

        rounds = 0
        enough = asyncio.Event()

        async def producers() -> None:
            nonlocal rounds
            while not enough.is_set():
                i = 5 + rounds
                round_ = [_balance_event(a, i) for a in accounts]
                round_.append(trade(i, accounts[i % 3], id=f"evt_c{next(_ids)}"))
                await _publish(settings, tenant, round_)
                rounds += 1

        async with asyncio.TaskGroup() as tasks:
            draining = tasks.create_task(drain())
            publishing = tasks.create_task(producers())
            await stream.caught_up(dict.fromkeys(accounts, 8), timeout_s=30)
            # Cut the connection mid-run: SIGTERM closes the stream with 1001, the client's
            # reconnects are refused until a new process listens on the same port.
            assert await first.stop(timeout_s=10) == 0
            await wait_until(
                lambda: 1001 in stream.close_codes, timeout_s=10, what="the 1001 close"
            )
            at_cut = {a: stream.last_sequence(a) for a in accounts}
            # Events committed while no server is up reach the client only by the resume.
            rounds_at_cut = rounds
            await wait_until(
                lambda: rounds >= rounds_at_cut + 5, timeout_s=30, what="publishing while down"
            )
            async with api_process(env, port=first.port) as second, second.client(key) as http:
                await stream.caught_up({a: n + 10 for a, n in at_cut.items()}, timeout_s=30)
                assert stream.connections >= 2
                enough.set()
                await publishing
                # The snapshot taken afterwards equals what the client rebuilt.
                final = {a: await _balances(http, a) for a in accounts}
                await stream.caught_up(
                    {a: int(final[a]["sequence"]) for a in accounts}, timeout_s=30
                )
                for a in accounts:
                    want = {k: Decimal(v) for k, v in final[a]["balances"].items()}
                    assert stream.balances(a) == want, a
                    assert stream.last_sequence(a) == final[a]["sequence"]
                # Through the iterator: per account exactly 6..final, once each, in order.
                await wait_until(
                    lambda: all(len(received[a]) == final[a]["sequence"] - 5 for a in accounts),
                    timeout_s=10,
                    what="the iterator to drain",
                )
                for a in accounts:
                    assert received[a] == list(range(6, int(final[a]["sequence"]) + 1)), a
            draining.cancel()
