"""The stream-freshness SLI (runbooks/slo.md): ``delivery_stream_frame_lag_seconds``, from an
event's outbox commit to its live frame written to a client, observed by a real
``delivery api`` process for a real WebSocket client."""

from __future__ import annotations

import aiohttp
import asyncpg
import pytest

from delivery.outbox import publish_many
from delivery.testing.api import api_process
from delivery.testing.factories import trade
from delivery.testing.stream import stream_client
from delivery.testing.waits import wait_until
from tests.support import settings_env, tenant_with_key

pytestmark = pytest.mark.integration

DEADLINE_S = 30.0
_NAME = "delivery_stream_frame_lag_seconds"


async def _histogram(http: aiohttp.ClientSession, url: str) -> dict[str, float]:
    """The histogram's ``_count``, ``_sum`` and buckets (by ``le``) as the process exports them."""
    out: dict[str, float] = {}
    async with http.get(url + "/metrics") as answer:
        for line in (await answer.text()).splitlines():
            if line.startswith(f"{_NAME}_count "):
                out["count"] = float(line.split()[1])
            elif line.startswith(f"{_NAME}_sum "):
                out["sum"] = float(line.split()[1])
            elif line.startswith(f'{_NAME}_bucket{{le="'):
                le = line.split('"')[1]
                out[le] = float(line.split()[1])
    return out


async def _publish(settings, tenant: str, events: list[dict[str, object]]) -> None:
    conn = await asyncpg.connect(settings.database_url)
    try:
        async with conn.transaction():
            await publish_many(conn, events, tenant=tenant)
    finally:
        await conn.close()


async def test_live_frames_observe_their_commit_to_send_lag(settings):
    tenant, key = await tenant_with_key(settings, "fresh")
    async with (
        api_process(settings_env(settings)) as api,
        api.client(key) as http,
        aiohttp.ClientSession() as plain,
        stream_client(http, accounts=["acc_f"], after={"acc_f": 0}) as client,
    ):
        # Given a client known to be registered (it received the first event, from history
        # or live), so everything committed after that comes live through its buffer
        await _publish(settings, tenant, [trade(0, "acc_f", id="evt_f0")])
        await client.wait_for(lambda s: s.last("acc_f") >= 1, timeout_s=DEADLINE_S, what="1")
        before = await _histogram(plain, api.admin_url)
        assert "count" in before, "the histogram is not exported"
        # When five more events are committed
        await _publish(settings, tenant, [trade(i, "acc_f", id=f"evt_f{i}") for i in range(1, 6)])
        await client.wait_for(lambda s: s.last("acc_f") >= 6, timeout_s=DEADLINE_S, what="6")

        # Then the histogram counted their batches (one to five), each between 0 and the
        # test's deadline
        async def observed() -> bool:
            return (await _histogram(plain, api.admin_url))["count"] > before["count"]

        await wait_until(observed, timeout_s=DEADLINE_S, what="a lag observation")
        after = await _histogram(plain, api.admin_url)
        added = after["count"] - before["count"]
        assert 1 <= added <= 5
        assert 0 <= after["sum"] - before["sum"] <= added * DEADLINE_S
        # Every new observation is in the buckets up to 30 s (the deadline), none above.
        assert after["30.0"] - before["30.0"] == added
