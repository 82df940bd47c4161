"""Events and subscriptions for tests: valid catalogue events with predictable fields, outbox
rows as the relay claims them, and a subscription whose secret the receiver verifies."""

from __future__ import annotations

from datetime import UTC, datetime

import asyncpg
import orjson

from delivery.store import subscriptions
from delivery.store.subscriptions import Subscription
from delivery.testing.receiver import Receiver


def trade(i: int, account: str = "acc_1", **extra: object) -> dict[str, object]:
    """A ``trade.executed`` event; ``extra`` adds or overrides top-level fields (``id=...``)."""
    return {
        "type": "trade.executed",
        "account_id": account,
        "data": {
            "trade_id": f"t{i}",
            "order_id": f"o{i}",
            "instrument": "BTC-USD",
            "side": "buy",
            "quantity": "0.25",
            "price": "64000.50",
            "executed_at": "2026-01-01T00:00:00Z",
        },
        **extra,
    }


def balance(i: int, account: str = "acc_1", **extra: object) -> dict[str, object]:
    """An ``account.balance_changed`` event; ``extra`` as for ``trade``."""
    return {
        "type": "account.balance_changed",
        "account_id": account,
        "data": {"asset": "USD", "delta": "-1.50", "balance": f"{100 + i}.00", "reason": "fee"},
        **extra,
    }


async def add_subscription(
    conn: asyncpg.Connection, receiver: Receiver, path: str, **options: object
) -> Subscription:
    """A subscription to ``receiver``'s ``path``, whose signatures the receiver verifies (with
    its public key when it signs with Ed25519); ``options`` go to ``subscriptions.add``
    (``patterns``, ``account_id``, ``signing``, ``box``...)."""
    sub = await subscriptions.add(conn, url=receiver.url(path), **options)  # type: ignore[arg-type]
    receiver.expect_secret(path, sub.public_key or sub.secret)
    return sub


def outbox_row(
    pk: int, type_: str = "account.closed", *, redrives: int = 0, tp: str | None = None
) -> dict[str, object]:
    """An outbox row as the relay claims it (what ``pack_rows`` reads), for event ``evt_<pk>``."""
    return {
        "pk": pk,
        "event_id": f"evt_{pk}",
        "type": type_,
        "account_id": f"acc_{pk % 3}",
        "sequence": pk,
        "occurred_at": datetime(2026, 11, 23, 10, 0, pk % 60, 123456, tzinfo=UTC),
        "data": orjson.dumps({"reason": "line\nbreak \u00e9", "n": pk}).decode(),
        "traceparent": tp,
        "created_at_s": 1_796_000_000.123456 + pk,
        "redrives": redrives,
    }
