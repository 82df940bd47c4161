"""Subscribers that answer 429: for the pacing tests and the throttling bench.

Each is an aiohttp handler (``scripted_subscriber(sub.answer)`` serves it) that counts every
attempt per ``webhook-id``.
"""

from __future__ import annotations

import time
from collections import Counter

from aiohttp import web

__all__ = ["FirstAttemptRefuser", "RateLimitedSubscriber"]


class FirstAttemptRefuser:
    """Answers the first attempt of each event 429 + ``Retry-After``, every later one 200."""

    def __init__(self, retry_after_s: int) -> None:
        self.retry_after_s = retry_after_s
        self.attempts: Counter[str] = Counter()
        self.delivered: set[str] = set()
        self.refused = 0
        self.answers: list[tuple[float, int]] = []  # (monotonic time, status) of each attempt

    async def answer(self, request: web.Request) -> web.Response:
        await request.read()
        webhook_id = request.headers.get("webhook-id", "")
        self.attempts[webhook_id] += 1
        first = self.attempts[webhook_id] == 1
        self.answers.append((time.monotonic(), 429 if first else 200))
        if first:
            self.refused += 1
            return web.Response(status=429, headers={"retry-after": str(self.retry_after_s)})
        self.delivered.add(webhook_id)
        return web.Response(text="ok")


class RateLimitedSubscriber:
    """Allows ``rate_per_s`` requests a second, from a token bucket that holds one second's
    worth, and answers 429 + ``Retry-After: 1`` beyond that, as an API gateway does."""

    def __init__(self, rate_per_s: float) -> None:
        self.rate_per_s = rate_per_s
        self._tokens = rate_per_s
        self._updated_s = time.monotonic()
        self.attempts: Counter[str] = Counter()
        self.delivered: set[str] = set()
        self.refused = 0
        self.first_accepted_s: float | None = None
        self.last_accepted_s: float | None = None
        self.answers: list[tuple[float, int]] = []  # (monotonic time, status) of each attempt

    async def answer(self, request: web.Request) -> web.Response:
        await request.read()
        webhook_id = request.headers.get("webhook-id", "")
        self.attempts[webhook_id] += 1
        now_s = time.monotonic()
        refill = (now_s - self._updated_s) * self.rate_per_s
        self._tokens = min(self.rate_per_s, self._tokens + refill)
        self._updated_s = now_s
        if self._tokens < 1:
            self.answers.append((now_s, 429))
            self.refused += 1
            return web.Response(status=429, headers={"retry-after": "1"})
        self._tokens -= 1
        self.answers.append((now_s, 200))
        self.delivered.add(webhook_id)
        if self.first_accepted_s is None:
            self.first_accepted_s = now_s
        self.last_accepted_s = now_s
        return web.Response(text="ok")
