"""The retry policy is data plus pure functions: tested without a clock or a network."""

import random
from datetime import UTC, datetime

import pytest

from delivery.durations import format_schedule, parse_schedule_s
from delivery.worker.retry import (
    Outcome,
    RetryPolicy,
    classify_status,
    decide,
    next_delay_s,
    parse_retry_after_s,
)

POLICY = RetryPolicy(parse_schedule_s("5s,5m,30m,2h,5h,10h,10h"))


def test_default_schedule_parses_and_formats_back():
    assert POLICY.schedule_s == (5, 300, 1800, 7200, 18000, 36000, 36000)
    assert format_schedule(POLICY.schedule_s) == "5s,5m,30m,2h,5h,10h,10h"
    assert POLICY.max_attempts == 8
    assert parse_schedule_s("250ms, 1.5s") == (0.25, 1.5)


@pytest.mark.parametrize("bad", ["", "5", "5x", "5s,,", "-1s", "s"])
def test_bad_schedules_name_the_token(bad):
    with pytest.raises(ValueError, match=r"duration|empty"):
        parse_schedule_s(bad)


@pytest.mark.parametrize(
    ("status", "outcome"),
    [
        (200, Outcome.DELIVERED),
        (204, Outcome.DELIVERED),
        (299, Outcome.DELIVERED),
        (408, Outcome.RETRY),
        (425, Outcome.RETRY),
        (429, Outcome.RETRY),
        (500, Outcome.RETRY),
        (503, Outcome.RETRY),
        (599, Outcome.RETRY),
        (410, Outcome.GONE),
        (400, Outcome.PERMANENT),
        (401, Outcome.PERMANENT),
        (404, Outcome.PERMANENT),
        (301, Outcome.PERMANENT),
        (422, Outcome.PERMANENT),
    ],
)
def test_classification_follows_the_contract(status, outcome):
    assert classify_status(status) is outcome


def test_jitter_stays_within_twenty_percent_and_varies():
    rng = random.Random(7)
    for attempt, base in enumerate(POLICY.schedule_s, start=1):
        delays = [next_delay_s(POLICY, attempt, retry_after_s=None, rng=rng) for _ in range(200)]
        assert all(base * 0.8 <= d <= base * 1.2 for d in delays)
        assert len({round(d, 6) for d in delays}) > 150  # actually spread, not constant


def test_schedule_exhausts_after_its_last_step():
    rng = random.Random(1)
    assert next_delay_s(POLICY, 7, retry_after_s=None, rng=rng) is not None
    assert next_delay_s(POLICY, 8, retry_after_s=None, rng=rng) is None
    with pytest.raises(ValueError):
        next_delay_s(POLICY, 0, retry_after_s=None, rng=rng)


def test_retry_after_wins_when_longer_and_is_capped_by_the_longest_step():
    rng = random.Random(3)
    assert next_delay_s(POLICY, 1, retry_after_s=120, rng=rng) == 120
    assert next_delay_s(POLICY, 1, retry_after_s=10**9, rng=rng) == 36000
    # Shorter than the schedule: the schedule's (jittered) delay stands.
    delay = next_delay_s(POLICY, 2, retry_after_s=1, rng=rng)
    assert delay is not None and 240 <= delay <= 360


def test_retry_after_parses_seconds_and_http_dates():
    now = datetime(2026, 1, 1, 12, 0, 0, tzinfo=UTC)
    assert parse_retry_after_s("120") == 120
    assert parse_retry_after_s("Thu, 01 Jan 2026 12:00:30 GMT", now=now) == 30
    assert parse_retry_after_s("Thu, 01 Jan 2026 11:00:00 GMT", now=now) == 0
    assert parse_retry_after_s("soon") is None
    assert parse_retry_after_s(None) is None


def test_decide_turns_results_into_outcomes_with_reasons():
    rng = random.Random(5)
    short = RetryPolicy((1.0, 2.0))
    assert (
        decide(status=200, error=None, retry_after_s=None, attempt=1, policy=short, rng=rng).outcome
        is Outcome.DELIVERED
    )
    retry = decide(
        status=None, error="timeout", retry_after_s=None, attempt=1, policy=short, rng=rng
    )
    assert retry.outcome is Outcome.RETRY and 0.8 <= retry.delay_s <= 1.2
    exhausted = decide(status=503, error=None, retry_after_s=None, attempt=3, policy=short, rng=rng)
    assert (
        exhausted.outcome is Outcome.EXHAUSTED
        and "HTTP 503" in exhausted.reason
        and "3 attempts" in exhausted.reason
    )
    permanent = decide(status=400, error=None, retry_after_s=None, attempt=1, policy=short, rng=rng)
    assert permanent.outcome is Outcome.PERMANENT and permanent.reason == "HTTP 400: not retryable"
    gone = decide(status=410, error=None, retry_after_s=None, attempt=1, policy=short, rng=rng)
    assert gone.outcome is Outcome.GONE


def test_connection_class_errors_are_retried_and_data_errors_are_not():
    import asyncpg

    from delivery.store.pool import is_connection_error

    assert is_connection_error(asyncpg.exceptions.InternalClientError("cannot switch to state 15"))
    assert is_connection_error(ConnectionResetError())
    assert is_connection_error(asyncpg.exceptions.AdminShutdownError())
    assert not is_connection_error(asyncpg.exceptions.UniqueViolationError())
    assert not is_connection_error(ValueError())
