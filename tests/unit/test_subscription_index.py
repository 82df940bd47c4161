"""The in-memory subscription index picks exactly what ``Subscription.matches`` within the
event's tenant picks, through adds, edits, state changes and removals (pure: no services)."""

from __future__ import annotations

import dataclasses
import random
from datetime import UTC, datetime

from delivery.store.states import CircuitState, SubscriptionState
from delivery.store.subscriptions import Subscription
from delivery.worker.index import SubscriptionIndex

_NOW = datetime(2026, 12, 1, tzinfo=UTC)
_TYPES = ["trade.executed", "trade.cancelled", "account.created", "account.balance_changed"]
_PATTERNS = ["*", "trade.*", "account.*", "trade.executed", "account.b*", "acc?unt.closed"]


def _sub(
    i: str, tenant: str = "default", account: str | None = None, *patterns: str
) -> Subscription:
    return Subscription(
        id=i,
        tenant_id=tenant,
        url="https://example.com/hook",
        event_patterns=patterns or ("*",),
        account_id=account,
        state=SubscriptionState.ACTIVE,
        disabled_reason=None,
        secret="whsec_x",
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


def _ids(subs: list[Subscription]) -> list[str]:
    return sorted(s.id for s in subs)


def test_by_tenant_then_account_plus_account_less_then_pattern():
    index = SubscriptionIndex(
        [
            _sub("all"),
            _sub("trades", "default", None, "trade.*"),
            _sub("acc_1", "default", "acc_1"),
            _sub("acc_1_closed", "default", "acc_1", "account.closed"),
            _sub("acc_2", "default", "acc_2"),
            _sub("other_tenant", "t_other", None),
            _sub("other_tenant_acc_1", "t_other", "acc_1"),
        ]
    )
    assert _ids(index.match("default", "trade.executed", "acc_1")) == ["acc_1", "all", "trades"]
    assert _ids(index.match("default", "account.closed", "acc_1")) == [
        "acc_1",
        "acc_1_closed",
        "all",
    ]
    assert _ids(index.match("default", "account.closed", "acc_3")) == ["all"]
    assert _ids(index.match("t_other", "trade.executed", "acc_1")) == [
        "other_tenant",
        "other_tenant_acc_1",
    ]
    assert index.match("t_none", "trade.executed", "acc_1") == []


def test_changes_apply_at_once_even_after_a_type_was_looked_up():
    index = SubscriptionIndex([_sub("s1", "default", "acc_1", "trade.*")])
    assert _ids(index.match("default", "trade.executed", "acc_1")) == ["s1"]  # memoised
    # Its patterns change: the remembered answer for that type is forgotten.
    index.put(_sub("s1", "default", "acc_1", "account.*"))
    assert index.match("default", "trade.executed", "acc_1") == []
    # It moves to another account.
    index.put(_sub("s1", "default", "acc_2", "trade.*"))
    assert index.match("default", "trade.executed", "acc_1") == []
    assert _ids(index.match("default", "trade.executed", "acc_2")) == ["s1"]
    # Paused and disabled ones stay matched (dispatch keeps their events); the object
    # returned is the newest one.
    for state in (SubscriptionState.PAUSED, SubscriptionState.DISABLED):
        index.put(dataclasses.replace(_sub("s1", "default", "acc_2", "trade.*"), state=state))
        assert [s.state for s in index.match("default", "trade.executed", "acc_2")] == [state]
    # A removed one is dropped, as is a deleted one.
    index.put(dataclasses.replace(_sub("s1"), state=SubscriptionState.REMOVED))
    assert "s1" not in index and len(index) == 0
    index.put(_sub("s2"))
    index.discard("s2")
    assert index.match("default", "trade.executed", "acc_2") == []


def test_same_answers_as_a_scan_through_random_changes():
    rng = random.Random(17)
    index = SubscriptionIndex()
    live: dict[str, Subscription] = {}
    for step in range(3000):
        sub_id = f"s{rng.randrange(60)}"
        if rng.random() < 0.15:
            index.discard(sub_id)
            live.pop(sub_id, None)
        else:
            sub = _sub(
                sub_id,
                rng.choice(["default", "t1"]),
                rng.choice([None, "acc_1", "acc_2", "acc_3"]),
                *rng.sample(_PATTERNS, rng.randint(1, 2)),
            )
            sub = dataclasses.replace(sub, state=rng.choice(list(SubscriptionState)))
            index.put(sub)
            if sub.state == SubscriptionState.REMOVED:
                live.pop(sub_id, None)
            else:
                live[sub_id] = sub
        tenant, type_, account = (
            rng.choice(["default", "t1"]),
            rng.choice(_TYPES),
            rng.choice(["acc_1", "acc_2", "acc_3"]),
        )
        scan = [s for s in live.values() if s.tenant_id == tenant and s.matches(type_, account)]
        assert _ids(index.match(tenant, type_, account)) == _ids(scan), step
        assert len(index) == len(live)
