"""What is unhealthy, since when, and which alert covers it (``delivery status``, issue #19).

Each unhealthy thing is one item: its kind, what it is about (``subject``), the moment it went
unhealthy (``since``, RFC 3339 UTC), the alert rule of ``ops/prometheus/alerts.yml`` that covers
it (``alert``; ``None`` where no alert does, e.g. an operator's pause) and a short ``detail``.
``ALERTS`` is the one place that maps a kind to its rule; tests/ops/test_status_alerts.py
checks every name it holds exists in alerts.yml, so renaming a rule breaks that test.

Ages are measured against PostgreSQL's clock, which wrote every ``since``, so a skewed client
clock does not make them lie.
"""

from __future__ import annotations

from datetime import datetime
from enum import StrEnum
from typing import Any

import asyncpg

from delivery.events import format_timestamp


class Kind(StrEnum):
    OUTBOX_BACKLOG = "outbox_backlog"  # the oldest unpublished event is over the alert's age
    QUEUES_UNREACHABLE = "queues_unreachable"  # the broker could not be asked for depths
    CIRCUIT_OPEN = "circuit_open"
    FAILING = "failing"  # failing, circuit still closed
    DISABLED = "disabled"
    PAUSED = "paused"
    PACED = "paced"  # held back by a 429's Retry-After
    DEAD_LETTERS_GROWING = "dead_letters_growing"
    ACCOUNT_BLOCKED = "account_blocked"  # an ordered subscription's account behind a dead letter
    POISON_MESSAGES = "poison_messages"


# The one mapping from a kind to the alert rule that covers it.
ALERTS: dict[Kind, str | None] = {
    Kind.QUEUES_UNREACHABLE: "DeliveryRabbitMQUnreachable",
    Kind.CIRCUIT_OPEN: "DeliveryCircuitOpen",
    # No per-subscription rule: a failing subscriber shows as retries (and later an open
    # circuit, or an automatic disable).
    Kind.FAILING: "DeliveryHighRetryRatio",
    Kind.DISABLED: "DeliverySubscriptionDisabled",
    Kind.PAUSED: None,  # an operator's choice, not a fault
    Kind.PACED: None,  # the subscriber asked for it (429); its lag shows in DeliveryLagHigh
    Kind.DEAD_LETTERS_GROWING: "DeliveryDeadLettersGrowing",
    Kind.ACCOUNT_BLOCKED: "DeliveryOrderedAccountBlocked",
    Kind.POISON_MESSAGES: "DeliveryPoisonMessages",
}
# The outbox has two rules by age; the thresholds are the rules' (`> 60`, `> 600`).
OUTBOX_ALERTS: tuple[tuple[float, str], ...] = (
    (600.0, "DeliveryOutboxOldestAgeCritical"),
    (60.0, "DeliveryOutboxOldestAgeHigh"),
)
OUTBOX_OLDEST_AGE_S = min(threshold for threshold, _ in OUTBOX_ALERTS)
# Dead letters are "growing" while one came within the alert's window (increase over 15m); the
# streak goes back through dead letters no more than that apart.
DEAD_LETTER_WINDOW_S = 900.0
# Every two steps of the walk go back more than the window: 1,000 steps cover over 5 days.
_STREAK_MAX_STEPS = 1000
BLOCKED_SHOWN = 100

_NOW = "SELECT clock_timestamp()"
_OUTBOX = """
SELECT count(*) AS pending, min(created_at) AS oldest_at
FROM delivery.outbox WHERE published_at IS NULL
"""
_SUBSCRIPTIONS = """
SELECT id, tenant_id, state, state_changed_at, disabled_reason, circuit_state,
       consecutive_failures, failing_since, paced_until, paced_since
FROM delivery.subscriptions
WHERE state <> 'removed'
  AND (state IN ('disabled', 'paused') OR circuit_state <> 'closed'
       OR failing_since IS NOT NULL OR paced_until > clock_timestamp())
ORDER BY created_at, id
"""
# Per subscription with a dead letter inside the window: walk back from the latest through dead
# letters less than the window apart (each step: the earliest one in the window before the
# current start). Index deliveries_dead (subscription_id, dead_at) serves every step.
_DEAD_STREAKS = """
WITH RECURSIVE latest AS (
    SELECT s.id, s.tenant_id, m.at
    FROM delivery.subscriptions s,
         LATERAL (SELECT max(d.dead_at) AS at FROM delivery.deliveries d
                  WHERE d.subscription_id = s.id AND d.state = 'dead') m
    WHERE s.state <> 'removed' AND m.at > clock_timestamp() - make_interval(secs => $1)
), streak (id, since, step) AS (
    SELECT id, at, 0 FROM latest
    UNION ALL
    SELECT st.id, e.at, st.step + 1
    FROM streak st,
         LATERAL (SELECT min(d.dead_at) AS at FROM delivery.deliveries d
                  WHERE d.subscription_id = st.id AND d.state = 'dead'
                    AND d.dead_at >= st.since - make_interval(secs => $1)
                    AND d.dead_at < st.since) e
    WHERE e.at IS NOT NULL AND st.step < $2
)
SELECT l.id, l.tenant_id, s.since, n.count
FROM latest l
JOIN (SELECT id, min(since) AS since FROM streak GROUP BY id) s ON s.id = l.id
CROSS JOIN LATERAL (SELECT count(*) FROM delivery.deliveries d
                    WHERE d.subscription_id = l.id AND d.state = 'dead'
                      AND d.dead_at >= s.since) n
ORDER BY s.since, l.id
"""
# Ordered subscriptions' accounts held by a dead letter: since that (their first) dead letter.
_BLOCKED = """
SELECT DISTINCT ON (d.subscription_id, d.account_id)
       d.subscription_id, d.account_id, d.sequence, d.id AS dead_letter_id, d.dead_at
FROM delivery.deliveries d
JOIN delivery.subscriptions s ON s.id = d.subscription_id
WHERE d.account_id IS NOT NULL AND d.state = 'dead' AND s.state <> 'removed'
ORDER BY d.subscription_id, d.account_id, d.sequence
LIMIT $1
"""
# Recorded poison messages stay until replayed or purged: the first still there.
_POISON = "SELECT count(*) AS n, min(received_at) AS since FROM delivery.poison_messages"


