"""Replay of a time window (``delivery subscriptions replay ID --since --until``,
``POST /v1/subscriptions/{id}/replay``): every event of the subscription's tenant committed in
``[since, until)`` (the outbox row's ``created_at``) that matches the subscription (its type
patterns and account) is sent to it again, with the same ``webhook-id`` and body.

- A delivery that exists goes back to pending, due now, with its attempts count reset to 0: a
  fresh retry schedule, as ``dlq replay`` gives (its earlier attempts stay in the history).
  One being attempted right now (leased) is left to that attempt.
- An event that never had a delivery for the subscription (published before it existed, or
  while it was disabled and then purged) gets one.

Bounded, so a typo cannot flood a subscriber or hold locks for long: at most
``MAX_REPLAY_DAYS`` days and ``MAX_REPLAY_EVENTS`` events per call; a larger window is refused
whole (``InputError``) and nothing is replayed: split it.
"""

from __future__ import annotations

import fnmatch
from datetime import datetime, timedelta

import asyncpg

from delivery.errors import InputError, NotFoundError
from delivery.events import EVENT_TYPES
from delivery.store.states import SubscriptionState
from delivery.store.tenants import DEFAULT_TENANT

MAX_REPLAY_DAYS = 31
MAX_REPLAY_EVENTS = 100_000

_SUBSCRIPTION = """
SELECT state, event_patterns, account_id, ordered FROM delivery.subscriptions
WHERE id = $1 AND tenant_id = $2
"""
# $1 tenant, $2 since, $3 until, $4 the event types the patterns match, $5 account or NULL,
# $6 the subscription, $7 the most events a replay may send, $8 whether it is ordered (its
# deliveries, those with an account_id, are then held, and released one per account in
# sequence by migration 0022's trigger). One statement, so the bound holds for exactly the
# events replayed: over it, `w` has one row more and nothing is written.
_REPLAY = """
WITH w AS (
    SELECT event_id, account_id, sequence FROM delivery.outbox
    WHERE tenant_id = $1 AND created_at >= $2 AND created_at < $3
      AND type = ANY($4::text[]) AND ($5::text IS NULL OR account_id = $5)
    LIMIT $7::int + 1
),
go AS (SELECT count(*) <= $7::int AS ok FROM w),
again AS (
    UPDATE delivery.deliveries d
    SET state = 'pending', attempts = 0, lease_until = NULL,
        next_attempt_at = CASE WHEN d.account_id IS NULL THEN clock_timestamp()
                               ELSE 'infinity' END,
        dead_at = NULL, dead_reason = NULL, unrecorded_handbacks = 0
    FROM w, go
    WHERE go.ok AND d.event_id = w.event_id AND d.subscription_id = $6
      -- One being attempted right now is left to that attempt.
      AND NOT (d.state = 'pending' AND d.lease_until > clock_timestamp())
),
created AS (
    INSERT INTO delivery.deliveries (event_id, subscription_id, account_id, sequence,
                                     next_attempt_at)
    SELECT w.event_id, $6, CASE WHEN $8 THEN w.account_id END, CASE WHEN $8 THEN w.sequence END,
           CASE WHEN $8 THEN 'infinity' ELSE clock_timestamp() END
    FROM w, go
    WHERE go.ok AND NOT EXISTS (
        SELECT 1 FROM delivery.deliveries d
        WHERE d.event_id = w.event_id AND d.subscription_id = $6
    )
    ON CONFLICT (event_id, subscription_id) DO NOTHING
)
SELECT (SELECT count(*) FROM w) AS matched, (SELECT ok FROM go) AS ok
"""


def parse_moment(text: str, field: str) -> datetime:
    """An RFC 3339 timestamp with its offset (``2026-12-07T21:00:00Z``), as typed."""
    try:
        moment = datetime.fromisoformat(text)
    except ValueError:
        moment = None
    if moment is None or moment.tzinfo is None or "T" not in text.upper():
        raise InputError(
            f"{field}: {text!r} is not an RFC 3339 timestamp like 2026-12-07T21:00:00Z"
        )
    return moment


def check_window(since: datetime, until: datetime) -> None:
    if since.tzinfo is None or until.tzinfo is None:
        raise InputError("since, until: give timestamps with their offset (Z or +01:00)")
    if not since < until:
        raise InputError("until: must be later than since")
    if until - since > timedelta(days=MAX_REPLAY_DAYS):
        raise InputError(f"until: a replay covers at most {MAX_REPLAY_DAYS} days; split the window")


def matching_types(patterns: tuple[str, ...] | list[str]) -> list[str]:
    """The catalogue's event types the subscription's globs match (an event of any other type
    was refused when it was published)."""
    return [t for t in EVENT_TYPES if any(fnmatch.fnmatchcase(t, p) for p in patterns)]


async def replay_window(
    conn: asyncpg.Connection,
    subscription_id: str,
    since: datetime,
    until: datetime,
    *,
    tenant_id: str = DEFAULT_TENANT,
) -> int:
    """Send the window's matching events to the subscription again; how many. A paused
    subscription gets them on resume; a disabled one is refused (enable it first)."""
    check_window(since, until)
    sub = await conn.fetchrow(_SUBSCRIPTION, subscription_id, tenant_id)
    if sub is None or sub["state"] == SubscriptionState.REMOVED:
        raise NotFoundError(f"subscription {subscription_id!r} does not exist")
    if sub["state"] == SubscriptionState.DISABLED:
        raise InputError(
            f"subscription {subscription_id!r} is disabled: enable it first"
            " (`delivery subscriptions enable ID`), then replay"
        )
    # The subscription is not locked: a lock that kept its state still would stall every
    # outcome commit touching its circuit meanwhile. Disabled during the replay, its replayed
    # deliveries are parked by the scheduler like any of a disabled subscription.
    types = matching_types(sub["event_patterns"])
    window = (tenant_id, since, until, types, sub["account_id"])
    row = await conn.fetchrow(
        _REPLAY, *window, subscription_id, MAX_REPLAY_EVENTS, sub["ordered"]
    )
    assert row is not None
    if not row["ok"]:
        raise InputError(
            f"since, until: over {MAX_REPLAY_EVENTS:,} matching events in this window;"
            " replay it in smaller windows"
        )
    return int(row["matched"])
