"""The envelope as it travels: one function renders the webhook body, so every attempt and
every replay of an event carries the same bytes (relay, first attempt and retries alike)."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from typing import Any

import orjson

from delivery.events import format_timestamp


@dataclass(frozen=True, slots=True)
class Envelope:
    id: str
    type: str
    account_id: str
    sequence: int
    occurred_at: datetime
    data: dict[str, Any]


def render_body(envelope: Envelope) -> bytes:
    """The body of every webhook POST and of the AMQP message: the contract's envelope."""
    return orjson.dumps(
        {
            "id": envelope.id,
            "type": envelope.type,
            "account_id": envelope.account_id,
            "sequence": envelope.sequence,
            "occurred_at": format_timestamp(envelope.occurred_at),
            "data": envelope.data,
        }
    )


def envelope_from_row(row: Any) -> Envelope:
    """From an outbox row selected with ``data::text AS data``."""
    return Envelope(
        id=row["event_id"],
        type=row["type"],
        account_id=row["account_id"],
        sequence=row["sequence"],
        occurred_at=row["occurred_at"],
        data=orjson.loads(row["data"]),
    )


@dataclass(frozen=True, slots=True)
class RoutingFacts:
    """What dispatch needs from a message body to match subscriptions."""

    id: str
    type: str
    account_id: str


def routing_facts(body: bytes) -> RoutingFacts:
    """Parse a message body; ``ValueError`` if it is not one of our envelopes (poison)."""
    try:
        obj = orjson.loads(body)
    except orjson.JSONDecodeError as exc:
        raise ValueError(f"body is not JSON: {exc}") from None
    if not isinstance(obj, dict):
        raise ValueError("body is not a JSON object")
    facts = (obj.get("id"), obj.get("type"), obj.get("account_id"))
    if not all(isinstance(f, str) and f for f in facts) or not isinstance(obj.get("sequence"), int):
        raise ValueError("body lacks id, type, account_id or sequence")
    return RoutingFacts(id=obj["id"], type=obj["type"], account_id=obj["account_id"])
