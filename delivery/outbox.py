"""The producer side: write events into the outbox inside the caller's transaction.

``sequence`` is per account, 1, 2, 3... with no gaps: the account's counter row is bumped in the
same statement that inserts the events, so its row lock is held until the caller commits. Two
producers writing to one account therefore serialise, which is the price of a gapless order.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field, replace
from typing import Any

import asyncpg
import orjson

from delivery import tracing
from delivery.errors import InputError
from delivery.events import NewEvent, parse_event

# One statement: skip ids already committed, count fresh events per account, bump each account's
# counter (in account order, so concurrent batches lock in the same order and cannot deadlock),
# and insert with consecutive sequences in the caller's order.
_INSERT = """
WITH input AS (
    SELECT * FROM unnest($1::text[], $2::text[], $3::text[], $4::timestamptz[], $5::text[],
                         $6::text[])
        WITH ORDINALITY AS t(event_id, type, account_id, occurred_at, data, traceparent, ord)
),
fresh AS (
    SELECT DISTINCT ON (i.event_id) i.*
    FROM input i
    WHERE NOT EXISTS (SELECT 1 FROM delivery.outbox o WHERE o.event_id = i.event_id)
    ORDER BY i.event_id, i.ord
),
counts AS (
    SELECT account_id, count(*) AS n FROM fresh GROUP BY account_id
),
bumped AS (
    INSERT INTO delivery.account_sequences AS s (account_id, last_sequence)
    SELECT account_id, n FROM counts ORDER BY account_id
    ON CONFLICT (account_id) DO UPDATE SET last_sequence = s.last_sequence + excluded.last_sequence
    RETURNING account_id, last_sequence
),
ins AS (
    INSERT INTO delivery.outbox
        (event_id, type, account_id, sequence, occurred_at, data, traceparent)
    SELECT f.event_id, f.type, f.account_id,
           b.last_sequence - c.n + row_number() OVER (PARTITION BY f.account_id ORDER BY f.ord),
           f.occurred_at, f.data::jsonb, f.traceparent
    FROM fresh f
    JOIN counts c USING (account_id)
    JOIN bumped b USING (account_id)
    ORDER BY f.ord
    ON CONFLICT (event_id) DO NOTHING
    RETURNING event_id
)
SELECT (SELECT coalesce(sum(n), 0) FROM counts)::bigint AS fresh_n,
       array(SELECT event_id FROM ins) AS inserted
"""

# A concurrent producer committing the same id between our snapshot and our insert makes the
# insert skip a row whose sequence we already counted (a gap); we then roll back to a savepoint
# and run again, now seeing that row. More than a few rounds means something else is wrong.
_MAX_ROUNDS = 5


@dataclass(frozen=True)
class PublishResult:
    published: list[str] = field(default_factory=list)
    duplicates: list[str] = field(default_factory=list)

    def as_dict(self) -> dict[str, int]:
        return {"published": len(self.published), "duplicates": len(self.duplicates)}


def validate_all(events: Iterable[Mapping[str, Any] | NewEvent]) -> list[NewEvent]:
    """Validate every event first; ``InputError`` lists each bad one by position (1-based)."""
    parsed: list[NewEvent] = []
    problems: list[str] = []
    for index, raw in enumerate(events, start=1):
        if isinstance(raw, NewEvent):
            parsed.append(raw)
            continue
        try:
            parsed.append(parse_event(raw))
        except InputError as exc:
            problems.append(f"event {index}: {exc}")
    if problems:
        raise InputError("; ".join(problems), problems=problems)
    return parsed


async def _insert(conn: asyncpg.Connection, events: list[NewEvent]) -> set[str]:
    """Insert in one round trip; raise ``_RaceLost`` if a counted event was not inserted."""
    row = await conn.fetchrow(
        _INSERT,
        [e.id for e in events],
        [e.type for e in events],
        [e.account_id for e in events],
        [e.occurred_at for e in events],
        [orjson.dumps(e.data).decode() for e in events],
        [e.traceparent for e in events],
    )
    assert row is not None
    inserted = set(row["inserted"])
    if len(inserted) != row["fresh_n"]:
        raise _RaceLost
    return inserted


async def publish_many(
    conn: asyncpg.Connection, events: Iterable[Mapping[str, Any] | NewEvent]
) -> PublishResult:
    """Write events to the outbox on ``conn``, inside the caller's transaction if it has one
    (otherwise in a transaction of its own). A duplicate id is a no-op, reported as such."""
    batch = validate_all(events)
    if not batch:
        return PublishResult()
    # An instrumented producer's current span continues through the outbox (an event's own
    # traceparent wins).
    traceparent = tracing.current_traceparent()
    if traceparent is not None:
        batch = [e if e.traceparent else replace(e, traceparent=traceparent) for e in batch]
    if not conn.is_in_transaction():
        async with conn.transaction():
            return await _publish_validated(conn, batch)
    return await _publish_validated(conn, batch)


async def _publish_validated(conn: asyncpg.Connection, batch: list[NewEvent]) -> PublishResult:
    for _ in range(_MAX_ROUNDS):
        try:
            async with conn.transaction():  # a savepoint inside the caller's transaction
                inserted = await _insert(conn, batch)
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
    raise InputError("could not publish: the same event ids are being published concurrently")


class _RaceLost(Exception):
    pass


async def publish(conn: asyncpg.Connection, event: Mapping[str, Any] | NewEvent) -> PublishResult:
    """Publish one event; see ``publish_many``."""
    return await publish_many(conn, [event])
