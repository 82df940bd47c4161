"""``delivery status`` says since when each unhealthy thing is unhealthy and which alert covers
it (issue #19 item 5), in text and in ``--json``, on the real services."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import asyncpg
import orjson
import pytest

from delivery import publish_many
from delivery.events import format_timestamp
from delivery.store import pausing, subscriptions
from delivery.store.states import SubscriptionState
from delivery.store.status import collect
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


async def _queues_down() -> tuple[dict[str, int | None], str | None]:
    return {}, "cannot connect to RabbitMQ: refused"


async def test_since_comes_from_the_row_that_went_unhealthy_and_is_kept_while_it_stays(settings):
    # Statements as the platform's writers make them, on the database alone (no pipeline).
    conn = await asyncpg.connect(settings.database_url)
    try:
        # Given a disabled subscription, a paced one, an outbox row 2 minutes old and a
        # recorded poison message
        gone = await subscriptions.add(conn, url="http://127.0.0.1:9/gone", patterns="*")
        paced = await subscriptions.add(conn, url="http://127.0.0.1:9/paced", patterns="*")
        await subscriptions.set_state(conn, gone.id, SubscriptionState.DISABLED, reason="gone")
        pace = "UPDATE delivery.subscriptions SET paced_until = $2 WHERE id = $1"
        now = await conn.fetchval("SELECT clock_timestamp()")
        await conn.execute(pace, paced.id, now + timedelta(minutes=5))
        first_paced = await conn.fetchval(
            "SELECT paced_since FROM delivery.subscriptions WHERE id = $1", paced.id
        )
        # A pause that extends one still in force keeps its start
        await conn.execute(pace, paced.id, now + timedelta(minutes=10))
        await publish_many(conn, [trade(1, id="evt_old")])
        await conn.execute(
            "UPDATE delivery.outbox SET created_at = clock_timestamp() - interval '2 minutes'"
        )
        await conn.execute(
            "INSERT INTO delivery.poison_messages (reason, body) VALUES ('unparseable', 'x')"
        )
        # and dead letters 40, 18 and 5 minutes ago on one subscription (the last two no more
        # than 15 minutes apart: one streak), and 20 minutes ago on another (no longer growing)
        dying = await subscriptions.add(conn, url="http://127.0.0.1:9/dying", patterns="*")
        quiet = await subscriptions.add(conn, url="http://127.0.0.1:9/quiet", patterns="*")
        for sub_id, minutes in ((dying.id, 40), (dying.id, 18), (dying.id, 5), (quiet.id, 20)):
            await conn.execute(
                "INSERT INTO delivery.deliveries"
                " (event_id, subscription_id, state, dead_reason, dead_at)"
                " VALUES ($1, $2, 'dead', 'permanent', $3)",
                f"evt_{sub_id}_{minutes}",
                sub_id,
                now - timedelta(minutes=minutes),
            )
        rows = await conn.fetch(
            "SELECT id, state_changed_at, paced_since FROM delivery.subscriptions"
        )
        oldest = await conn.fetchval("SELECT created_at FROM delivery.outbox")
        poisoned = await conn.fetchval("SELECT received_at FROM delivery.poison_messages")

        # When status is collected with RabbitMQ unreachable
        report = await collect(conn, _queues_down)
    finally:
        await conn.close()

    # Then each has its since and alert
    by_id = {r["id"]: r for r in rows}
    assert by_id[paced.id]["paced_since"] == first_paced is not None
    found = {u["kind"]: u for u in report["unhealthy"]}
    assert len(found) == len(report["unhealthy"])  # one of each kind: the quiet one is not
    assert found["disabled"]["since"] == format_timestamp(by_id[gone.id]["state_changed_at"])
    assert found["disabled"]["alert"] == "DeliverySubscriptionDisabled"
    assert found["disabled"]["detail"] == "gone"
    assert found["paced"]["since"] == format_timestamp(first_paced)
    assert found["paced"]["alert"] is None
    assert found["outbox_backlog"]["since"] == format_timestamp(oldest)
    assert found["outbox_backlog"]["alert"] == "DeliveryOutboxOldestAgeHigh"
    assert 110 < found["outbox_backlog"]["age_s"] < 3600
    assert found["poison_messages"]["since"] == format_timestamp(poisoned)
    assert found["poison_messages"]["alert"] == "DeliveryPoisonMessages"
    assert found["queues_unreachable"]["alert"] == "DeliveryRabbitMQUnreachable"
    growing = found["dead_letters_growing"]
    assert growing["since"] == format_timestamp(now - timedelta(minutes=18))
    assert dying.id in growing["subject"] and growing["detail"].startswith("2 dead letter(s)")
    assert growing["alert"] == "DeliveryDeadLettersGrowing"
    assert set(found) == {
        "disabled",
        "paced",
        "outbox_backlog",
        "poison_messages",
        "queues_unreachable",
        "dead_letters_growing",
    }
    # The longest unhealthy first: the streak of dead letters, then the backdated outbox row
    assert [u["kind"] for u in report["unhealthy"][:2]] == [
        "dead_letters_growing",
        "outbox_backlog",
    ]
