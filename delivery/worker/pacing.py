"""Pacing: a subscriber that answers 429 is sent less, not cut off.

A 429 says "slow down". Beside the delivery's own retry, it does two things:

* it **holds back** the whole subscription for its ``Retry-After`` (``retry.pause_s``): kept in
  PostgreSQL (``subscriptions.paced_until``) so every worker honours it, and here, so work this
  process already holds for it goes back instead of being sent into the pause;
* it **paces** the subscription in this process, with a token bucket:
    * its *rate* starts at what the subscriber accepted in the last second (or a guess when it
      accepted nothing), each later 429 halves it, though never below what the subscriber
      accepted in the last second, and each success adds one request a second, until it is no
      limit at all;
    * its *burst*, what may go at once when a pause ends (the bucket is full then), is the
      larger of one second's worth of the rate and what the subscriber accepted between its
      last two 429s (within ``MIN_BURST`` and ``MAX_BURST``).

  A cut happens once per slow-down: answers to requests sent before the last cut were sent too
  fast already and do not cut again. So a subscriber that allows 20 requests a second gets
  about 20, with a refusal now and then where it used to get a burst of them; one that refuses
  every first attempt (whatever the rate) still gets bursts, led by the retries it accepts.

``Pace`` and its functions are the rule, pure and tested without a clock; ``Pacer`` holds one
``Pace`` per throttled subscription of the process and reads the clock.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, replace

MIN_RATE_PER_S = 2.0
# The first rate of a subscriber that accepted nothing lately (it refuses some requests for
# reasons other than their rate): a guess that successes raise and refusals halve.
UNKNOWN_LIMIT_RATE_PER_S = 10.0
# A rate grown past this limits nothing a subscriber could notice: pacing ends.
UNPACED_ABOVE_PER_S = 500.0
# The bucket holds at least this many seconds' worth of the rate.
RATE_BURST_S = 1.0
# What may go at once when a pause ends: what the subscriber accepted between the last two
# 429s, within these bounds (the ceiling: the default request slots).
MIN_BURST = 4.0
MAX_BURST = 16.0
# Successes are counted over windows this long, for the first rate.
WINDOW_S = 1.0
# After a 429, the rate is this fraction of what the subscriber accepted.
BELOW_ACCEPTED = 0.9


@dataclass(frozen=True, slots=True)
class Pace:
    """One subscription's pace in this process (times on a monotonic clock, in seconds)."""

    rate_per_s: float | None = None  # None: not rate-limited (only a pause may hold it)
    burst: float = MAX_BURST
    tokens: float = 0.0
    updated_s: float = 0.0  # when ``tokens`` was last brought up to date
    paused_until_s: float = 0.0
    slowed_at_s: float = float("-inf")  # the last cut: answers to earlier sends cut no more
    accepted_since_slowed: int = 0
    window_start_s: float = float("-inf")
    window_successes: int = 0

    def paused(self, now_s: float) -> bool:
        return now_s < self.paused_until_s

    def idle(self, now_s: float) -> bool:
        """Nothing to remember: not paused and not rate-limited."""
        return self.rate_per_s is None and not self.paused(now_s)

    def capacity(self) -> float:
        """The most tokens the bucket holds."""
        rate = self.rate_per_s or 0.0
        return max(1.0, self.burst, rate * RATE_BURST_S)


def take_turn(pace: Pace, now_s: float) -> tuple[Pace, float]:
    """Ask to send one request now: ``(pace, 0)`` with a token spent when it may go, else
    ``(pace, seconds to wait)`` before asking again."""
    if pace.paused(now_s):
        return pace, pace.paused_until_s - now_s
    if pace.rate_per_s is None:
        return pace, 0.0
    refill = max(0.0, now_s - pace.updated_s) * pace.rate_per_s
    tokens = min(pace.capacity(), pace.tokens + refill)
    if tokens >= 1.0:
        return replace(pace, tokens=tokens - 1.0, updated_s=now_s), 0.0
    return replace(pace, tokens=tokens, updated_s=now_s), (1.0 - tokens) / pace.rate_per_s


