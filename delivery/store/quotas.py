"""A tenant's ingest rate (``tenants.max_events_per_s``; NULL is unlimited), shared by every API
process: GCRA on ``delivery.tenant_rates`` (migration 0014).

GCRA keeps one timestamp per tenant, the *theoretical arrival time* (TAT): when the tenant's
budget would be whole again. An event costs ``1 / rate`` seconds; a request of N events is
allowed when, after adding N costs to ``max(TAT, now)``, the TAT is at most one second ahead of
now (the burst: one second's worth of events). A request over the limit consumes nothing.

The decision is one atomic ``INSERT ... ON CONFLICT DO UPDATE ... WHERE ... RETURNING`` on the
database's clock (``statement_timestamp()``): the row lock of ``ON CONFLICT`` serialises
concurrent requests, whichever process sends them, and no process clock is involved. The rule
itself is ``step`` below (pure, tested without a clock); the SQL applies the same arithmetic.

The numbers returned are for the API's answer: ``Retry-After`` and the RateLimit header fields
of draft-ietf-httpapi-ratelimit-headers-07 (``RateLimit-Limit``, ``RateLimit-Remaining``,
``RateLimit-Reset``, all whole numbers; the last draft with the three separate fields).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import asyncpg

from delivery.errors import InputError, NotFoundError, QuotaExceededError
from delivery.ops import metrics

# The burst, in seconds of the rate: a tenant may send one second's worth of events at once.
BURST_S = 1.0

# $1 tenant, $2 events. `ahead_s`: how far the TAT is ahead of now after this request
# (NULL: not allowed); `current_ahead_s`: the TAT as this statement's snapshot saw it (for a
# refusal's Retry-After: a concurrent request may have moved it further since, so a refused
# caller may be told a little too early, never too late).
_TAKE = """
WITH t AS (SELECT max_events_per_s AS rate FROM delivery.tenants WHERE id = $1),
taken AS (
    INSERT INTO delivery.tenant_rates AS r (tenant_id, tat)
    SELECT $1, statement_timestamp() + make_interval(secs => $2::int / t.rate::float8)
    FROM t
    WHERE t.rate IS NOT NULL AND $2::int / t.rate::float8 <= $3::float8
    ON CONFLICT (tenant_id) DO UPDATE
    SET tat = greatest(r.tat, statement_timestamp()) + (excluded.tat - statement_timestamp())
    WHERE greatest(r.tat, statement_timestamp()) + (excluded.tat - statement_timestamp())
          <= statement_timestamp() + make_interval(secs => $3::float8)
    RETURNING r.tat
)
SELECT EXISTS (SELECT 1 FROM t) AS tenant_exists,
       (SELECT rate FROM t) AS rate,
       extract(epoch FROM (SELECT tat FROM taken) - statement_timestamp())::float8 AS ahead_s,
       extract(epoch FROM (SELECT tat FROM delivery.tenant_rates WHERE tenant_id = $1)
                          - statement_timestamp())::float8 AS current_ahead_s
"""


@dataclass(frozen=True, slots=True)
class RateDecision:
    """One request's answer. ``limit_per_s`` is None for an unlimited tenant (then every other
    number is meaningless and the API sends no RateLimit fields)."""

    allowed: bool
    limit_per_s: int | None
    remaining: int  # events that could still be sent at once, after this request
    reset_s: float  # until the whole burst is available again
    retry_after_s: float | None  # when refused: wait this long; None: never fits (split it)

    def headers(self) -> dict[str, str]:
        """The HTTP answer's fields (draft-ietf-httpapi-ratelimit-headers-07), plus
        ``Retry-After`` on a refusal that waiting can cure; whole seconds, rounded up."""
        if self.limit_per_s is None:
            return {}
        out = {
            "RateLimit-Limit": str(burst_events(self.limit_per_s)),
            "RateLimit-Remaining": str(self.remaining),
            "RateLimit-Reset": str(math.ceil(self.reset_s)),
        }
        if not self.allowed and self.retry_after_s is not None:
            out["Retry-After"] = str(max(1, math.ceil(self.retry_after_s)))
        return out


UNLIMITED = RateDecision(
    allowed=True, limit_per_s=None, remaining=0, reset_s=0.0, retry_after_s=None
)


def burst_events(limit_per_s: int) -> int:
    """The most events a request may carry (and the most sent at once): one second's worth."""
    return max(1, math.floor(limit_per_s * BURST_S))


