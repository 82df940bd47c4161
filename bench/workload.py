"""The events every scenario publishes: realistic ~500-byte trade and account events with known
ids, and for each the envelope a subscriber receives."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from delivery.events import Envelope, NewEvent, parse_event, render_body


@dataclass(frozen=True, slots=True)
class Event:
    id: str
    raw: dict[str, Any]  # what a producer hands to ``delivery.publish``
    body: bytes  # the envelope a subscriber receives (for the peers: what they POST)


def make_events(n: int, accounts: int = 200) -> list[dict[str, object]]:
    """Realistic ~500-byte trade/account events, without ids."""
    events: list[dict[str, object]] = []
    for i in range(n):
        account = f"acc_{i % accounts:05d}"
        if i % 2:
            events.append(
                {
                    "type": "trade.executed",
                    "account_id": account,
                    "data": {
                        "trade_id": f"trd_{i:010d}",
                        "order_id": f"ord_{i:010d}",
                        "instrument": "BTC-USD",
                        "side": "buy" if i % 4 == 1 else "sell",
                        "quantity": "0.01250000",
                        "price": "64123.45000000",
                        "executed_at": "2026-11-23T10:00:00.123456Z",
                    },
                }
            )
        else:
            events.append(
                {
                    "type": "account.balance_changed",
                    "account_id": account,
                    "data": {
                        "asset": "USDT",
                        "delta": "-801.54312500",
                        "balance": "120394.11250000",
                        "reason": "trade",
                    },
                }
            )
    return events


def make_workload(n: int, tag: str) -> list[Event]:
    """``n`` events of ``make_events`` with ids ``evt_<tag>_<i>``, and their envelopes."""
    out: list[Event] = []
    for i, produced in enumerate(make_events(n)):
        raw = {**produced, "id": f"evt_{tag}_{i:07d}"}
        new: NewEvent = parse_event(raw)
        envelope = Envelope(new.id, new.type, new.account_id, i + 1, new.occurred_at, new.data)
        out.append(Event(new.id, raw, render_body(envelope)))
    return out
