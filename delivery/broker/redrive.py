"""Redrive: put published events back in the relay's path, by clearing their outbox mark.

Two callers: the relay's sweep, for events the broker lost after confirming them (published a
while ago, never dispatched), and the poison recorder, for healthy events dead-lettered past
``x-delivery-limit`` by connection flaps. Both get the same two rules from the one statement
here: an event that reached the inbox is never sent again (nothing is missing), and no event is
redriven more than ``max_redrives`` times (one that really crashes workers ends as poison).
"""

from __future__ import annotations

import asyncpg

# Each redrive is logged on the row (who, when, and the publish given up for lost: SET reads
# the row as it was), so the chaos checker can tell what healed what.
_REDRIVE = """
UPDATE delivery.outbox o
SET published_at = NULL, redrives = o.redrives + 1,
    redrive_log = coalesce(o.redrive_log, '[]') || jsonb_build_array(jsonb_build_object(
        'by', '{by}', 'at', clock_timestamp(), 'published_at', o.published_at))
WHERE {which}
  AND o.redrives < $1
  AND NOT EXISTS (SELECT 1 FROM delivery.inbox i WHERE i.event_id = o.event_id)
RETURNING o.event_id
"""
# Only rows published within the window are considered: the sweep stays an index range scan.
_LOST = _REDRIVE.format(
    by="sweep",
    which="o.published_at < clock_timestamp() - make_interval(secs => $2)\n"
    "  AND o.published_at > clock_timestamp() - make_interval(secs => $3)"
)
_NAMED = _REDRIVE.format(
    by="poison", which="o.event_id = ANY($2::text[]) AND o.published_at IS NOT NULL"
)


async def redrive_lost(
    pool: asyncpg.Pool, *, published_before_s: float, window_s: float, max_redrives: int
) -> list[str]:
    """Events published between ``window_s`` and ``published_before_s`` seconds ago and never
    dispatched; returns the ids sent again."""
    rows = await pool.fetch(_LOST, max_redrives, published_before_s, window_s)
    return [r["event_id"] for r in rows]


async def redrive_events(
    pool: asyncpg.Pool, event_ids: list[str], *, max_redrives: int
) -> list[str]:
    """These published events, unless dispatched already; returns the ids sent again."""
    rows = await pool.fetch(_NAMED, max_redrives, event_ids)
    return [r["event_id"] for r in rows]
