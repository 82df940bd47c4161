"""The reference stream client's pure parts: the reconnect backoff and applying an event."""

from __future__ import annotations

import random
from decimal import Decimal

from delivery.stream import AccountState, backoff_s


def test_backoff_doubles_from_the_initial_delay_and_stays_under_the_cap():
    rng = random.Random(7)
    delays = [backoff_s(n, initial_s=0.1, max_s=5.0, rng=rng) for n in range(1, 80)]
    assert 0.05 <= delays[0] <= 0.1
    assert 0.1 <= delays[1] <= 0.2
    assert all(2.5 <= d <= 5.0 for d in delays[8:])  # 0.1 * 2**7 > 5: capped from the 8th on


def _changed(sequence: int, asset: str, balance: str) -> dict[str, object]:
    return {
        "sequence": sequence,
        "type": "account.balance_changed",
        "data": {"asset": asset, "balance": balance, "delta": "1", "reason": "deposit"},
    }


def test_an_account_applies_each_sequence_once_and_keeps_the_last_balance_per_asset():
    state = AccountState(sequence=2, balances={"USD": Decimal("1.00")})
    assert not state.apply(_changed(2, "USD", "99"))  # already in the snapshot
    assert state.apply(_changed(3, "USD", "2.50"))
    assert state.apply({"sequence": 4, "type": "trade.executed", "data": {}})
    assert state.apply(_changed(5, "BTC", "0.1"))
    assert state.sequence == 5
    assert state.balances == {"USD": Decimal("2.50"), "BTC": Decimal("0.1")}
