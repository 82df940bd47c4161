"""The retry policy is data plus pure functions: tested without a clock or a network."""

import collections
import random
from datetime import UTC, datetime

import pytest

from delivery.durations import format_schedule, parse_schedule_s
from delivery.worker.retry import (
    DEFAULT_PAUSE_S,
    MAX_DELAY_S,
    Outcome,
    RetryPolicy,
    classify_status,
    decide,
    next_delay_s,
    parse_retry_after_s,
    pause_s,
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
        (501, Outcome.RETRY),
        (502, Outcome.RETRY),
        (503, Outcome.RETRY),
        (504, Outcome.RETRY),
        (599, Outcome.RETRY),
        (410, Outcome.GONE),
        (400, Outcome.PERMANENT),
        (401, Outcome.PERMANENT),
        (404, Outcome.PERMANENT),
        (301, Outcome.PERMANENT),
        (422, Outcome.PERMANENT),
        (403, Outcome.PERMANENT),
        (409, Outcome.PERMANENT),
        (411, Outcome.PERMANENT),
        (428, Outcome.PERMANENT),
    ],
)
def test_classification_follows_the_contract(status, outcome):
    assert classify_status(status) is outcome


@pytest.mark.parametrize("status", [408, 425, 429, 500, 502, 503, 504])
def test_a_retryable_status_is_retried_with_a_delay_and_dead_lettered_only_when_exhausted(status):
    short = RetryPolicy((1.0, 2.0))
    rng = random.Random(2)
    first = decide(status=status, error=None, retry_after_s=None, attempt=1, policy=short, rng=rng)
    assert first.outcome is Outcome.RETRY and first.delay_s is not None and first.reason is None
    last = decide(status=status, error=None, retry_after_s=None, attempt=3, policy=short, rng=rng)
    assert last.outcome is Outcome.EXHAUSTED
    assert last.reason == f"HTTP {status}: gave up after 3 attempts"


def test_410_is_gone_not_an_ordinary_permanent_failure():
    rng = random.Random(4)
    gone = decide(status=410, error=None, retry_after_s=None, attempt=1, policy=POLICY, rng=rng)
    assert gone.outcome is Outcome.GONE
    assert gone.reason == "HTTP 410 Gone: subscription disabled"
    assert gone.delay_s is None


def test_a_429_with_retry_after_waits_as_long_as_the_subscriber_asked():
    rng = random.Random(6)
    decision = decide(status=429, error=None, retry_after_s=90, attempt=1, policy=POLICY, rng=rng)
    assert decision.outcome is Outcome.RETRY
    assert decision.delay_s == 90  # not the jittered 5 s step, and not jittered itself


def test_retries_of_many_deliveries_that_failed_together_are_spread():
    # 1000 deliveries failed on their first attempt at the same moment (one outage).
    rng = random.Random(20260101)
    delays = [next_delay_s(POLICY, 1, retry_after_s=None, rng=rng) for _ in range(1000)]
    assert all(d is not None for d in delays)
    spread = [d for d in delays if d is not None]
    # Spread across the +-20 % band around the 5 s step, not piled on one instant.
    assert min(spread) < 4.2 and max(spread) > 5.8
    # Ten 0.2 s windows across [4 s, 6 s]: each gets about a tenth, none the whole herd.
    windows = collections.Counter(min(int((d - 4.0) / 0.2), 9) for d in spread)
    assert sorted(windows) == list(range(10))
    assert max(windows.values()) < 150
    # The same seed gives the same delays: the spread is the random source's, nothing else.
    again = random.Random(20260101)
    assert [next_delay_s(POLICY, 1, retry_after_s=None, rng=again) for _ in range(1000)] == delays


def test_every_step_of_the_schedule_is_used_before_giving_up():
    rng = random.Random(8)
    short = RetryPolicy((1.0, 2.0, 4.0), jitter_fraction=0.0)
    delays = [next_delay_s(short, n, retry_after_s=None, rng=rng) for n in (1, 2, 3, 4)]
    assert delays == [1.0, 2.0, 4.0, None]
    assert short.max_attempts == 4
    last_step = decide(status=503, error=None, retry_after_s=None, attempt=3, policy=short, rng=rng)
    assert last_step.outcome is Outcome.RETRY and last_step.delay_s == 4.0


def test_retry_after_longer_than_the_longest_step_is_capped_at_that_step():
    rng = random.Random(9)
    short = RetryPolicy((1.0, 2.0, 4.0))
    # A day asked for on the first attempt: held back by the longest step, not the first.
    assert next_delay_s(short, 1, retry_after_s=86_400, rng=rng) == 4.0
    assert next_delay_s(short, 3, retry_after_s=86_400, rng=rng) == 4.0
    # Within the cap: exactly what was asked, on any attempt.
    assert next_delay_s(short, 1, retry_after_s=3.5, rng=rng) == 3.5
    capped = decide(status=503, error=None, retry_after_s=10**7, attempt=2, policy=short, rng=rng)
    assert capped.outcome is Outcome.RETRY and capped.delay_s == 4.0


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


