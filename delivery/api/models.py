"""The request and response bodies of the HTTP API (pydantic v2, ``extra="forbid"``).

The same classes validate requests, shape responses and, through ``openapi``, are the document.
Times are RFC 3339; ``created_at`` of an event is when its publish committed, and the time
windows (``since``/``until``) of every listing and replay filter on it.
"""

from __future__ import annotations

import re
from datetime import UTC, datetime
from typing import Annotated, Any, Literal

from pydantic import (
    AfterValidator,
    AwareDatetime,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    RootModel,
    StringConstraints,
)

from delivery.events import AccountId, AnyEvent, EventId

MAX_BATCH = 1000
MAX_PAGE = 200
DEFAULT_PAGE = 50

_RFC3339 = re.compile(r"^\d{4}-\d{2}-\d{2}[Tt]\d{2}:\d{2}:\d{2}(\.\d{1,9})?([Zz]|[+-]\d{2}:\d{2})$")


def _rfc3339(value: object) -> object:
    # pydantic alone would also take a number (seconds since 1970) or a date without a time:
    # the document says an RFC 3339 string, and so does the server.
    if not (isinstance(value, str) and _RFC3339.match(value)):
        raise ValueError("must be an RFC 3339 timestamp like 2026-12-07T21:00:00Z")
    return value


def _in_utc_range(value: datetime) -> datetime:
    # 0001-01-01T00:00:00+01:00 is before year 1 in UTC, where the database compares it:
    # refused here (400) rather than overflowing in the driver (500).
    try:
        value.astimezone(UTC)
    except OverflowError:
        raise ValueError("must lie within years 1 to 9999 in UTC") from None
    return value


Moment = Annotated[AwareDatetime, BeforeValidator(_rfc3339), AfterValidator(_in_utc_range)]
SubscriptionId = Annotated[str, StringConstraints(pattern=r"^[A-Za-z0-9_-]{1,64}$")]
Cursor = Annotated[str, StringConstraints(pattern=r"^[A-Za-z0-9_-]{1,512}$")]
Limit = Annotated[int, Field(ge=1, le=MAX_PAGE)]
EventType = Annotated[str, StringConstraints(pattern=r"^[a-z0-9_.]{1,64}$")]


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid")


# -- errors --------------------------------------------------------------------------------


class ErrorDetail(_Model):
    code: str
    message: str
    field: str | None = None


class ErrorBody(_Model):
    error: ErrorDetail


# -- path parameters -------------------------------------------------------------------------


class EventPath(_Model):
    id: EventId


class SubscriptionPath(_Model):
    id: SubscriptionId


# -- events ------------------------------------------------------------------------------------


class PublishBatch(_Model):
    events: Annotated[list[AnyEvent], Field(min_length=1, max_length=MAX_BATCH)]


class PublishRequest(RootModel[AnyEvent | PublishBatch]):
    """One envelope, or ``{"events": [...]}``. Documented by this model; validated event by
    event (``events.parse_body``), so an error names its index (``events[3].data.price``)."""


class PublishResult(_Model):
    published: int
    duplicates: int
    ids: list[str] = Field(description="every event's id, in the order given")


class EventOut(_Model):
    id: str
    type: str
    account_id: str
    sequence: int
    occurred_at: datetime
    created_at: datetime
    data: dict[str, Any]


class AttemptOut(_Model):
    attempt: int
    started_at: datetime
    duration_ms: float
    outcome: str
    status: int | None
    error: str | None
    response_excerpt: str | None


class DeliveryOut(_Model):
    id: int
    event_id: str
    subscription_id: str
    state: str
    attempts: int
    created_at: datetime
    next_attempt_at: datetime | None
    first_attempt_at: datetime | None
    last_attempt_at: datetime | None
    delivered_at: datetime | None
    last_status: int | None
    last_error: str | None
    dead_reason: str | None
    dead_at: datetime | None
    attempt_log: list[AttemptOut]


