"""What on-call relies on: structured log events with context (and never a secret), trace
context carried end to end, and `delivery status --json` telling what is stuck."""

from __future__ import annotations

import json
import subprocess
import sys

import asyncpg
import pytest
from structlog.testing import capture_logs

from delivery import publish
from delivery.ops.logs import _redact
from delivery.store import subscriptions
from delivery.testing.factories import trade
from delivery.testing.receiver import Behaviour, Receiver
from delivery.testing.waits import wait_until
from tests.support import running, settings_env

pytestmark = pytest.mark.integration

TRACEPARENT = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"


async def test_trace_context_travels_from_producer_to_subscriber(settings):
    conn = await asyncpg.connect(settings.database_url)
    async with Receiver() as receiver:
        await subscriptions.add(conn, url=receiver.url("/h"), patterns="*")
        async with running(settings):
            await publish(conn, trade(1, id="evt_traced", traceparent=TRACEPARENT))
            await publish(conn, trade(2, id="evt_untraced"))
            await receiver.wait_for(lambda r: len(r.delivered()) == 2, timeout_s=30, what="both")
        by_id = {a.webhook_id: a for a in receiver.delivered()}
        assert by_id["evt_traced"].traceparent == TRACEPARENT
        assert by_id["evt_untraced"].traceparent is None
        # The trace context is transport metadata, not part of the signed envelope.
        assert b"traceparent" not in by_id["evt_traced"].body
    await conn.close()


async def test_failed_attempts_are_logged_with_context_and_never_the_secret(settings):
    settings = settings.model_copy(update={"retry_schedule_s": (0.05, 0.05)})
    conn = await asyncpg.connect(settings.database_url)
    async with Receiver() as receiver:
        receiver.set_behaviour("/h", Behaviour(status=503))
        sub = await subscriptions.add(conn, url=receiver.url("/h"), patterns="*")
        with capture_logs() as logs:
            async with running(settings):
                await publish(conn, trade(1, id="evt_logged"))
                await wait_until(
                    lambda: conn.fetchval("SELECT state = 'dead' FROM delivery.deliveries"),
                    timeout_s=30,
                    what="exhausted",
                )
        failed = [e for e in logs if e["event"] == "attempt_failed"]
        assert [e["attempt"] for e in failed] == [1, 2, 3]
        assert {e["event_id"] for e in failed} == {"evt_logged"}
        assert {e["subscription_id"] for e in failed} == {sub.id}
        assert [e["outcome"] for e in failed] == ["retry", "retry", "exhausted"]
        assert all(e["status"] == 503 for e in failed)
        everything = json.dumps(logs, default=str)
        assert sub.secret not in everything
        assert sub.secret.removeprefix("whsec_") not in everything
    await conn.close()


def test_the_redaction_processor_hides_secret_keys():
    event = _redact(None, "info", {"event": "x", "secret": "whsec_abc", "body": b"{}", "ok": 1})
    assert event == {"event": "x", "secret": "[redacted]", "body": "[redacted]", "ok": 1}


async def test_status_json_shows_a_growing_backlog_and_an_open_circuit(settings):
    conn = await asyncpg.connect(settings.database_url)
    env = settings_env(settings)

    def status() -> dict:
        result = subprocess.run(
            [sys.executable, "-m", "delivery", "status", "--json"],
            capture_output=True,
            text=True,
            env=env,
            timeout=30,
            check=True,
        )
        return json.loads(result.stdout)

    # No relay runs: events pile up in the outbox, and the report says since when.
    for i in range(3):
        await publish(conn, trade(i))
    await wait_until(
        lambda: conn.fetchval(
            "SELECT clock_timestamp() - min(created_at) > interval '0.2 s' FROM delivery.outbox"
        ),
        timeout_s=10,
        what="the backlog to age",
    )
    report = status()
    assert report["outbox"]["pending"] == 3
    assert report["outbox"]["oldest_age_s"] > 0.2

    settings = settings.model_copy(
        update={
            "circuit_failure_threshold": 2,
            "circuit_cooldown_s": 60,
            "retry_schedule_s": (0.05,) * 5,
        }
    )
    async with Receiver() as receiver:
        receiver.set_behaviour("/down", Behaviour(status=500))
        sub = await subscriptions.add(conn, url=receiver.url("/down"), patterns="*")
        async with running(settings):
            await wait_until(
                lambda: conn.fetchval("SELECT circuit_state = 'open' FROM delivery.subscriptions"),
                timeout_s=30,
                what="the circuit to open",
            )
            report = status()
    assert report["outbox"]["pending"] == 0
    (entry,) = report["subscriptions"]
    assert entry["id"] == sub.id and entry["circuit"] == "open"
    assert entry["consecutive_failures"] >= 2 and entry["failing_since"]
    assert entry["pending"] + entry["retrying"] == 3
    assert entry["last_success"] is None
    await conn.close()
