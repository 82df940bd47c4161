"""The event envelope and the trade/account catalogue, as pydantic v2 models.

Producers hand us plain JSON objects; ``parse_event`` turns one into a validated ``NewEvent`` or
raises ``InputError`` with one readable line naming the field. Money and quantities stay decimal
*strings* end to end: we never round-trip them through a float.

The envelope as it travels (the end of this module): one function renders the webhook body, so
every attempt and every replay of an event carries the same bytes (relay, first attempt and
retries alike).
"""

from __future__ import annotations

import re
import secrets
import time
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Annotated, Any, Literal

import orjson
from pydantic import (
    AwareDatetime,
    BaseModel,
    ConfigDict,
    Field,
    StringConstraints,
    TypeAdapter,
    ValidationError,
)

from delivery.errors import InputError, PoisonMessageError

EventId = Annotated[
    str, StringConstraints(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9_.:-]+$")
]
# Free text refuses control characters (C0, DEL, C1): PostgreSQL cannot store a NUL, and the
# others end up in subscribers' logs and operators' terminals.
_NO_CONTROL = r"^[^\x00-\x1f\x7f-\x9f]+$"
_CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f]")
AccountId = Annotated[str, StringConstraints(min_length=1, max_length=128, pattern=_NO_CONTROL)]
Text = Annotated[str, StringConstraints(min_length=1, max_length=256, pattern=_NO_CONTROL)]
# Strict: a JSON number is refused, so a float can never sneak into a money field.
Decimal = Annotated[str, StringConstraints(pattern=r"^-?\d{1,30}(\.\d{1,18})?$", strict=True)]
PositiveDecimal = Annotated[str, StringConstraints(pattern=r"^\d{1,30}(\.\d{1,18})?$", strict=True)]
Currency = Annotated[str, StringConstraints(min_length=2, max_length=12, pattern=r"^[A-Z0-9]+$")]


