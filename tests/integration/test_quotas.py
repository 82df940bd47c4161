"""A tenant's ingest rate on the real database: the atomic statement, and the limit holding
across separate OS processes that take from one tenant at once."""

from __future__ import annotations

import asyncio
import json
import sys

import asyncpg
import pytest

from delivery.errors import NotFoundError
from delivery.store import quotas, tenants
from delivery.testing.env import environment_without_settings
from delivery.testing.metrics import counter_value

pytestmark = pytest.mark.integration


async def test_a_burst_goes_then_the_tenant_waits_and_a_refusal_takes_nothing(settings):
    conn = await asyncpg.connect(settings.database_url)
    try:
        tenant = await tenants.add(conn, "rated", max_events_per_s=10)
        refused_before = counter_value(
            "delivery_ingest_rejected_events_total", outcome="over_rate"
        )
        first = await quotas.take(conn, tenant.id, 10)
        assert first.allowed and first.limit_per_s == 10 and first.remaining == 0
        refused = await quotas.take(conn, tenant.id, 3)
        assert not refused.allowed
        # 3 events need 0.3 s of the rate back: about that long from now.
        assert refused.retry_after_s == pytest.approx(0.3, abs=0.1)
        assert refused.headers()["Retry-After"] == "1"
        assert (
            counter_value("delivery_ingest_rejected_events_total", outcome="over_rate")
            == refused_before + 3
        )
        # The refusal consumed nothing: the TAT is where the burst left it.
        ahead_s = await conn.fetchval(
            "SELECT extract(epoch FROM tat - clock_timestamp())::float8"
            " FROM delivery.tenant_rates WHERE tenant_id = $1",
            tenant.id,
        )
        assert 0.8 < ahead_s <= 1.0
        too_big = await quotas.take(conn, tenant.id, 11)
        assert not too_big.allowed and too_big.retry_after_s is None
    finally:
        await conn.close()


async def test_an_unlimited_tenant_is_never_refused_and_an_unknown_one_is_an_error(settings):
    conn = await asyncpg.connect(settings.database_url)
    try:
        for _ in range(3):
            answer = await quotas.take(conn, tenants.DEFAULT_TENANT, 1000)
            assert answer.allowed and answer.limit_per_s is None and answer.headers() == {}
        assert await conn.fetchval("SELECT count(*) FROM delivery.tenant_rates") == 0
        with pytest.raises(NotFoundError, match="does not exist"):
            await quotas.take(conn, "ten_nobody", 1)
    finally:
        await conn.close()


async def _start_hammer(settings, tenant_id: str, seconds: float) -> asyncio.subprocess.Process:
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "delivery.testing.rate_hammer",
        settings.database_url,
        tenant_id,
        str(seconds),
        stdin=asyncio.subprocess.PIPE,
        stdout=asyncio.subprocess.PIPE,
        env=environment_without_settings(),
    )
    assert proc.stdout is not None
    line = await asyncio.wait_for(proc.stdout.readline(), 60)
    assert line == b"ready\n", line
    return proc


async def test_two_processes_share_one_tenants_rate(settings):
    # Given a tenant allowed 50 events/s (a burst of 50)
    conn = await asyncpg.connect(settings.database_url)
    try:
        tenant = await tenants.add(conn, "shared", max_events_per_s=50)
    finally:
        await conn.close()
    rate, burst, seconds = 50, 50, 3.0
    # When two separate processes take from it as fast as they can, started together
    procs = [await _start_hammer(settings, tenant.id, seconds) for _ in range(2)]
    for proc in procs:
        assert proc.stdin is not None
        proc.stdin.write(b"go\n")
        await proc.stdin.drain()
    results = []
    for proc in procs:
        out, _ = await asyncio.wait_for(proc.communicate(), 60)
        assert proc.returncode == 0
        results.append(json.loads(out))
    # Then what both were allowed together, over the interval measured around all their
    # requests, stays within one budget: rate * interval + burst. Had each process its own
    # budget, they would take about twice that.
    interval_s = max(r["end"] for r in results) - min(r["start"] for r in results)
    allowed = sum(r["allowed"] for r in results)
    bound = rate * interval_s + burst
    print(f"allowed {allowed} in {interval_s:.2f}s (bound {bound:.0f}); per process {results}")
    assert allowed <= bound
    # Both hammered hard enough to be refused, and the limiter let a fair share through.
    assert all(r["refused"] > 0 and r["allowed"] > 0 for r in results)
    assert allowed >= rate * seconds * 0.8
    # The bound tells one budget from two: each of two budgets alone would let at least
    # rate * seconds through, and the two together more than the bound.
    assert 2 * rate * seconds > bound
