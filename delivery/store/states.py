"""The states a row can be in, as the tables' CHECK constraints spell them (migrations
0002-0004, 0013, 0018, 0022).

Python code that compares or writes a state uses these, so a typo is an attribute error that
mypy sees; being ``str``s, they go to and come from PostgreSQL as the plain text they are. The
SQL statements spell the same words in their own text.
"""

from __future__ import annotations

from enum import StrEnum


class DeliveryState(StrEnum):
    """``delivery.deliveries.state``."""

    PENDING = "pending"  # to be attempted (now, or at next_attempt_at)
    DELIVERED = "delivered"
    DEAD = "dead"  # a dead letter: attempted again only when an operator replays it
    SKIPPED = "skipped"  # a dead letter an operator gave up on (`dlq skip`): never sent


class SubscriptionState(StrEnum):
    """``delivery.subscriptions.state``."""

    ACTIVE = "active"
    # By an operator: its events wait as pending deliveries, attempted in order on resume.
    PAUSED = "paused"
    DISABLED = "disabled"  # by an operator, a 410, or failing for too long
    REMOVED = "removed"  # by an operator; kept only for its history, matched to nothing


class CircuitState(StrEnum):
    """``delivery.subscriptions.circuit_state``."""

    CLOSED = "closed"
    OPEN = "open"  # failing: only a probe per cool-down goes out
