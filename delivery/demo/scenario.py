"""What the demo does: its accounts, its three subscriptions, realistic trade and account
events, the pace of publishing and how long it waits."""

from __future__ import annotations

import random
from dataclasses import dataclass
from datetime import UTC, datetime
from decimal import Decimal
from typing import Any

ACCOUNTS = tuple(f"acc_{n:03d}" for n in range(1, 21))
WATCHED_ACCOUNT = ACCOUNTS[0]
# Followed live through `delivery api`'s stream (delivery.stream.BalanceStream); the first one's
# balance is shown beside the progress.
STREAMED_ACCOUNTS = ACCOUNTS[:3]
BATCH_SIZE = 200  # events per publishing transaction
PUBLISH_RATE_PER_S = 1_000  # a steady producer, so deliveries arrive while it publishes
READY_TIMEOUT_S = 20.0  # for the relay and workers to connect
STALL_TIMEOUT_S = 30.0  # give up when no delivery arrives for this long

_INSTRUMENTS = {"BTC-USD": 67_000, "ETH-USD": 3_500, "SOL-USD": 150, "EUR-USD": 1}
_CENT = Decimal("0.01")


@dataclass(frozen=True)
class _Route:
    """One demo subscription: where the receiver hears it and what it asks for."""

    name: str
    path: str
    patterns: str
    account_id: str | None = None


ROUTES = (
    _Route("trades", "/trades", "trade.*"),
    _Route(f"{WATCHED_ACCOUNT} balances", "/balances", "account.balance_changed", WATCHED_ACCOUNT),
    _Route("everything", "/everything", "*"),
)


def realistic_events(count: int, rng: random.Random) -> list[dict[str, Any]]:
    """Every account opens first; then trades, cancellations and balance changes, with money as
    decimal strings and balances that add up."""
    events: list[dict[str, Any]] = [
        {
            "type": "account.created",
            "account_id": account,
            "data": {"owner": f"owner of {account}", "currency": "USD"},
        }
        for account in ACCOUNTS
    ]
    balances = dict.fromkeys(ACCOUNTS, Decimal("10000.00"))
    while len(events) < count:
        account = rng.choice(ACCOUNTS)
        n = len(events)
        roll = rng.random()
        if roll < 0.45:
            instrument = rng.choice(list(_INSTRUMENTS))
            mid = _INSTRUMENTS[instrument]
            price = Decimal(str(mid * rng.uniform(0.97, 1.03))).quantize(_CENT)
            events.append(
                {
                    "type": "trade.executed",
                    "account_id": account,
                    "data": {
                        "trade_id": f"trd_{n:06d}",
                        "order_id": f"ord_{n:06d}",
                        "instrument": instrument,
                        "side": rng.choice(["buy", "sell"]),
                        "quantity": rng.choice(["0.0100", "0.2500", "1.0000", "3.5000"]),
                        "price": str(price),
                        "executed_at": datetime.now(UTC).isoformat(),
                    },
                }
            )
        elif roll < 0.55:
            events.append(
                {
                    "type": "trade.cancelled",
                    "account_id": account,
                    "data": {
                        "trade_id": f"trd_{n:06d}",
                        "order_id": f"ord_{n:06d}",
                        "reason": rng.choice(["user", "risk", "expired"]),
                    },
                }
            )
        else:
            delta = Decimal(rng.randint(-25_000, 25_000)) / 100
            if balances[account] + delta < 0:
                delta = -delta
            balances[account] += delta
            if delta >= 0:
                reason = rng.choice(["deposit", "trade", "adjustment"])
            else:
                reason = rng.choice(["withdrawal", "trade", "fee"])
            events.append(
                {
                    "type": "account.balance_changed",
                    "account_id": account,
                    "data": {
                        "asset": "USD",
                        "delta": str(delta),
                        "balance": str(balances[account]),
                        "reason": reason,
                    },
                }
            )
    return events[:count]
