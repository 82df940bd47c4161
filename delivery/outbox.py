"""The producer side: write events into the outbox inside the caller's transaction.

``sequence`` is per (tenant, account), 1, 2, 3... with no gaps: the account's counter row is
bumped in the same statement that inserts the events, so its row lock is held until the caller
commits. Two producers writing to one account therefore serialise, which is the price of a
gapless order.

Every event belongs to a tenant (``tenant=``, ``default`` unless named). Event ids are unique
across tenants: an id another tenant already published is refused (``EventIdTakenError``),
never reported as this tenant's duplicate.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import asyncpg
import orjson

from delivery.errors import EventIdTakenError, InputError, NotFoundError, PublishConflictError
from delivery.events import NewEvent, check_new_event, parse_event
from delivery.ops import tracing
from delivery.store.tenants import DEFAULT_TENANT, parse_tenant_id

# One round trip to a function (migrations 0007, 0016) that skips ids already committed, bumps
# each account's counter and inserts with consecutive sequences in the caller's order; its plan
# is made once per session, which halves the database's CPU for a one-event publish.
_INSERT = """
SELECT inserted FROM delivery.publish_events(
    $1::text, $2::text[], $3::text[], $4::text[], $5::timestamptz[], $6::text[], $7::text[])
"""
# The function's refusals (migration 0016); either fails the whole call, so nothing is written.
_ID_TAKEN = "DLV01"  # DETAIL holds the id
_NO_TENANT = "DLV02"

# A concurrent producer committing the same id between our snapshot and our insert would leave a
# gap: the function then fails with serialization_failure, and we run it again (now seeing that
# row), rolled back to a savepoint inside the caller's transaction. More than a few rounds means
# something else is wrong.
_MAX_ROUNDS = 5


@dataclass(frozen=True)
class PublishResult:
    published: list[str] = field(default_factory=list)
    duplicates: list[str] = field(default_factory=list)

    def as_dict(self) -> dict[str, int]:
        return {"published": len(self.published), "duplicates": len(self.duplicates)}


def validate_all(events: Iterable[Mapping[str, Any] | NewEvent]) -> list[NewEvent]:
    """Validate every event first; ``InputError`` lists each bad one by position (1-based).
    A ``NewEvent`` is checked too: one built by hand has been through no validation."""
    parsed: list[NewEvent] = []
    problems: list[str] = []
    for index, raw in enumerate(events, start=1):
        try:
            parsed.append(check_new_event(raw) if isinstance(raw, NewEvent) else parse_event(raw))
        except InputError as exc:
            problems.append(f"event {index}: {exc}")
    if problems:
        raise InputError("; ".join(problems), problems=problems)
    return parsed


async def _insert(
    conn: asyncpg.Connection, tenant: str, events: Sequence[NewEvent]
) -> set[str]:
    """Insert in one round trip; raise ``_RaceLost`` if a concurrent producer got in between."""
    try:
        inserted = await conn.fetchval(
            _INSERT,
            tenant,
            [e.id for e in events],
            [e.type for e in events],
            [e.account_id for e in events],
            [e.occurred_at for e in events],
            [orjson.dumps(e.data).decode() for e in events],
            [e.traceparent for e in events],
        )
    except asyncpg.SerializationError:
        raise _RaceLost from None
    except asyncpg.PostgresError as exc:
        if exc.sqlstate == _NO_TENANT:
            raise NotFoundError(f"tenant {tenant!r} does not exist") from None
        if exc.sqlstate == _ID_TAKEN:
            raise EventIdTakenError(
                f"id: {exc.detail!r} is already used by another tenant; choose another event id"
            ) from None
        raise
    return set(inserted)


async def publish_many(
    conn: asyncpg.Connection,
    events: Iterable[Mapping[str, Any] | NewEvent],
    *,
    tenant: str = DEFAULT_TENANT,
) -> PublishResult:
    """Write events to the outbox on ``conn`` for ``tenant``, inside the caller's transaction if
    it has one (otherwise as one statement of its own). A duplicate id is a no-op, reported as
    such. ``NotFoundError`` for an unknown tenant, ``EventIdTakenError`` for an id another
    tenant published; either writes nothing of the batch."""
    return await publish_validated(conn, validate_all(events), tenant=tenant)


async def publish_validated(
    conn: asyncpg.Connection, batch: Sequence[NewEvent], *, tenant: str = DEFAULT_TENANT
) -> PublishResult:
    """``publish_many`` for events that ``parse_event`` or ``validate_all`` returned in this
    process (``delivery publish`` validates a whole file before it writes a line): they are
    not validated again."""
    tenant = parse_tenant_id(tenant)
    if not batch:
        return PublishResult()
    # An instrumented producer's current span continues through the outbox (an event's own
    # traceparent wins).
    traceparent = tracing.current_traceparent()
    if traceparent is not None:
        batch = [e if e.traceparent else replace(e, traceparent=traceparent) for e in batch]
    # Outside a transaction the one statement is atomic by itself: no BEGIN, no savepoint.
    own = not conn.is_in_transaction()
    for _ in range(_MAX_ROUNDS):
        try:
            if own:
                inserted = await _insert(conn, tenant, batch)
            else:
                async with conn.transaction():  # a savepoint inside the caller's transaction
                    inserted = await _insert(conn, tenant, batch)
        except _RaceLost:
            continue
        published: list[str] = []
        duplicates: list[str] = []
        for event in batch:
            if event.id in inserted:
                published.append(event.id)
                inserted.discard(event.id)  # a repeat inside the batch is a duplicate too
            else:
                duplicates.append(event.id)
        return PublishResult(published=published, duplicates=duplicates)
    raise PublishConflictError(
        "could not publish: the same event ids are being published concurrently"
    )


class _RaceLost(Exception):
    pass


async def publish(
    conn: asyncpg.Connection,
    event: Mapping[str, Any] | NewEvent,
    *,
    tenant: str = DEFAULT_TENANT,
) -> PublishResult:
    """Publish one event; see ``publish_many``."""
    return await publish_many(conn, [event], tenant=tenant)
