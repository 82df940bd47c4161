"""Pacing of a subscriber that answers 429 is a pure rule: tested with explicit times, no clock."""

from __future__ import annotations

from delivery.worker.pacing import (
    MAX_BURST,
    MIN_BURST,
    MIN_RATE_PER_S,
    UNKNOWN_LIMIT_RATE_PER_S,
    UNPACED_ABOVE_PER_S,
    Pace,
    Pacer,
    succeeded,
    take_turn,
    throttled,
)


def sends_until_refused(pace: Pace, now_s: float, limit: int = 1000) -> tuple[Pace, int]:
    """Take turns at ``now_s`` until one must wait; how many went."""
    for sent in range(limit):
        pace, wait_s = take_turn(pace, now_s)
        if wait_s > 0:
            return pace, sent
    return pace, limit


def test_an_unthrottled_subscription_is_never_held():
    pace = Pace()
    for i in range(100):
        pace, wait_s = take_turn(pace, i * 0.001)
        assert wait_s == 0
        pace = succeeded(pace, i * 0.001)
    assert pace.rate_per_s is None


def test_a_429_pauses_the_subscription_for_its_retry_after():
    pace = throttled(Pace(), 10.0, sent_s=9.99, pause_s=2.0)
    assert pace.paused(10.0) and pace.paused(11.99) and not pace.paused(12.0)
    _, wait_s = take_turn(pace, 11.0)
    assert wait_s == 1.0  # nothing goes before the pause ends


def test_the_first_rate_is_what_the_subscriber_accepted_in_the_last_second():
    pace = Pace()
    for i in range(20):  # 20 accepted in a burst, then a refusal
        pace = succeeded(pace, 1.0 + i * 0.001)
    pace = throttled(pace, 1.05, sent_s=1.04, pause_s=1.0)
    assert pace.rate_per_s == 20 * 0.9


def test_a_subscriber_that_accepted_nothing_gets_a_guessed_rate_and_the_smallest_burst():
    pace = throttled(Pace(), 5.0, sent_s=4.9, pause_s=1.0)
    assert pace.rate_per_s == UNKNOWN_LIMIT_RATE_PER_S
    assert pace.burst == MIN_BURST


def test_answers_to_requests_sent_before_a_cut_extend_the_pause_but_do_not_cut_again():
    pace = Pace(rate_per_s=40.0)
    pace = throttled(pace, 10.0, sent_s=9.99, pause_s=1.0)
    rate = pace.rate_per_s
    later = throttled(pace, 10.2, sent_s=9.995, pause_s=1.0)  # was in flight at the cut
    assert later.rate_per_s == rate
    assert later.paused_until_s == 11.2  # the pause is never shortened, only extended
    again = throttled(later, 11.5, sent_s=11.3, pause_s=1.0)  # sent after the cut: cuts
    assert again.rate_per_s is not None and rate is not None and again.rate_per_s < rate


def test_after_a_429_the_rate_follows_what_was_accepted_since_the_last_one():
    pace = throttled(Pace(rate_per_s=50.0), 0.0, sent_s=0.0, pause_s=1.0)
    for i in range(40):  # 40 accepted over the next two seconds (pause included)
        pace = succeeded(pace, 1.0 + i * 0.025)
    pace = throttled(pace, 2.0, sent_s=1.99, pause_s=1.0)
    assert pace.rate_per_s is not None
    assert abs(pace.rate_per_s - 0.9 * 40 / 2.0) < 1e-9
    assert pace.burst == MAX_BURST  # it accepted more than the ceiling since the last cut


def test_with_nothing_accepted_since_the_last_429_the_rate_halves_down_to_a_floor():
    pace = Pace(rate_per_s=8.0, slowed_at_s=0.0)
    rates = []
    for i in range(1, 6):
        pace = throttled(pace, float(i * 3), sent_s=float(i * 3) - 0.01, pause_s=1.0)
        rates.append(pace.rate_per_s)
    assert rates == [4.0, MIN_RATE_PER_S, MIN_RATE_PER_S, MIN_RATE_PER_S, MIN_RATE_PER_S]


def test_when_a_pause_ends_its_burst_goes_at_once_then_the_rate_spaces_requests():
    pace = Pace()
    for i in range(20):
        pace = succeeded(pace, i * 0.001)
    pace = throttled(pace, 0.05, sent_s=0.04, pause_s=1.0)  # rate 18, burst 16
    pace, sent = sends_until_refused(pace, 1.05)
    assert sent == 18  # the bucket is full when the pause ends: a second's worth at once
    pace, wait_s = take_turn(pace, 1.05)
    assert abs(wait_s - 1 / 18) < 1e-9
    pace, wait_s = take_turn(pace, 1.05 + 1 / 18)
    assert wait_s == 0


def test_successes_raise_the_rate_gently_until_pacing_ends():
    pace = Pace(rate_per_s=10.0)
    for _ in range(10):  # one second's worth of successes: about one more request a second
        pace = succeeded(pace, 1.0)
    assert pace.rate_per_s is not None and 10.9 < pace.rate_per_s < 11.0
    fast = Pace(rate_per_s=UNPACED_ABOVE_PER_S - 0.001)
    assert succeeded(fast, 1.0).rate_per_s is None


def test_the_pacer_forgets_subscriptions_it_no_longer_holds_back():
    now = [0.0]
    pacer = Pacer(clock=lambda: now[0])
    pacer.succeeded("sub_ok")
    pacer.throttled("sub_slow", sent_s=0.0, pause_s=2.0)
    assert pacer.paused_subscriptions() == ["sub_slow"]
    assert pacer.next_resume_in_s() == 2.0
    assert pacer.turn("sub_ok") == 0
    assert pacer.turn("sub_slow") == 2.0
    now[0] = 5.0
    assert pacer.paused_subscriptions() == []  # sub_ok forgotten; sub_slow still rate-limited
    assert pacer.next_resume_in_s() is None
    assert pacer.turn("sub_slow") == 0
