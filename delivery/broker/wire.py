"""The AMQP message format between the relay and dispatch: one event, or a pack of events.

A single event is its webhook body (``application/json``) with ``x-created-at-us`` (the outbox
commit, integer microseconds: AMQP tables carry floats as 32-bit, which rounds today's epoch
seconds to 128 s) and ``traceparent`` headers. A pack carries several events of one type in one
message (``application/x-ndjson``): the bodies one per line (orjson never writes a raw newline,
so the lines are exactly the bodies the subscribers get), and the same two headers as lists, one
entry per line. A pack costs the broker one publish, one confirm and one ack instead of one per
event, which is what bounds the relay; the inbox still dedupes event by event.

Any other content type (or none) is a format no release of ours wrote, or one a newer release
writes (runbooks/rolling-upgrade.md: read first, write later): it is poison with that reason,
never read as if it were one of these two.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import aio_pika
from aio_pika.abc import AbstractIncomingMessage

from delivery.errors import PoisonMessageError
from delivery.events import RoutingFacts, envelope_from_row, render_body, routing_facts

__all__ = ["Outgoing", "WireEvent", "decode", "event_count", "pack_rows"]

SINGLE = "application/json"
PACK = "application/x-ndjson"
_KNOWN = frozenset({SINGLE, PACK})


@dataclass(frozen=True, slots=True)
class Outgoing:
    """A message ready to publish, and the outbox rows its confirm marks published."""

    message: aio_pika.Message
    routing_key: str
    pks: list[int]


@dataclass(frozen=True, slots=True)
class WireEvent:
    """One event as dispatch reads it from a message."""

    facts: RoutingFacts
    body: bytes
    created_at_s: float | None
    traceparent: str | None


def pack_rows(rows: Sequence[Any], per_message: int) -> list[Outgoing]:
    """Outbox rows (selected as the relay claims them) as messages of at most ``per_message``
    events, each of one type (the routing key), in the rows' order within a type. Rows already
    redriven travel alone, so an event that crashes workers cannot take a pack down with it."""
    out: list[Outgoing] = []
    open_packs: dict[str, list[Any]] = {}
    for row in rows:
        if per_message <= 1 or row["redrives"]:
            out.append(_single(row))
            continue
        pack = open_packs.setdefault(row["type"], [])
        pack.append(row)
        if len(pack) >= per_message:
            out.append(_pack(pack))
            del open_packs[row["type"]]
    out.extend(_pack(p) if len(p) > 1 else _single(p[0]) for p in open_packs.values())
    return out


def _single(row: Any) -> Outgoing:
    headers: dict[str, Any] = {"x-created-at-us": _us(row["created_at_s"])}
    if row["traceparent"]:
        headers["traceparent"] = row["traceparent"]
    message = aio_pika.Message(
        body=render_body(envelope_from_row(row)),
        message_id=row["event_id"],
        content_type=SINGLE,
        delivery_mode=aio_pika.DeliveryMode.PERSISTENT,
        type=row["type"],
        headers=headers,
    )
    return Outgoing(message, row["type"], [row["pk"]])


def _pack(rows: list[Any]) -> Outgoing:
    message = aio_pika.Message(
        body=b"\n".join(render_body(envelope_from_row(r)) for r in rows),
        message_id=f"{rows[0]['event_id']}+{len(rows) - 1}",
        content_type=PACK,
        delivery_mode=aio_pika.DeliveryMode.PERSISTENT,
        type=rows[0]["type"],
        headers={
            "x-created-at-us": [_us(r["created_at_s"]) for r in rows],
            "traceparent": [r["traceparent"] or "" for r in rows],
        },
    )
    return Outgoing(message, rows[0]["type"], [r["pk"] for r in rows])


def _us(created_at_s: float) -> int:
    return round(created_at_s * 1_000_000)


def _seconds(value: object) -> float | None:
    # int: microseconds; a float is a legacy single message's seconds (32-bit on the wire)
    if isinstance(value, bool):
        return None
    if isinstance(value, int):
        return value / 1_000_000
    return float(value) if isinstance(value, float) else None


def event_count(message: AbstractIncomingMessage) -> int:
    """How many events a message says it carries, without parsing it."""
    if message.content_type != PACK:
        return 1
    created = (message.headers or {}).get("x-created-at-us")
    # At least one: a forged pack claiming none would not count against the dispatch batch.
    return max(1, len(created)) if isinstance(created, list) else 1


def decode(message: AbstractIncomingMessage) -> list[WireEvent]:
    """The events a message carries; ``PoisonMessageError`` if any of it is not ours."""
    headers = message.headers or {}
    if message.content_type not in _KNOWN:
        raise PoisonMessageError(
            f"unknown wire format (content type {message.content_type!r}): "
            f"this worker reads {SINGLE} and {PACK} only"
        )
    if message.content_type != PACK:
        created = headers.get("x-created-at-us", headers.get("x-created-at"))
        return [_event(message.body, created, headers.get("traceparent"))]
    bodies = message.body.split(b"\n")
    created_list = headers.get("x-created-at-us")
    traceparents = headers.get("traceparent")
    if not (
        isinstance(created_list, list)
        and isinstance(traceparents, list)
        and len(created_list) == len(traceparents) == len(bodies)
    ):
        raise PoisonMessageError("pack headers do not match its lines")
    events = []
    for line, parts in enumerate(zip(bodies, created_list, traceparents, strict=True), start=1):
        try:
            events.append(_event(*parts))
        except PoisonMessageError as exc:
            raise PoisonMessageError(f"pack line {line}: {exc}") from None
    return events


def _event(body: bytes, created: object, traceparent: object) -> WireEvent:
    """One event from its body and its two header values (``PoisonMessageError`` if not ours)."""
    return WireEvent(
        routing_facts(body),
        body,
        _seconds(created),
        traceparent if isinstance(traceparent, str) and traceparent else None,
    )
