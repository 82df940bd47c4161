"""Rules that live in memory, tested without I/O: who a subscription matches."""

from __future__ import annotations

from dataclasses import replace
from datetime import UTC, datetime

from delivery.signing import generate_secret
from delivery.store.subscriptions import Subscription

_NOW = datetime(2026, 1, 1, tzinfo=UTC)


def _subscription(*, account_id: str | None, patterns: tuple[str, ...]) -> Subscription:
    return Subscription(
        id="sub_unit",
        url="http://127.0.0.1:9/h",
        event_patterns=patterns,
        account_id=account_id,
        state="active",
        disabled_reason=None,
        secret=generate_secret(),
        previous_secret=None,
        previous_secret_expires_at=None,
        retry_schedule_s=None,
        timeout_s=None,
        circuit_state="closed",
        circuit_retry_at=None,
        consecutive_failures=0,
        failing_since=None,
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
