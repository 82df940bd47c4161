"""The ingest rate's arithmetic (GCRA), without a clock: ``step`` is the rule the SQL applies,
``decision`` the answer an API gives from what the statement returned."""

from __future__ import annotations

import pytest

from delivery.errors import QuotaExceededError
from delivery.store.quotas import burst_events, decision, refuse, step


def _run(limit_per_s: int, requests: list[tuple[float, int]]) -> list[bool]:
    """Requests (time in seconds, events) through the rule, as one shared TAT sees them."""
    tat_s = float("-inf")
    answers = []
    for now_s, events in requests:
        after = step(tat_s - now_s, limit_per_s, events)
        answers.append(after is not None)
        if after is not None:
            tat_s = now_s + after
    return answers


def test_a_whole_second_of_events_goes_at_once_and_the_next_waits_for_its_share():
    # Given 10 events/s, when 10 come at t=0, then one more at t=0 and one at t=0.1
    assert _run(10, [(0.0, 10), (0.0, 1), (0.1, 1), (0.1, 1)]) == [True, False, True, False]


def test_a_batch_costs_its_events_and_a_refused_one_consumes_nothing():
    # 6 of 10 taken; 5 more do not fit (nothing taken), so 4 still do.
    assert _run(10, [(0.0, 6), (0.0, 5), (0.0, 4), (0.0, 1)]) == [True, False, True, False]


def test_a_request_larger_than_the_burst_never_fits():
    assert step(-100.0, 10, 11) is None
    answer = decision(10, 11, None, None)
    assert not answer.allowed and answer.retry_after_s is None
    assert "Retry-After" not in answer.headers()


@pytest.mark.parametrize("limit_per_s", [1, 7, 100])
def test_no_interval_admits_more_than_its_rate_plus_the_burst(limit_per_s):
    # Requests every 1/(4*rate) s, in batches of 1-3, for 5 s: whatever the window, what
    # was allowed in it is at most rate * length + burst.
    times = [i / (4 * limit_per_s) for i in range(20 * limit_per_s)]
    requests = [(t, min(1 + i % 3, limit_per_s)) for i, t in enumerate(times)]
    answers = _run(limit_per_s, requests)
    taken = [(t, n) for (t, n), ok in zip(requests, answers, strict=True) if ok]
    for i, (start, _) in enumerate(taken):
        for j in range(i, len(taken)):
            length = taken[j][0] - start
            total = sum(n for _, n in taken[i : j + 1])
            assert total <= limit_per_s * length + burst_events(limit_per_s) + 1e-9
    # ... and it is not starved: over 5 s about 5 seconds' worth plus the burst.
    assert sum(n for _, n in taken) >= 5 * limit_per_s


def test_an_allowed_answer_says_what_is_left_and_when_it_is_whole_again():
    answer = decision(10, 4, ahead_s=0.4, current_ahead_s=0.0)
    assert answer.allowed and answer.remaining == 6 and answer.reset_s == pytest.approx(0.4)
    assert answer.headers() == {
        "RateLimit-Limit": "10",
        "RateLimit-Remaining": "6",
        "RateLimit-Reset": "1",
    }


def test_a_refusal_says_how_long_until_the_request_would_fit():
    # The TAT is 0.9 s ahead: 3 events (0.3 s) fit once it is 0.7 s ahead, in 0.2 s.
    answer = decision(10, 3, ahead_s=None, current_ahead_s=0.9)
    assert not answer.allowed and answer.remaining == 1
    assert answer.retry_after_s == pytest.approx(0.2)
    assert answer.headers()["Retry-After"] == "1"  # whole seconds, rounded up, never 0
    assert answer.headers()["RateLimit-Remaining"] == "1"


def test_a_refusal_as_an_error_carries_when_to_retry():
    refuse(decision(10, 1, ahead_s=0.5, current_ahead_s=0.0))  # allowed: nothing raised
    with pytest.raises(QuotaExceededError, match="10 events/s") as waited:
        refuse(decision(10, 3, ahead_s=None, current_ahead_s=0.9))
    assert waited.value.retry_after_s == pytest.approx(0.2)
    with pytest.raises(QuotaExceededError, match="split it") as never:
        refuse(decision(10, 11, ahead_s=None, current_ahead_s=None))
    assert never.value.retry_after_s is None