def step(ahead_s: float, limit_per_s: int, events: int) -> float | None:
    """The GCRA rule: with the TAT ``ahead_s`` seconds ahead of now (negative: in the past),
    the new ``ahead_s`` after ``events`` more, or None when they do not fit (nothing taken)."""
    after_s = max(ahead_s, 0.0) + events / limit_per_s
    return after_s if after_s <= BURST_S else None


def decision(
    limit_per_s: int, events: int, ahead_s: float | None, current_ahead_s: float | None
) -> RateDecision:
    """The answer from what the statement returned: ``ahead_s`` after an allowed request (None:
    refused), ``current_ahead_s`` the TAT as it stood (None: the tenant never sent)."""
    if ahead_s is not None:
        return RateDecision(
            allowed=True,
            limit_per_s=limit_per_s,
            remaining=_remaining(limit_per_s, ahead_s),
            reset_s=max(ahead_s, 0.0),
            retry_after_s=None,
        )
    before_s = max(current_ahead_s or 0.0, 0.0)
    cost_s = events / limit_per_s
    fits_ever = cost_s <= BURST_S
    return RateDecision(
        allowed=False,
        limit_per_s=limit_per_s,
        remaining=_remaining(limit_per_s, before_s),
        reset_s=before_s,
        # The TAT must fall back until this request's cost fits under the burst.
        retry_after_s=max(before_s + cost_s - BURST_S, 0.0) if fits_ever else None,
    )


def _remaining(limit_per_s: int, ahead_s: float) -> int:
    # A microsecond of slack: the TAT is stored to the microsecond.
    free_s = BURST_S - max(ahead_s, 0.0) + 1e-6
    return max(0, min(burst_events(limit_per_s), math.floor(free_s * limit_per_s)))


async def take(conn: asyncpg.Connection, tenant_id: str, events: int) -> RateDecision:
    """Take ``events`` from the tenant's rate: allowed (and counted against every process's
    later requests) or refused (nothing taken). ``NotFoundError`` for an unknown tenant.
    Run it outside the publishing transaction, so the row lock is held only for this
    statement (inside, a refusal is still correct, but every request of the tenant waits
    for that transaction to end)."""
    if events < 1:
        raise InputError("events: a request carries at least one event")
    row = await conn.fetchrow(_TAKE, tenant_id, events, BURST_S)
    assert row is not None  # a SELECT without FROM: one row
    if not row["tenant_exists"]:
        raise NotFoundError(f"tenant {tenant_id!r} does not exist")
    if row["rate"] is None:
        return UNLIMITED
    answer = decision(row["rate"], events, row["ahead_s"], row["current_ahead_s"])
    if not answer.allowed:
        outcome = "over_rate" if answer.retry_after_s is not None else "over_burst"
        metrics.INGEST_REJECTED.labels(outcome).inc(events)
    return answer


def refuse(answer: RateDecision) -> None:
    """``QuotaExceededError`` for a refused request (``retry_after_s``: when it would fit; None
    when it never would), for callers that answer with an error rather than the numbers."""
    if answer.allowed:
        return
    if answer.retry_after_s is None:
        raise QuotaExceededError(
            f"events: more than {burst_events(answer.limit_per_s or 1):,} in one request never"
            " fit the tenant's rate; split it"
        )
    raise QuotaExceededError(
        f"over the tenant's rate of {answer.limit_per_s:,} events/s;"
        f" retry in {answer.retry_after_s:.2f}s",
        retry_after_s=answer.retry_after_s,
    )
