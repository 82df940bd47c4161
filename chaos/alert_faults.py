"""Faults that trip the alerts of the newer failure modes (issue 19, item 4): an outcome
PostgreSQL refuses (the loop breaker), a tenant publishing over its ingest rate, live-stream
clients that fall behind. Each records its window in ``ctx.faults`` like ``chaos.faults``.

The quota and stream faults talk to a `delivery api` process of the run (``Layout(apis=1)``),
over HTTP and WebSocket on loopback, as a producer and a stream client would.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import time
from collections.abc import Collection
from typing import Any

import aiohttp
import asyncpg

from chaos.context import RunContext
from delivery.store import keys, tenants
from delivery.store.dead_letters import Selector, replay
from delivery.store.pool import create_pool

__all__ = ["outcomes_refused", "over_quota", "replay_dead_letters", "slow_stream_clients"]

_HTTP_TIMEOUT_S = 10.0


async def _subscription_id(ctx: RunContext, path: str) -> str:
    conn = await asyncpg.connect(ctx.cluster.db_url)
    try:
        found = await conn.fetchval(
            "SELECT id FROM delivery.subscriptions WHERE url LIKE '%' || $1", path
        )
    finally:
        await conn.close()
    if found is None:
        raise LookupError(f"no subscription at {path}")
    return str(found)


# -- the loop breaker -----------------------------------------------------------------------

# PostgreSQL refuses every attempt row of one subscription (a trigger here; in life a
# constraint, a trigger or a full disk): its attempts are POSTed, answered 2xx, and cannot be
# recorded, so each delivery is handed back, and the third time it goes to the dead letters.
_REFUSE = """
CREATE FUNCTION delivery.chaos_refuse_outcome() RETURNS trigger LANGUAGE plpgsql AS $fn$
BEGIN
    IF (SELECT subscription_id FROM delivery.deliveries WHERE id = NEW.delivery_id) = '{sub}' THEN
        RAISE EXCEPTION 'chaos: outcome refused';
    END IF;
    RETURN NEW;
END $fn$;
CREATE TRIGGER chaos_refuse_outcome BEFORE INSERT ON delivery.attempts
    FOR EACH ROW EXECUTE FUNCTION delivery.chaos_refuse_outcome();
"""
_ALLOW = """
DROP TRIGGER IF EXISTS chaos_refuse_outcome ON delivery.attempts;
DROP FUNCTION IF EXISTS delivery.chaos_refuse_outcome();
"""
_LOOPS_BROKEN = """
SELECT count(*) FROM delivery.deliveries
WHERE subscription_id = $1 AND state = 'dead' AND unrecorded_handbacks > 0
"""


async def outcomes_refused(
    ctx: RunContext, path: str, *, min_dead: int, timeout_s: float = 120.0
) -> int:
    """Refuse the outcomes of the subscription at ``path`` until ``min_dead`` of its
    deliveries went to the dead letters through the loop breaker (at most ``timeout_s``), then
    allow them again. Returns how many were dead-lettered so."""
    sub = await _subscription_id(ctx, path)
    conn = await asyncpg.connect(ctx.cluster.db_url)
    try:
        async with ctx.faults.window("outcome-refused", path):
            await conn.execute(_REFUSE.format(sub=sub))
            try:
                deadline = time.monotonic() + timeout_s
                while time.monotonic() < deadline:
                    dead = int(await conn.fetchval(_LOOPS_BROKEN, sub))
                    if dead >= min_dead:
                        break
                    await asyncio.sleep(0.25)
            finally:
                await conn.execute(_ALLOW)
        return int(await conn.fetchval(_LOOPS_BROKEN, sub))
    finally:
        await conn.close()


async def replay_dead_letters(ctx: RunContext, path: str) -> int:
    """What the runbook (runbooks/attempt-loop.md) has on-call do once the cause is gone:
    replay the subscription's dead letters. Returns how many were replayed."""
    sub = await _subscription_id(ctx, path)
    pool = await create_pool(ctx.cluster.db_url, min_size=1, max_size=2)
    try:
        replayed, _skipped = await replay(pool, Selector(subscription_id=sub))
    finally:
        await pool.close()
    return replayed


# -- a tenant over its quota ----------------------------------------------------------------


async def _tenant_key(
    ctx: RunContext, name: str, scopes: Collection[keys.Scope], *, max_events_per_s: int | None
) -> tuple[str, str]:
    """A tenant (or the default one, when ``name`` is "default") and a new key: (id, key)."""
    conn = await asyncpg.connect(ctx.cluster.db_url)
    try:
        if name == "default":
            tenant_id = "default"
        else:
            tenant = await tenants.add(conn, name, max_events_per_s=max_events_per_s)
            tenant_id = tenant.id
        _listing, key = await keys.create(conn, tenant_id, scopes)
    finally:
        await conn.close()
    return tenant_id, key


def _quota_batch(n: int, size: int) -> dict[str, Any]:
    return {
        "events": [
            {
                "type": "account.created",
                "account_id": f"quota-{(n * size + i) % 50}",
                "data": {"owner": f"owner {n}-{i}", "currency": "USD"},
            }
            for i in range(size)
        ]
    }