def test_a_blocked_target_is_permanent_at_once_with_its_reason():
    blocked = decide(
        status=None,
        error="blocked target: localhost resolves to 127.0.0.1 (loopback)",
        retry_after_s=None,
        attempt=1,
        policy=RetryPolicy((1.0, 2.0)),
        rng=random.Random(5),
        permanent=True,
    )
    assert blocked.outcome is Outcome.PERMANENT
    assert blocked.reason == "blocked target: localhost resolves to 127.0.0.1 (loopback)"


def test_connection_class_errors_are_retried_and_data_errors_are_not():
    import asyncpg

    from delivery.store.pool import is_connection_error

    assert is_connection_error(asyncpg.exceptions.InternalClientError("cannot switch to state 15"))
    assert is_connection_error(ConnectionResetError())
    assert is_connection_error(asyncpg.exceptions.AdminShutdownError())
    assert not is_connection_error(asyncpg.exceptions.UniqueViolationError())
    assert not is_connection_error(ValueError())


def test_a_429_holds_back_its_subscription_for_its_retry_after_and_nothing_else_does():
    rng = random.Random(1)
    throttled = decide(
        status=429, error=None, retry_after_s=7, attempt=1, policy=POLICY, rng=rng, max_pause_s=300
    )
    assert throttled.outcome is Outcome.RETRY and throttled.throttled
    assert throttled.pause_s == 7
    for status, error in ((503, None), (408, None), (None, "timeout"), (400, None), (200, None)):
        other = decide(
            status=status, error=error, retry_after_s=7, attempt=1, policy=POLICY, rng=rng
        )
        assert other.pause_s is None and not other.throttled
    # The last attempt's 429 still holds the subscription back (its other deliveries wait).
    last = decide(
        status=429, error=None, retry_after_s=7, attempt=8, policy=POLICY, rng=rng, max_pause_s=300
    )
    assert last.outcome is Outcome.EXHAUSTED and last.pause_s == 7


def test_a_subscription_pause_is_capped_like_a_delivery_retry_after():
    short = RetryPolicy((1.0, 2.0))
    assert pause_s(POLICY, retry_after_s=None, max_pause_s=300) == DEFAULT_PAUSE_S
    assert pause_s(short, retry_after_s=3600, max_pause_s=300) == 2.0  # the longest step
    assert pause_s(POLICY, retry_after_s=10 * 365 * 86400, max_pause_s=300) == 300
    assert pause_s(POLICY, retry_after_s=30, max_pause_s=0) == 0
    assert pause_s(POLICY, retry_after_s=0, max_pause_s=300) == 0


@pytest.mark.parametrize("value", ["\u00b2", "\u0661\u0662", "1\u00b2", "\U0001d7d7"])
def test_a_retry_after_of_non_ascii_digits_is_ignored_not_a_crash(value):
    # str.isdigit() accepts all of these; float() refuses some ("²"), and the crash inside the
    # sender once handed the delivery back for an immediate re-POST, over and over.
    assert value.isdigit()
    assert parse_retry_after_s(value) is None


def test_an_absurd_schedule_step_waits_at_most_the_longest_delay_postgresql_can_store():
    # (settings and the CLI refuse such a step now; a row written before that can hold one)
    huge = RetryPolicy((200_000_000 * 86400.0,))
    rng = random.Random(1)
    delay = next_delay_s(huge, 1, retry_after_s=None, rng=rng)
    assert delay is not None and delay <= MAX_DELAY_S
    assert next_delay_s(huge, 1, retry_after_s=1e300, rng=rng) == MAX_DELAY_S
    decision = decide(status=503, error=None, retry_after_s=None, attempt=1, policy=huge, rng=rng)
    assert decision.outcome is Outcome.RETRY and decision.delay_s <= MAX_DELAY_S


def test_an_attempt_that_failed_for_a_reason_no_retry_can_fix_is_permanent():
    rng = random.Random(3)
    error = "InvalidUrlClientError: http://127.0.0.1:99999/"
    kwargs = {"status": None, "error": error, "retry_after_s": None, "policy": POLICY, "rng": rng}
    permanent = decide(attempt=1, permanent=True, **kwargs)
    assert permanent.outcome is Outcome.PERMANENT
    assert permanent.reason == error
    assert decide(attempt=1, **kwargs).outcome is Outcome.RETRY