class EventDetail(_Model):
    event: EventOut
    deliveries: list[DeliveryOut] = Field(
        description="per subscription the event was dispatched to: its state and attempts"
    )
    awaiting_dispatch: list[str] = Field(
        description="until a worker has dispatched the event: the ids of the subscriptions it"
        " matches now, which have no delivery yet (empty once it is dispatched)"
    )


class Window(_Model):
    since: Moment | None = None
    until: Moment | None = None


class EventsQuery(Window):
    type: EventType | None = None
    account_id: AccountId | None = None
    cursor: Cursor | None = None
    limit: Limit = DEFAULT_PAGE


class EventPage(_Model):
    items: list[EventOut]
    next_cursor: str | None


# -- subscriptions -----------------------------------------------------------------------------

Pattern = Annotated[str, StringConstraints(pattern=r"^[a-z0-9_.*?\[\]-]{1,100}$")]
Url = Annotated[str, StringConstraints(pattern=r"^[Hh][Tt][Tt][Pp][Ss]?://[^\s]{1,2040}$")]
Schedule = Annotated[
    str,
    StringConstraints(
        pattern=r"^\d{1,12}(\.\d{1,9})?(ms|s|m|h|d)(,\d{1,12}(\.\d{1,9})?(ms|s|m|h|d)){0,49}$"
    ),
]
TimeoutS = Annotated[float, Field(gt=0, le=300)]


class SubscriptionCreate(_Model):
    url: Url
    events: Annotated[list[Pattern], Field(min_length=1, max_length=50)]
    account_id: AccountId | None = None
    secret: Annotated[str, StringConstraints(min_length=1, max_length=200)] | None = None
    retry_schedule: Schedule | None = None
    timeout_s: TimeoutS | None = None
    ordered: bool = False
    signing: Literal["hmac", "ed25519"] = "hmac"


class SubscriptionPatch(_Model):
    url: Url | None = None
    events: Annotated[list[Pattern], Field(min_length=1, max_length=50)] | None = None
    account_id: AccountId | None = None
    retry_schedule: Schedule | None = None
    timeout_s: TimeoutS | None = None


class SubscriptionOut(_Model):
    id: str
    url: str
    events: list[str]
    account_id: str | None
    state: str
    disabled_reason: str | None
    retry_schedule: str | None
    timeout_s: float | None
    circuit_state: str
    ordered: bool
    signing: Literal["hmac", "ed25519"]
    public_key: str | None = Field(
        description="ed25519: the whpk_ key that verifies its v1a signatures; hmac: null"
    )
    created_at: datetime
    updated_at: datetime


class SubscriptionWithSecret(SubscriptionOut):
    secret: str | None = Field(
        description="hmac: the whsec_ secret, shown only here, on creation and rotation;"
        " ed25519: null (the platform keeps the secret key; verify with public_key)"
    )


class SubscriptionsQuery(_Model):
    cursor: Cursor | None = None
    limit: Limit = DEFAULT_PAGE


class SubscriptionPage(_Model):
    items: list[SubscriptionOut]
    next_cursor: str | None


class ReplayWindow(_Model):
    since: Moment
    until: Moment


class Replayed(_Model):
    replayed: int


class DeliveriesQuery(Window):
    state: Literal["pending", "delivered", "dead"] | None = None
    cursor: Cursor | None = None
    limit: Limit = DEFAULT_PAGE


class DeliveryPage(_Model):
    items: list[DeliveryOut]
    next_cursor: str | None


# -- dead letters ------------------------------------------------------------------------------


class DeadLetterOut(_Model):
    id: int
    event_id: str
    event_type: str
    subscription_id: str
    reason: str | None
    attempts: int
    last_status: int | None
    first_attempt_at: datetime | None
    last_attempt_at: datetime | None
    dead_at: datetime | None
    created_at: datetime = Field(description="when the event's publish committed")


class DeadLettersQuery(Window):
    subscription_id: SubscriptionId | None = None
    cursor: Cursor | None = None
    limit: Limit = DEFAULT_PAGE


