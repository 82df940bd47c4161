"""SIGTERM while attempts are in flight: ``delivery run`` drains within
``DELIVERY_SHUTDOWN_TIMEOUT_S`` and hands back, lease cleared, everything it cannot finish.

Each test holds three deliveries of one subscriber in a process that may send it one request at
a time: one is being POSTed, two wait in the process for the request slot.
"""

from __future__ import annotations

import asyncio
import signal
from collections.abc import Callable

import asyncpg
import pytest
from aiohttp import web

from delivery import publish_many
from delivery.store import subscriptions
from delivery.testing.factories import trade
from delivery.testing.receiver import Behaviour, Receiver, scripted_subscriber
from delivery.testing.waits import wait_until
from tests.support import read_until, start_worker

pytestmark = pytest.mark.integration

_ONE_REQUEST_AT_A_TIME = {"DELIVERY_PER_SUBSCRIPTION_MAX_IN_FLIGHT": "1"}
_ROWS = "SELECT event_id, state, attempts, lease_until FROM delivery.deliveries ORDER BY event_id"


async def _three_held_one_in_flight(
    settings, conn: asyncpg.Connection, in_flight: Callable[[], bool]
) -> asyncio.subprocess.Process:
    await publish_many(conn, [trade(i, id=f"evt_drain_{i}") for i in range(3)])
    proc = await start_worker(settings, command="run", **_ONE_REQUEST_AT_A_TIME)
    await wait_until(in_flight, timeout_s=60, what="a request in flight")
    await wait_until(
        lambda: conn.fetchval(
            "SELECT count(*) = 3 FROM delivery.deliveries WHERE lease_until IS NOT NULL"
        ),
        timeout_s=30,
        what="all three held by the worker",
    )
    return proc


async def test_sigterm_lets_the_in_flight_attempt_finish_and_hands_queued_work_back(settings):
    """Kills drain-deadline-zero (the in-flight attempt is cut at once) and
    drain-queued-not-handed-back (the queued deliveries keep their leases). The subscriber
    answers only once the worker has logged that its drain began, so the attempt is in flight
    across the signal whatever the machine's speed."""
    settings = settings.model_copy(update={"shutdown_timeout_s": 10.0})
    conn = await asyncpg.connect(settings.database_url)
    answer = asyncio.Event()
    posted: list[str] = []
    answered: list[str] = []

    async def answer_when_told(request: web.Request) -> web.Response:
        await request.read()
        posted.append(request.headers["webhook-id"])
        await answer.wait()
        answered.append(request.headers["webhook-id"])
        return web.Response(text="ok")

    async with scripted_subscriber(answer_when_told) as base:
        await subscriptions.add(conn, url=f"{base}/hook", patterns="*")
        proc = await _three_held_one_in_flight(settings, conn, lambda: len(posted) == 1)
        try:
            # When SIGTERM arrives while the subscriber has not answered yet
            proc.send_signal(signal.SIGTERM)
            assert proc.stderr is not None
            await asyncio.wait_for(read_until(proc.stderr, b"shutdown_started"), 30)
        finally:
            answer.set()
        assert await asyncio.wait_for(proc.wait(), 60) == 0
    # Then the attempt finished and its success was recorded before the exit
    assert posted == answered and len(posted) == 1
    rows = {r["event_id"]: dict(r) for r in await conn.fetch(_ROWS)}
    done = rows.pop(posted[0])
    assert (done["state"], done["attempts"], done["lease_until"]) == ("delivered", 1, None)
    # And the two that waited for the request slot went back to PostgreSQL unattempted
    assert [(r["state"], r["attempts"], r["lease_until"]) for r in rows.values()] == [
        ("pending", 0, None)
    ] * 2
    await conn.close()


async def test_sigterm_past_the_drain_deadline_hands_every_held_delivery_back(settings):
    """Kills drain-no-hand-back: the attempt cancelled at the deadline (and the queued ones
    cancelled with it) must not keep their leases, or nobody retries them until those end."""
    settings = settings.model_copy(
        update={"shutdown_timeout_s": 1.0, "http_timeout_s": 30.0, "delivery_lease_s": 120.0}
    )
    conn = await asyncpg.connect(settings.database_url)
    async with Receiver() as receiver:
        receiver.set_behaviour("/hang", Behaviour(hang=True))
        await subscriptions.add(conn, url=receiver.url("/hang"), patterns="*")
        proc = await _three_held_one_in_flight(
            settings, conn, lambda: receiver.max_concurrent("/hang") == 1
        )
        proc.send_signal(signal.SIGTERM)
        assert await asyncio.wait_for(proc.wait(), 60) == 0
        assert len(receiver.arrivals) == 1
        rows = await conn.fetch(_ROWS)
        assert [(r["state"], r["attempts"], r["lease_until"]) for r in rows] == [
            ("pending", 0, None)
        ] * 3
    await conn.close()
