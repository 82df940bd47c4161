"""Retry policy as data and pure functions: tested without a clock or a network.

An attempt's result is classified into an ``Outcome``; ``next_delay_s`` turns the attempt
number, the schedule, an optional ``Retry-After`` and a random source into the wait before the
next attempt, or ``None`` when the schedule is exhausted. A 429 is also a request to slow
down: ``pause_s`` is how long it holds back the whole subscription.
"""

from __future__ import annotations

import email.utils
import random
from dataclasses import dataclass
from datetime import UTC, datetime
from enum import StrEnum

JITTER_FRACTION = 0.2
# Retried statuses (the contract): request timeout, too early, too many requests, and 5xx.
RETRYABLE_STATUSES = frozenset({408, 425, 429})
# "Too many requests": the subscriber is up and asks us to slow down. It holds back the
# subscription and paces it; it never counts toward its circuit.
THROTTLED_STATUS = 429
# A 429 without a (usable) Retry-After still holds the subscription back this long.
DEFAULT_PAUSE_S = 1.0
# The longest wait before a retry, whatever the schedule says: PostgreSQL's timestamps end in
# year 294276, and a step like 200000000d overflowed the outcome's write, which then failed
# forever.
MAX_DELAY_S = 366 * 86400.0


class Outcome(StrEnum):
    DELIVERED = "delivered"
    RETRY = "retry"  # retryable failure with attempts left
    EXHAUSTED = "exhausted"  # retryable failure, schedule used up -> dead letters
    PERMANENT = "permanent"  # non-retryable 4xx -> dead letters at once
    GONE = "gone"  # 410 -> disable the subscription


def classify_status(status: int) -> Outcome:
    """HTTP status -> what to do (``RETRY`` before the schedule is consulted)."""
    if 200 <= status < 300:
        return Outcome.DELIVERED
    if status == 410:
        return Outcome.GONE
    if status in RETRYABLE_STATUSES or status >= 500:
        return Outcome.RETRY
    return Outcome.PERMANENT


def parse_retry_after_s(value: str | None, *, now: datetime | None = None) -> float | None:
    """``Retry-After`` as seconds: delta-seconds or an HTTP date; ``None`` if absent/garbled."""
    if not value:
        return None
    value = value.strip()
    if value.isascii() and value.isdigit():  # not isdigit() alone: it accepts "²", float() not
        return float(value)
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    if when.tzinfo is None:
        when = when.replace(tzinfo=UTC)
    return max(0.0, (when - (now or datetime.now(UTC))).total_seconds())


@dataclass(frozen=True)
class RetryPolicy:
    """``schedule_s[i]`` is the wait after failed attempt ``i + 1``."""

    schedule_s: tuple[float, ...]
    jitter_fraction: float = JITTER_FRACTION

    @property
    def max_attempts(self) -> int:
        return len(self.schedule_s) + 1

    @property
    def longest_step_s(self) -> float:
        return min(max(self.schedule_s, default=0.0), MAX_DELAY_S)


def next_delay_s(
    policy: RetryPolicy,
    attempt: int,
    *,
    retry_after_s: float | None,
    rng: random.Random,
) -> float | None:
    """The wait after failed attempt number ``attempt`` (1-based), or ``None`` if exhausted.

    Jitter spreads retries of many deliveries that failed together (+-``jitter_fraction``).
    A ``Retry-After`` wins over the schedule when it is longer, capped by the schedule's longest
    step so a subscriber cannot park a delivery for days; it is not jittered, because the
    subscriber asked for that moment and no earlier.
    """
    if attempt < 1:
        raise ValueError("attempt numbers start at 1")
    if attempt > len(policy.schedule_s):
        return None
    base = min(policy.schedule_s[attempt - 1], MAX_DELAY_S / (1.0 + policy.jitter_fraction))
    jittered = base * (1.0 + rng.uniform(-policy.jitter_fraction, policy.jitter_fraction))
    if retry_after_s is not None and retry_after_s > jittered:
        return min(retry_after_s, policy.longest_step_s)
    return jittered


def pause_s(
    policy: RetryPolicy, *, retry_after_s: float | None, max_pause_s: float
) -> float:
    """How long a 429 holds back its whole subscription: its ``Retry-After`` (or a second),
    capped like a delivery's own Retry-After by the schedule's longest step, and by
    ``max_pause_s`` (so a hostile subscriber cannot park itself, and every worker, for days)."""
    wanted = DEFAULT_PAUSE_S if retry_after_s is None else retry_after_s
    return max(0.0, min(wanted, policy.longest_step_s, max_pause_s))


@dataclass(frozen=True)
class Decision:
    outcome: Outcome
    delay_s: float | None = None  # with RETRY: wait before the next attempt
    reason: str | None = None  # with EXHAUSTED / PERMANENT / GONE: kept with the dead letter
    # With a 429: hold the whole subscription back this long (it is throttled, not failing).
    pause_s: float | None = None

    @property
    def throttled(self) -> bool:
        return self.pause_s is not None


def decide(
    *,
    status: int | None,
    error: str | None,
    retry_after_s: float | None,
    attempt: int,
    policy: RetryPolicy,
    rng: random.Random,
    max_pause_s: float = 300.0,
    permanent: bool = False,
) -> Decision:
    """What to do after attempt ``attempt`` answered ``status`` (or failed with ``error``;
    ``permanent``: a failure no retry can mend, such as a blocked target)."""
    if status is None and permanent:
        return Decision(Outcome.PERMANENT, reason=error or "no answer: not retryable")
    if status is None:
        kind = Outcome.RETRY
        what = error or "no answer"
    else:
        kind = classify_status(status)
        what = f"HTTP {status}"
    if kind is Outcome.DELIVERED:
        return Decision(Outcome.DELIVERED)
    if kind is Outcome.GONE:
        return Decision(Outcome.GONE, reason="HTTP 410 Gone: subscription disabled")
    if kind is Outcome.PERMANENT:
        return Decision(Outcome.PERMANENT, reason=f"{what}: not retryable")
    pause = None
    if status == THROTTLED_STATUS:
        pause = pause_s(policy, retry_after_s=retry_after_s, max_pause_s=max_pause_s)
    delay = next_delay_s(policy, attempt, retry_after_s=retry_after_s, rng=rng)
    if delay is None:
        reason = f"{what}: gave up after {attempt} attempts"
        return Decision(Outcome.EXHAUSTED, reason=reason, pause_s=pause)
    return Decision(Outcome.RETRY, delay_s=delay, pause_s=pause)