class DeadLetterPage(_Model):
    items: list[DeadLetterOut]
    next_cursor: str | None


DeadLetterId = Annotated[int, Field(ge=1, le=2**63 - 1)]


class DeadLetterSelection(Window):
    """Either ``ids``, or a filter: ``subscription_id`` and/or a ``since``/``until`` window, or
    ``all: true`` (every dead letter of the tenant)."""

    ids: Annotated[list[DeadLetterId], Field(min_length=1, max_length=10_000)] | None = None
    subscription_id: SubscriptionId | None = None
    all: bool = False


class DeadLettersReplayed(_Model):
    replayed: int
    skipped: int = Field(description="dead letters of a subscription that is not active")


class DeadLettersPurged(_Model):
    purged: int


class DeadLettersSkipped(_Model):
    skipped: int = Field(
        description="dead letters kept as skipped, never sent; an ordered subscription's account"
        " held behind one goes on with its next event"
    )


# The web page's session (``/v1/session``) and the health views (``/v1/subscription-health``,
# ``/v1/ops/...``).


class SignIn(_Model):
    key: Annotated[str, StringConstraints(min_length=1, max_length=200)] = Field(
        description="an API key (dk_...): it goes in the body, never in a URL"
    )


class SessionOut(_Model):
    tenant_id: str
    key_id: str
    scopes: list[str]
    csrf_token: str = Field(
        description="send it as X-CSRF-Token on every change made with the session cookie"
    )


class SubscriptionHealth(_Model):
    id: str
    tenant_id: str
    url: str
    state: str
    circuit: str
    consecutive_failures: int
    failing_since: datetime | None
    paced_until: datetime | None
    disabled_reason: str | None
    events: list[str]
    account_id: str | None
    ordered: bool
    blocked_accounts: int = Field(
        description="ordered only: accounts held behind a dead letter until replayed or skipped"
    )
    pending: int = Field(description="deliveries not attempted yet")
    retrying: int = Field(description="deliveries that failed and wait for their next attempt")
    dead: int = Field(description="dead letters")
    delivered: int
    last_success: datetime | None
    next_attempt_at: datetime | None


class HealthList(_Model):
    items: list[SubscriptionHealth]


class BlockedAccount(_Model):
    account_id: str
    sequence: int = Field(description="the account's sequence held: later ones wait behind it")
    dead_letter_id: int = Field(description="the dead letter holding it: replay or skip it")
    event_id: str
    dead_at: datetime | None
    reason: str | None
    last_status: int | None


class BlockedAccounts(_Model):
    items: list[BlockedAccount] = Field(
        description="by account_id, at most 100; empty unless the subscription is ordered"
    )


class Backlog(_Model):
    pending: int = Field(description="events committed to the outbox and not yet published")
    oldest_age_s: float


class UnhealthySince(_Model):
    kind: str = Field(description="e.g. circuit_open, account_blocked, outbox_backlog")
    subject: str = Field(description="what is unhealthy, e.g. `subscription sub_... (tenant t)`")
    since: datetime = Field(description="when it went unhealthy (PostgreSQL's clock)")
    age_s: float
    alert: str | None = Field(description="the alert rule that covers it (null: none does)")
    detail: str


class OpsOverview(_Model):
    outbox: Backlog
    queues: dict[str, int | None] = Field(description="messages ready, by queue name")
    queues_error: str | None = Field(description="why the depths are unknown (null: known)")
    poison_messages: int
    unhealthy: list[SubscriptionHealth] = Field(
        description="every tenant's unhealthy subscriptions, the most stuck work first"
    )
    unhealthy_since: list[UnhealthySince] = Field(
        description="each unhealthy thing, since when and the alert that covers it, the"
        " longest first (`delivery status`'s `unhealthy`)"
    )


class PoisonOut(_Model):
    id: int
    received_at: datetime
    message_id: str | None
    routing_key: str | None
    reason: str
    death_count: int | None


class PoisonPage(_Model):
    items: list[PoisonOut]
    total: int
