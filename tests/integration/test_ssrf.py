"""The SSRF guard at connect time: a subscription whose host resolves to a blocked address now
(DNS rebinding, or a row written through the library, which does not resolve) gets no request;
its attempt is a permanent failure with the reason ``blocked target``.

Only 127.0.0.0/8 is ever targeted: the receiver listens there, and the test proves it is never
reached while the guard is on.
"""

from __future__ import annotations

import asyncpg
import pytest

from delivery import publish_many
from delivery.store import subscriptions
from delivery.testing.factories import trade
from delivery.testing.receiver import Receiver
from tests.support import run_until_idle

pytestmark = pytest.mark.integration


@pytest.mark.parametrize(
    "host",
    [
        "localhost",  # a name that resolves to loopback: the resolver refuses it
        "0x7f.1",  # a legacy form only getaddrinfo turns into 127.0.0.1: the resolver too
        "127.0.0.1",  # an address aiohttp connects to without resolving it: the sender
        "2130706433",  # decimal, which aiohttp also takes for an address
        "[::ffff:127.0.0.1]",  # IPv4-mapped
    ],
)
async def test_a_blocked_target_gets_no_request_and_the_attempt_is_permanent(settings, host):
    guarded = settings.model_copy(update={"allow_private_targets": False})
    conn = await asyncpg.connect(settings.database_url)
    try:
        async with Receiver() as receiver:
            # What the guard at create time would have refused, written as it was typed (as a
            # row from before URLs were canonicalised): the library add does not resolve.
            url = f"http://{host}:{receiver.port}/h"
            sub = await subscriptions.add(conn, url=url, patterns="*")
            await conn.execute(
                "UPDATE delivery.subscriptions SET url = $2 WHERE id = $1", sub.id, url
            )
            await publish_many(conn, [trade(1, id="evt_ssrf")])
            await run_until_idle(guarded)
            assert receiver.arrivals == []
        delivery = await conn.fetchrow(
            "SELECT state, attempts, dead_reason FROM delivery.deliveries WHERE subscription_id = $1",
            sub.id,
        )
        assert delivery["state"] == "dead" and delivery["attempts"] == 1
        assert delivery["dead_reason"].startswith("blocked target: ")
        attempts = await conn.fetch("SELECT outcome, status, error FROM delivery.attempts")
        assert [(a["outcome"], a["status"]) for a in attempts] == [("permanent", None)]
        assert attempts[0]["error"].startswith("blocked target: ")
    finally:
        await conn.close()


async def test_with_private_targets_allowed_the_same_subscription_is_delivered(settings):
    # The control: the guard, not the URL, is what stopped the requests above.
    assert settings.allow_private_targets
    conn = await asyncpg.connect(settings.database_url)
    try:
        async with Receiver() as receiver:
            sub = await subscriptions.add(
                conn, url=f"http://localhost:{receiver.port}/h", patterns="*"
            )
            receiver.expect_secret("/h", sub.secret)
            await publish_many(conn, [trade(1, id="evt_allowed")])
            await run_until_idle(settings)
            assert receiver.unique_ids("/h") == {"evt_allowed"}
    finally:
        await conn.close()