async def over_quota(
    ctx: RunContext,
    *,
    max_events_per_s: int,
    factor: float,
    until_firing: frozenset[str],
    cap_s: float,
    senders: int = 4,
) -> dict[str, int]:
    """A producer of another tenant (quota ``max_events_per_s``) POSTs batches of one
    second's worth to `delivery api` at ``factor`` times its quota from ``senders``
    connections at once (one slow answer must not slow the offence to within the quota),
    honouring no Retry-After, until the alerts ``until_firing`` fire or ``cap_s``. Its events
    have no subscription: the platform's other tenants must not notice. Returns the answers by
    status."""
    _tenant, key = await _tenant_key(
        ctx, "chaos-over-quota", [keys.Scope.PUBLISH], max_events_per_s=max_events_per_s
    )
    statuses: dict[str, int] = {}
    interval_s = senders / factor  # each sender: one batch (a second's worth) per interval
    stop = asyncio.Event()

    async def sender(http: aiohttp.ClientSession, which: int) -> None:
        n = which
        while not stop.is_set():
            began = time.monotonic()
            try:
                async with http.post(
                    "/v1/events", json=_quota_batch(n, max_events_per_s)
                ) as answer:
                    await answer.read()
                    status = str(answer.status)
            except (aiohttp.ClientError, TimeoutError, OSError) as exc:
                status = type(exc).__name__
            statuses[status] = statuses.get(status, 0) + 1
            n += senders
            await asyncio.sleep(max(0.0, interval_s - (time.monotonic() - began)))

    detail = f"{max_events_per_s}/s quota, x{factor:g}"
    async with (
        aiohttp.ClientSession(
            base_url=ctx.cluster.api_url(),
            headers={"Authorization": f"Bearer {key}"},
            timeout=aiohttp.ClientTimeout(total=_HTTP_TIMEOUT_S),
        ) as http,
        ctx.faults.window("over-quota", "tenant chaos-over-quota", detail),
        asyncio.TaskGroup() as tasks,
    ):
        for which in range(senders):
            tasks.create_task(sender(http, which))
        await ctx.until_firing(until_firing, cap_s)
        stop.set()
    return statuses


# -- live-stream clients that fall behind ---------------------------------------------------

# A receive buffer this small (the kernel doubles it) makes the server's socket block after a
# few dozen frames, so a client that does not read falls behind within the server's buffer of
# DELIVERY_STREAM_BUFFER_EVENTS frames, as a phone on a bad network would.
_SMALL_RCVBUF_BYTES = 4096


def _small_receive_buffer(addr_info: Any) -> socket.socket:
    family, kind, proto, _name, _addr = addr_info
    sock = socket.socket(family, kind, proto)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, _SMALL_RCVBUF_BYTES)
    return sock


async def _one_slow_client(
    http: aiohttp.ClientSession, accounts: list[str], stall_s: float
) -> int | None:
    """Connect, subscribe from the start of every account, read nothing for ``stall_s``, then
    read until the server closes (or a few seconds more). Returns the close code."""
    async with http.ws_connect("/v1/stream", heartbeat=None, autoping=True) as ws:
        after = dict.fromkeys(accounts, 0)
        await ws.send_json({"op": "subscribe", "accounts": accounts, "after": after})
        await asyncio.sleep(stall_s)
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(5.0):
                async for _msg in ws:
                    pass
        return ws.close_code


async def slow_stream_clients(
    ctx: RunContext,
    accounts: list[str],
    *,
    stall_s: float,
    until_firing: frozenset[str],
    cap_s: float,
    parallel: int = 3,
) -> dict[str, int]:
    """``parallel`` live-stream clients of the default tenant, each one connection after
    another, each stalling (not reading) for ``stall_s`` from the first event of ``accounts``,
    while the producers run, until the alerts ``until_firing`` fire, ``cap_s`` passed or
    production ended. Returns the close codes seen."""
    _tenant, key = await _tenant_key(ctx, "default", [keys.Scope.READ], max_events_per_s=None)
    codes: dict[str, int] = {}
    stop = asyncio.Event()

    async def client(http: aiohttp.ClientSession) -> None:
        while not stop.is_set() and ctx.producing:
            try:
                code: object = await _one_slow_client(http, accounts, stall_s)
            except (aiohttp.ClientError, OSError) as exc:
                code = type(exc).__name__
            codes[str(code)] = codes.get(str(code), 0) + 1

    async def clients() -> None:
        connector = aiohttp.TCPConnector(socket_factory=_small_receive_buffer)
        async with (
            aiohttp.ClientSession(
                base_url=ctx.cluster.api_url(),
                headers={"Authorization": f"Bearer {key}"},
                connector=connector,
            ) as http,
            asyncio.TaskGroup() as group,
        ):
            for _ in range(parallel):
                group.create_task(client(http))

    async with (
        ctx.faults.window("stream-clients-stalling", "delivery api /v1/stream"),
        asyncio.TaskGroup() as tasks,
    ):
        stalling = tasks.create_task(clients())
        fired = tasks.create_task(ctx.until_firing(until_firing, cap_s))
        # Without new events nobody falls behind: the fault ends with production too.
        await asyncio.wait((stalling, fired), return_when=asyncio.FIRST_COMPLETED)
        stop.set()
        fired.cancel()
    return codes