def throttled(pace: Pace, now_s: float, *, sent_s: float, pause_s: float) -> Pace:
    """A 429 answered a request sent at ``sent_s``: hold back for ``pause_s`` and slow down,
    once per slow-down. The bucket is full when the pause ends."""
    paused_until_s = max(pace.paused_until_s, now_s + pause_s)
    if sent_s < pace.slowed_at_s:
        return replace(pace, paused_until_s=paused_until_s, updated_s=paused_until_s)
    accepted = _accepted_rate_per_s(pace, now_s)
    if accepted:
        # A little below what it accepted, so its own bucket refills while we send.
        rate = max(MIN_RATE_PER_S, accepted * BELOW_ACCEPTED)
    elif pace.rate_per_s is None:
        rate = UNKNOWN_LIMIT_RATE_PER_S
    else:
        rate = max(MIN_RATE_PER_S, pace.rate_per_s / 2.0)
    # When the pause ends, as many may go at once as it accepted since the last cut.
    burst = max(MIN_BURST, min(MAX_BURST, float(pace.accepted_since_slowed)))
    slowed = replace(pace, rate_per_s=rate, burst=burst)
    return replace(
        slowed,
        tokens=slowed.capacity(),
        updated_s=paused_until_s,
        paused_until_s=paused_until_s,
        slowed_at_s=now_s,
        accepted_since_slowed=0,
    )


def succeeded(pace: Pace, now_s: float) -> Pace:
    """A request was accepted: count it, and let a paced subscription speed up."""
    if now_s - pace.window_start_s >= WINDOW_S:
        pace = replace(pace, window_start_s=now_s, window_successes=0)
    pace = replace(
        pace,
        window_successes=pace.window_successes + 1,
        accepted_since_slowed=pace.accepted_since_slowed + 1,
    )
    if pace.rate_per_s is None:
        return pace
    # One more request a second for each second's worth of successes: a gentle probe upward.
    rate = pace.rate_per_s + 1.0 / pace.rate_per_s
    if rate > UNPACED_ABOVE_PER_S:
        return replace(pace, rate_per_s=None, tokens=0.0)
    return replace(pace, rate_per_s=rate)


def _accepted_rate_per_s(pace: Pace, now_s: float) -> float:
    """What the subscriber accepted: since the last cut, over that whole time (its pause
    included: for a token bucket, that is its sustained rate), or over the last window."""
    if pace.rate_per_s is not None and now_s > pace.slowed_at_s:
        return pace.accepted_since_slowed / max(WINDOW_S, now_s - pace.slowed_at_s)
    if now_s - pace.window_start_s >= 2 * WINDOW_S:
        return 0.0  # nothing accepted in the last window
    return pace.window_successes / WINDOW_S


class Pacer:
    """The paces of this process's throttled subscriptions (one ``Pace`` each, kept only while
    it holds something back, plus a short count of successes for every subscription)."""

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self._clock = clock
        self._paces: dict[str, Pace] = {}

    def now_s(self) -> float:
        return self._clock()

    def turn(self, subscription_id: str) -> float:
        """0 when a request to this subscriber may go now (and counts it), else the seconds to
        wait before asking again."""
        pace = self._paces.get(subscription_id)
        if pace is None:
            return 0.0
        pace, wait_s = take_turn(pace, self._clock())
        self._paces[subscription_id] = pace
        return wait_s

    def paused(self, subscription_id: str) -> bool:
        pace = self._paces.get(subscription_id)
        return pace is not None and pace.paused(self._clock())

    def next_resume_in_s(self) -> float | None:
        """Seconds until the first pause of this process ends (``None``: nothing paused)."""
        now_s = self._clock()
        ends = [p.paused_until_s - now_s for p in self._paces.values() if p.paused(now_s)]
        return min(ends, default=None)

    def paused_subscriptions(self) -> list[str]:
        now_s = self._clock()
        stale = [s for s, pace in self._paces.items() if _forgettable(pace, now_s)]
        for subscription_id in stale:
            del self._paces[subscription_id]
        return [s for s, pace in self._paces.items() if pace.paused(now_s)]

    def throttled(self, subscription_id: str, *, sent_s: float, pause_s: float) -> None:
        pace = self._paces.get(subscription_id, Pace())
        self._paces[subscription_id] = throttled(
            pace, self._clock(), sent_s=sent_s, pause_s=pause_s
        )

    def succeeded(self, subscription_id: str) -> None:
        pace = self._paces.get(subscription_id)
        if pace is None:
            pace = Pace()
        now_s = self._clock()
        self._paces[subscription_id] = succeeded(pace, now_s)


def _forgettable(pace: Pace, now_s: float) -> bool:
    """Holds nothing back and its count of successes is too old to matter."""
    return pace.idle(now_s) and now_s - pace.window_start_s >= 2 * WINDOW_S
