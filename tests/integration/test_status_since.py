"""``delivery status`` says since when each unhealthy thing is unhealthy and which alert covers
it (issue #19 item 5), in text and in ``--json``, on the real services."""

from __future__ import annotations

from datetime import UTC, datetime

import asyncpg
import orjson
import pytest

from delivery import publish_many
from delivery.events import format_timestamp
from delivery.store import pausing, subscriptions
from delivery.testing.api import api_process
from delivery.testing.factories import add_subscription, trade
from delivery.testing.receiver import Behaviour, Receiver, RefusingSubscriber, scripted_subscriber
from delivery.testing.waits import wait_until
from tests.support import cli, running, settings_env, tenant_with_key

pytestmark = pytest.mark.integration


async def test_status_names_since_when_and_the_alert_for_each_unhealthy_thing(settings):
    settings = settings.model_copy(
        update={
            "circuit_failure_threshold": 3,
            "circuit_cooldown_s": 60.0,  # stays open while the test reads it
            "retry_schedule_s": (0.05,) * 20,
        }
    )
    conn = await asyncpg.connect(settings.database_url)
    refusing = RefusingSubscriber(refused={("acc_1", 1)})
    try:
        async with Receiver() as receiver, scripted_subscriber(refusing.answer) as base:
            # Given a subscriber answering 500, an ordered one refusing an account's first
            # event, and a paused one
            receiver.set_behaviour("/down", Behaviour(status=500))
            down = await add_subscription(conn, receiver, "/down", patterns="trade.*")
            ordered = await subscriptions.add(
                conn, url=f"{base}/h", patterns="trade.*", ordered=True
            )
            held = await add_subscription(conn, receiver, "/held", patterns="account.closed")
            before_pause = await conn.fetchval("SELECT clock_timestamp()")
            await pausing.pause(conn, held.id)
            # When events flow until the circuit opens and the account is blocked
            async with running(settings):
                await publish_many(conn, [trade(i) for i in range(3)])
                await wait_until(
                    lambda: conn.fetchval(
                        "SELECT circuit_state = 'open' FROM delivery.subscriptions WHERE id = $1",
                        down.id,
                    ),
                    timeout_s=60,
                    what="the circuit to open",
                )
                await wait_until(
                    lambda: conn.fetchval(
                        "SELECT count(*) = 1 FROM delivery.deliveries WHERE state = 'dead'"
                    ),
                    timeout_s=60,
                    what="the ordered account's dead letter",
                )
            failing_since = await conn.fetchval(
                "SELECT failing_since FROM delivery.subscriptions WHERE id = $1", down.id
            )
            paused_at = await conn.fetchval(
                "SELECT state_changed_at FROM delivery.subscriptions WHERE id = $1", held.id
            )
            dead = await conn.fetchrow(
                "SELECT id, dead_at FROM delivery.deliveries WHERE state = 'dead'"
            )
    finally:
        await conn.close()
    assert failing_since is not None
    assert before_pause <= paused_at <= datetime.now(UTC)

    # Then --json lists each with its since and alert, next to the keys that were there
    report = orjson.loads(cli(settings, "status", "--json").stdout)
    assert {"outbox", "queues", "subscriptions", "blocked_accounts"} <= report.keys()
    found = {(u["kind"], u["subject"].split()[1]): u for u in report["unhealthy"]}
    circuit = found[("circuit_open", down.id)]
    assert circuit["since"] == format_timestamp(failing_since)
    assert circuit["alert"] == "DeliveryCircuitOpen"
    blocked = found[("account_blocked", ordered.id)]
    assert blocked["since"] == format_timestamp(dead["dead_at"])
    assert blocked["alert"] == "DeliveryOrderedAccountBlocked"
    assert f"dead letter {dead['id']}" in blocked["detail"]
    growing = found[("dead_letters_growing", ordered.id)]
    assert growing["since"] == format_timestamp(dead["dead_at"])
    assert growing["alert"] == "DeliveryDeadLettersGrowing"
    paused = found[("paused", held.id)]
    assert paused["since"] == format_timestamp(paused_at)
    assert paused["alert"] is None
    assert all(u["age_s"] >= 0 for u in report["unhealthy"])
    # The healthy one-off subscriptions are not listed; nothing else is unhealthy here
    assert set(found) == {
        ("circuit_open", down.id),
        ("account_blocked", ordered.id),
        ("dead_letters_growing", ordered.id),
        ("paused", held.id),
    }

    # And the text says the same on one line each
    lines = cli(settings, "status").stdout.splitlines()
    (circuit_line,) = [line for line in lines if line.strip().startswith("circuit_open")]
    assert down.id in circuit_line
    assert f"since {format_timestamp(failing_since)} (" in circuit_line
    assert circuit_line.endswith("alert: DeliveryCircuitOpen")
    (blocked_line,) = [line for line in lines if line.strip().startswith("account_blocked")]
    assert f"since {format_timestamp(dead['dead_at'])} (" in blocked_line
    assert blocked_line.endswith("alert: DeliveryOrderedAccountBlocked")
    (paused_line,) = [line for line in lines if line.strip().startswith("paused")]
    assert paused_line.endswith("alert: none")

    # And on-call's API overview carries the same list
    _, operator = await tenant_with_key(settings, "oncall", "operator")
    async with (
        api_process(settings_env(settings)) as api,
        api.client(operator) as ops,
        ops.get("/v1/ops/overview") as answer,
    ):
        assert answer.status == 200
        overview = await answer.json()
    listed = {(u["kind"], u["subject"].split()[1]): u["alert"] for u in overview["unhealthy_since"]}
    assert listed == {key: u["alert"] for key, u in found.items()}