class _Data(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class TradeExecutedData(_Data):
    trade_id: Text
    order_id: Text
    instrument: Text
    side: Literal["buy", "sell"]
    quantity: PositiveDecimal
    price: PositiveDecimal
    executed_at: AwareDatetime


class TradeCancelledData(_Data):
    trade_id: Text
    order_id: Text
    reason: Text


class AccountCreatedData(_Data):
    owner: Text
    currency: Currency


class AccountBalanceChangedData(_Data):
    asset: Currency
    delta: Decimal
    balance: Decimal
    reason: Literal["deposit", "withdrawal", "trade", "fee", "adjustment"]


class AccountClosedData(_Data):
    reason: Text


class _Envelope(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    id: EventId | None = None
    account_id: AccountId
    occurred_at: AwareDatetime | None = None


class TradeExecuted(_Envelope):
    type: Literal["trade.executed"]
    data: TradeExecutedData


class TradeCancelled(_Envelope):
    type: Literal["trade.cancelled"]
    data: TradeCancelledData


class AccountCreated(_Envelope):
    type: Literal["account.created"]
    data: AccountCreatedData


class AccountBalanceChanged(_Envelope):
    type: Literal["account.balance_changed"]
    data: AccountBalanceChangedData


class AccountClosed(_Envelope):
    type: Literal["account.closed"]
    data: AccountClosedData


AnyEvent = Annotated[
    TradeExecuted | TradeCancelled | AccountCreated | AccountBalanceChanged | AccountClosed,
    Field(discriminator="type"),
]
_ADAPTER: TypeAdapter[Any] = TypeAdapter(AnyEvent)

#: The catalogue: every event type a producer may publish.
EVENT_TYPES: tuple[str, ...] = (
    "trade.executed",
    "trade.cancelled",
    "account.created",
    "account.balance_changed",
    "account.closed",
)


@dataclass(frozen=True, slots=True)
class NewEvent:
    """A validated event, ready for the outbox (id and occurred_at filled in)."""

    id: str
    type: str
    account_id: str
    occurred_at: datetime
    data: dict[str, Any]
    traceparent: str | None = None


def new_event_id() -> str:
    """Time-ordered, so ids sort roughly by creation in logs and listings."""
    return f"evt_{time.time_ns() // 1_000_000:012x}{secrets.token_hex(8)}"


def shown(text: str, limit: int = 64) -> str:
    """``text`` safe inside a one-line message: control and other unprintable characters
    escaped, cut at ``limit`` characters (a 1 MB key must not become a 1 MB error line)."""
    cut = text[:limit]
    safe = "".join(c if c.isprintable() else f"\\u{ord(c):04x}" for c in cut)
    return safe + ("..." if len(text) > limit else "")


def _control_character(value: object) -> str | None:
    """``U+0000`` for the first control character in ``value``, if it is a string with one."""
    found = _CONTROL.search(value) if isinstance(value, str) else None
    return f"U+{ord(found.group()):04X}" if found else None


def describe_validation_error(exc: ValidationError) -> str:
    """One line naming each bad field: ``data.price: ...; account_id: field required``."""
    problems = []
    for err in exc.errors():
        loc = [str(p) for p in err["loc"]]
        # Drop the union tag pydantic inserts ("trade.executed") from the path.
        if len(loc) > 1 and loc[0] in EVENT_TYPES:
            loc = loc[1:]
        where = ".".join(shown(p) for p in loc) or "event"
        kind = err["type"]
        control = _control_character(err.get("input"))
        if kind == "union_tag_invalid":
            ctx = err.get("ctx") or {}
            tag = shown(str(ctx.get("tag")))
            msg = f"unknown event type '{tag}' (known: {', '.join(EVENT_TYPES)})"
            where = "type"
        elif kind == "union_tag_not_found":
            msg, where = "is required", "type"
        elif kind == "missing":
            msg = "is required"
        elif kind == "extra_forbidden":
            msg = "is not a field of this event type"
        elif kind == "string_type" and loc and loc[-1] in {"quantity", "price", "delta", "balance"}:
            msg = 'must be a decimal string like "101.25", not a number'
        elif kind == "string_pattern_mismatch" and control:
            msg = f"contains a control character ({control})"
        elif kind == "string_pattern_mismatch" and loc and loc[-1] == "id":
            msg = "must be at most 64 characters of A-Z a-z 0-9 _ . : -"
        elif kind == "string_pattern_mismatch":
            msg = "has an invalid format"
        elif kind == "string_unicode":
            msg = "is not valid Unicode (a lone surrogate)"
        else:
            msg = shown(str(err["msg"]), limit=200)
        problems.append(f"{where}: {msg}")
    return "; ".join(problems)


def parse_event(raw: Mapping[str, Any], *, now: datetime | None = None) -> NewEvent:
    """Validate one producer envelope; raise ``InputError`` with a one-line reason."""
    if not isinstance(raw, Mapping):
        raise InputError("an event must be a JSON object")
    traceparent = raw.get("traceparent")
    body = {k: v for k, v in raw.items() if k != "traceparent"}
    if "sequence" in body:
        raise InputError("sequence: is assigned by the platform; leave it out")
    try:
        model = _ADAPTER.validate_python(body)
    except ValidationError as exc:
        raise InputError(describe_validation_error(exc)) from None
    if traceparent is not None and not _valid_traceparent(traceparent):
        raise InputError("traceparent: must be a W3C traceparent like 00-<32 hex>-<16 hex>-01")
    try:
        # An offset can carry a valid local time out of the datetime range (year 1 or 9999).
        occurred_at = (model.occurred_at or now or datetime.now(UTC)).astimezone(UTC)
    except OverflowError:
        raise InputError("occurred_at: is out of range once converted to UTC") from None
    return NewEvent(
        id=model.id or new_event_id(),
        type=model.type,
        account_id=model.account_id,
        occurred_at=occurred_at,
        data=model.data.model_dump(mode="json"),
        traceparent=traceparent,
    )


def check_new_event(event: NewEvent) -> NewEvent:
    """A ``NewEvent`` built by hand, validated as ``parse_event`` validates an envelope (the
    dataclass itself checks nothing): ``InputError`` naming the field, else the normalised
    event."""
    if not isinstance(event.id, str):
        raise InputError("id: is required")
    envelope: dict[str, Any] = {
        "id": event.id,
        "type": event.type,
        "account_id": event.account_id,
        "occurred_at": event.occurred_at,
        "data": event.data,
    }
    if event.traceparent is not None:
        envelope["traceparent"] = event.traceparent
    return parse_event(envelope)


def _valid_traceparent(value: object) -> bool:
    if not isinstance(value, str):
        return False
    parts = value.split("-")
    return (
        len(parts) == 4
        and [len(p) for p in parts] == [2, 32, 16, 2]
        and all(c in "0123456789abcdef" for c in "".join(parts))
    )


def format_timestamp(moment: datetime) -> str:
    """RFC 3339 in UTC with a ``Z``, microseconds kept only when present."""
    text = moment.astimezone(UTC).isoformat()
    return text.replace("+00:00", "Z")


# -- the envelope as it travels --------------------------------------------------------------


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
    """Parse a message body; ``PoisonMessageError`` if it is not one of our envelopes."""
    try:
        obj = orjson.loads(body)
    except orjson.JSONDecodeError as exc:
        raise PoisonMessageError(f"body is not JSON: {exc}") from None
    if not isinstance(obj, dict):
        raise PoisonMessageError("body is not a JSON object")
    facts = (obj.get("id"), obj.get("type"), obj.get("account_id"))
    if not all(isinstance(f, str) and f for f in facts) or not isinstance(obj.get("sequence"), int):
        raise PoisonMessageError("body lacks id, type, account_id or sequence")
    return RoutingFacts(id=obj["id"], type=obj["type"], account_id=obj["account_id"])