async def unhealthy(
    db: asyncpg.Pool | asyncpg.Connection, *, queues_error: str | None
) -> list[dict[str, Any]]:
    """Every unhealthy thing, as ``{kind, subject, since, alert, detail, age_s}``, the longest
    unhealthy first. ``queues_error`` (why the broker could not be asked, or ``None``) is the
    caller's: this module needs no broker."""
    now: datetime = await db.fetchval(_NOW)
    items: list[tuple[datetime, Kind, str, str, str | None]] = []

    def add(since: datetime, kind: Kind, subject: str, detail: str, alert: str | None) -> None:
        items.append((since, kind, subject, detail, alert))

    outbox = await db.fetchrow(_OUTBOX)
    assert outbox is not None  # an aggregate without GROUP BY: always one row
    if outbox["oldest_at"] is not None:
        oldest_s = (now - outbox["oldest_at"]).total_seconds()
        alert = next((name for limit, name in OUTBOX_ALERTS if oldest_s > limit), None)
        if alert is not None:
            add(
                outbox["oldest_at"],
                Kind.OUTBOX_BACKLOG,
                "outbox",
                f"{outbox['pending']} event(s) not published",
                alert,
            )
    if queues_error is not None:
        add(now, Kind.QUEUES_UNREACHABLE, "rabbitmq", queues_error, ALERTS[Kind.QUEUES_UNREACHABLE])

    for s in await db.fetch(_SUBSCRIPTIONS):
        subject = f"subscription {s['id']} (tenant {s['tenant_id']})"
        if s["state"] == "disabled":
            reason = s["disabled_reason"] or "by an operator"
            add(s["state_changed_at"], Kind.DISABLED, subject, reason, ALERTS[Kind.DISABLED])
            continue  # its circuit and pacing no longer matter: nothing is attempted
        if s["state"] == "paused":
            add(s["state_changed_at"], Kind.PAUSED, subject, "paused", ALERTS[Kind.PAUSED])
        if s["circuit_state"] != "closed":
            since = s["failing_since"] or now  # opened by hand, or by a release before 0004
            detail = f"{s['consecutive_failures']} failure(s) in a row"
            add(since, Kind.CIRCUIT_OPEN, subject, detail, ALERTS[Kind.CIRCUIT_OPEN])
        elif s["failing_since"] is not None:
            detail = f"{s['consecutive_failures']} failure(s) in a row, circuit closed"
            add(s["failing_since"], Kind.FAILING, subject, detail, ALERTS[Kind.FAILING])
        if s["paced_until"] is not None and s["paced_until"] > now:
            # A pause from before migration 0026 has no start: its end is all there is.
            since = s["paced_since"] or now
            detail = f"held back until {format_timestamp(s['paced_until'])} (429 Retry-After)"
            add(since, Kind.PACED, subject, detail, ALERTS[Kind.PACED])

    for d in await db.fetch(_DEAD_STREAKS, DEAD_LETTER_WINDOW_S, _STREAK_MAX_STEPS):
        add(
            d["since"],
            Kind.DEAD_LETTERS_GROWING,
            f"subscription {d['id']} (tenant {d['tenant_id']})",
            f"{d['count']} dead letter(s) since",
            ALERTS[Kind.DEAD_LETTERS_GROWING],
        )
    for b in await db.fetch(_BLOCKED, BLOCKED_SHOWN):
        add(
            b["dead_at"],
            Kind.ACCOUNT_BLOCKED,
            f"subscription {b['subscription_id']} account {b['account_id']}",
            f"held at sequence {b['sequence']} by dead letter {b['dead_letter_id']}",
            ALERTS[Kind.ACCOUNT_BLOCKED],
        )
    poison = await db.fetchrow(_POISON)
    assert poison is not None
    if poison["n"]:
        add(
            poison["since"],
            Kind.POISON_MESSAGES,
            "dispatch queue",
            f"{poison['n']} recorded (`delivery dlq list --poison`)",
            ALERTS[Kind.POISON_MESSAGES],
        )

    items.sort(key=lambda i: (i[0], i[1], i[2]))
    return [
        {
            "kind": str(kind),
            "subject": subject,
            "since": format_timestamp(since),
            "age_s": round(max(0.0, (now - since).total_seconds()), 3),
            "alert": alert,
            "detail": detail,
        }
        for since, kind, subject, detail, alert in items
    ]


def format_age(seconds: float) -> str:
    """A short age for people: ``45s``, ``3m12s``, ``2h05m``, ``3d04h``."""
    s = int(seconds)
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m{s % 60:02d}s"
    if s < 86400:
        return f"{s // 3600}h{s % 3600 // 60:02d}m"
    return f"{s // 86400}d{s % 86400 // 3600:02d}h"
