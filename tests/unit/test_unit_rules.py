"""Rules that live in memory, tested without I/O: who a subscription matches, how long a
failing loop waits, why a message was dead-lettered."""

from __future__ import annotations

from dataclasses import replace
from datetime import UTC, datetime
from types import SimpleNamespace
from typing import Any

import pytest

from delivery.aio import backoff_s
from delivery.broker.wire import SINGLE
from delivery.events import Envelope, render_body
from delivery.signing import generate_secret
from delivery.store.states import CircuitState, SubscriptionState
from delivery.store.subscriptions import Subscription
from delivery.worker.poison import Cause, describe

_NOW = datetime(2026, 1, 1, tzinfo=UTC)


def _subscription(*, account_id: str | None, patterns: tuple[str, ...]) -> Subscription:
    return Subscription(
        id="sub_unit",
        tenant_id="default",
        url="http://127.0.0.1:9/h",
        event_patterns=patterns,
        account_id=account_id,
        state=SubscriptionState.ACTIVE,
        disabled_reason=None,
        secret=generate_secret(),
        previous_secret=None,
        previous_secret_expires_at=None,
        retry_schedule_s=None,
        timeout_s=None,
        circuit_state=CircuitState.CLOSED,
        circuit_retry_at=None,
        consecutive_failures=0,
        failing_since=None,
        paced_until=None,
        created_at=_NOW,
        updated_at=_NOW,
    )


def test_a_subscription_to_one_account_gets_only_that_accounts_events():
    sub = _subscription(account_id="acc_1", patterns=("*",))
    assert sub.matches("trade.executed", "acc_1")
    assert not sub.matches("trade.executed", "acc_2")
    assert not sub.matches("account.balance_changed", "acc_10")


def test_a_subscription_without_an_account_gets_every_accounts_matching_events():
    sub = _subscription(account_id=None, patterns=("trade.*",))
    assert sub.matches("trade.executed", "acc_1")
    assert sub.matches("trade.executed", "acc_2")
    assert not sub.matches("account.balance_changed", "acc_1")


def test_account_and_pattern_must_both_match():
    sub = _subscription(account_id="acc_1", patterns=("trade.*",))
    assert sub.matches("trade.executed", "acc_1")
    assert not sub.matches("account.balance_changed", "acc_1")  # right account, wrong type
    assert not sub.matches("trade.executed", "acc_9")  # right type, wrong account
    assert replace(sub, account_id="acc_9").matches("trade.executed", "acc_9")


def test_backoff_doubles_per_failure_up_to_its_cap():
    assert [backoff_s(n) for n in range(1, 8)] == pytest.approx([0.2, 0.4, 0.8, 1.6, 3.2, 5, 5])
    assert backoff_s(3, base_s=0.5, max_s=10.0) == pytest.approx(4.0)
    assert backoff_s(5, base_s=0.5, max_s=10.0) == 10.0
    # A loop failing for hours never turns its wait into an OverflowError.
    assert backoff_s(100_000) == 5.0


def _dead_lettered(body: bytes, broker_reason: str) -> Any:
    death = {"reason": broker_reason, "count": 3, "queue": "q"}
    return SimpleNamespace(body=body, content_type=SINGLE, headers={"x-death": [death]})


def test_a_dead_letter_is_told_apart_by_its_cause_not_by_the_words_of_its_reason():
    ours = render_body(
        Envelope("evt_1", "account.closed", "a", 1, datetime(2026, 1, 1, tzinfo=UTC), {})
    )
    crash_loop = describe(_dead_lettered(ours, "delivery_limit"))
    assert (crash_loop.cause, crash_loop.count) == (Cause.DELIVERY_LIMIT, 3)
    assert crash_loop.reason == "redelivered past x-delivery-limit (crash loop?)"
    rejected = describe(_dead_lettered(ours, "expired"))
    assert rejected.cause is Cause.BROKER
    assert rejected.reason == "dead-lettered by the broker: expired"
    # Not ours: whatever the broker says, it is poison (never redriven).
    garbage = describe(_dead_lettered(b"not json", "delivery_limit"))
    assert garbage.cause is Cause.UNPROCESSABLE
    assert garbage.reason.startswith("unprocessable: body is not JSON")
