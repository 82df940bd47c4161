"""Group commit of attempt outcomes.

Every attempt's outcome must be durable before we count it done (a success recorded is never
POSTed again). Committing each one alone costs a transaction per delivery; instead, concurrent
attempts hand their outcomes to one flusher, which writes everything waiting in one transaction
and then wakes each waiter. Under load a commit carries dozens of outcomes; when idle, one.
"""

from __future__ import annotations

import asyncio
from collections import defaultdict
from dataclasses import dataclass, replace
from datetime import datetime, timedelta
from typing import Any

import asyncpg
import structlog

from delivery.ops import metrics
from delivery.settings import Settings
from delivery.store.dead_letters import park_pending
from delivery.store.pool import is_connection_error, with_retries
from delivery.store.states import CircuitState, DeliveryState
from delivery.text import safe_text
from delivery.worker.retry import Decision, Outcome
from delivery.worker.sender import AttemptResult

log = structlog.get_logger("delivery.outcomes")

_MAX_BATCH = 500

# The attempt rows and the deliveries' new state from one set of arrays, in one statement.
_OUTCOMES = """
v AS (
    SELECT * FROM unnest($1::bigint[], $2::int[], $3::timestamptz[], $4::float8[], $5::text[],
                         $6::int[], $7::text[], $8::text[], $9::text[], $10::float8[], $11::text[])
        AS v(id, attempt, started_at, duration_ms, outcome, status, error, excerpt, state,
             delay_s, reason)
),
attempts AS (
    INSERT INTO delivery.attempts
        (delivery_id, attempt, started_at, duration_ms, outcome, status, error, response_excerpt)
    SELECT id, attempt, started_at, duration_ms, outcome, status, error, excerpt FROM v
),
deliveries AS (
    UPDATE delivery.deliveries d
    SET state = v.state,
        attempts = v.attempt,
        next_attempt_at = CASE WHEN v.delay_s IS NULL THEN d.next_attempt_at
                               ELSE clock_timestamp() + make_interval(secs => v.delay_s) END,
        lease_until = NULL,
        first_attempt_at = coalesce(d.first_attempt_at, v.started_at),
        last_attempt_at = v.started_at,
        last_status = v.status,
        last_error = v.error,
        delivered_at = CASE WHEN v.state = 'delivered' THEN clock_timestamp()
                            ELSE d.delivered_at END,
        dead_at = CASE WHEN v.state = 'dead' THEN clock_timestamp() ELSE d.dead_at END,
        dead_reason = CASE WHEN v.state = 'dead' THEN v.reason ELSE d.dead_reason END
    FROM v
    WHERE d.id = v.id AND d.state = 'pending'
)"""
_RECORD = f"WITH {_OUTCOMES} SELECT"
# Circuit bookkeeping; each returns the state before the change, so transitions log once.
# NO KEY UPDATE: it does not conflict with the key-share lock that inserting a delivery row
# (foreign key to its subscription) takes, so dispatch and outcomes never deadlock. Locked in id
# order, so concurrent batches never deadlock on each other. A success on a healthy subscription
# (the common case) locks nothing.
_RESET_CIRCUITS = """
UPDATE delivery.subscriptions s
SET consecutive_failures = 0, circuit_state = 'closed', circuit_retry_at = NULL,
    failing_since = NULL
FROM (
    SELECT id, circuit_state AS old_state FROM delivery.subscriptions
    WHERE id = ANY({ids}::text[]) AND (consecutive_failures <> 0 OR circuit_state <> 'closed')
    ORDER BY id
    FOR NO KEY UPDATE
) o
WHERE s.id = o.id
RETURNING s.id, o.old_state, s.circuit_state AS new_state, false AS too_long
"""
_CIRCUIT_SUCCESS = _RESET_CIRCUITS.format(ids="$1")
# When every outcome is a success (the common case), the outcomes plus the circuit reset of
# their subscriptions: a statement on its own, without BEGIN and COMMIT round trips.
_RECORD_ALL_DELIVERED = f"""
WITH {_OUTCOMES},
circuits AS ({_RESET_CIRCUITS.format(ids="$12")})
SELECT id, old_state, new_state FROM circuits
"""
_CIRCUIT_FAILURES = """
UPDATE delivery.subscriptions s
SET consecutive_failures = s.consecutive_failures + $5,
    failing_since = coalesce(s.failing_since, clock_timestamp()),
    circuit_state = CASE WHEN s.consecutive_failures + $5 >= $2 THEN 'open'
                         ELSE s.circuit_state END,
    circuit_retry_at = CASE WHEN s.consecutive_failures + $5 >= $2
                            THEN clock_timestamp() + make_interval(secs => $3)
                            ELSE s.circuit_retry_at END
FROM (
    SELECT id, circuit_state AS old_state FROM delivery.subscriptions WHERE id = $1
    FOR NO KEY UPDATE
) o
WHERE s.id = o.id
RETURNING o.old_state, s.circuit_state AS new_state,
    s.state = 'active'
    AND s.failing_since < clock_timestamp() - make_interval(secs => $4) AS too_long
"""
# A 429's Retry-After holds back the whole subscription, in every worker (never shortened).
# It counts from the answer ($2: when it came, plus the pause), not from this commit, so a
# slow commit does not lengthen it; never past the pause ($3) from now, whatever the clocks say.
_PAUSE = """
UPDATE delivery.subscriptions
SET paced_until = greatest(
    paced_until, least($2::timestamptz, clock_timestamp() + make_interval(secs => $3))
)
WHERE id = $1
"""
_DISABLE_SUBSCRIPTION = """
UPDATE delivery.subscriptions
SET state = 'disabled', disabled_reason = $2, updated_at = now()
WHERE id = $1 AND state IN ('active', 'paused')
RETURNING true
"""

_STATE = {
    Outcome.DELIVERED: DeliveryState.DELIVERED,
    Outcome.RETRY: DeliveryState.PENDING,
    Outcome.EXHAUSTED: DeliveryState.DEAD,
    Outcome.PERMANENT: DeliveryState.DEAD,
    Outcome.GONE: DeliveryState.DEAD,
}


@dataclass(frozen=True, slots=True)
class AttemptOutcome:
    """One attempt's outcome, ready to write."""

    delivery_id: int
    subscription_id: str
    attempt: int
    started_at: datetime
    result: AttemptResult
    decision: Decision


class OutcomeRecorder:
    def __init__(self, settings: Settings, pool: asyncpg.Pool) -> None:
        self._settings = settings
        self._pool = pool
        self._waiting: list[tuple[AttemptOutcome, asyncio.Future[None]]] = []
        self._wake = asyncio.Event()
        self._flushing = False

    async def record(self, item: AttemptOutcome) -> None:
        """Return once ``item`` is committed (raise if it could not be)."""
        future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._waiting.append((item, future))
        if not self._flushing:
            self._flushing = True
            try:
                while self._waiting:
                    batch, self._waiting = self._waiting[:_MAX_BATCH], self._waiting[_MAX_BATCH:]
                    await self._flush(batch)
            finally:
                self._flushing = False
        await future

    async def _flush(self, batch: list[tuple[AttemptOutcome, asyncio.Future[None]]]) -> None:
        try:
            await self._commit([item for item, _f in batch])
        except BaseException as exc:
            if isinstance(exc, Exception) and len(batch) > 1 and not is_connection_error(exc):
                # One bad row must not fail its neighbours (a healthy subscriber's success
                # handed back and POSTed again, a 410 not disabling): each on its own.
                log.warning("outcome_batch_failed", outcomes=len(batch), error=repr(exc)[:200])
                for item, future in batch:
                    await self._flush([(item, future)])
                return
            for _item, future in batch:
                if not future.done():
                    future.set_exception(exc if isinstance(exc, Exception) else RuntimeError(exc))
            if not isinstance(exc, Exception):
                raise
            return
        for _item, future in batch:
            if not future.done():
                future.set_result(None)

    async def _commit(self, items: list[AttemptOutcome]) -> None:
        """Write ``items`` in one commit; one that PostgreSQL refuses for its values alone (a
        data error) is written again without its excerpt and error text."""
        try:
            await self._write_batch(items)
        except asyncpg.DataError as exc:
            if len(items) > 1:
                raise
            (item,) = items
            log.warning("outcome_degraded", delivery_id=item.delivery_id, error=repr(exc)[:200])
            await self._write_batch([_degraded(item, exc)])
            metrics.OUTCOMES_DEGRADED.inc()

    async def _write_batch(self, items: list[AttemptOutcome]) -> None:
        all_delivered = all(i.decision.outcome is Outcome.DELIVERED for i in items)
        # All successes: one statement on its own; otherwise a transaction with the circuits.
        write = self._write_delivered if all_delivered else self._write
        await with_retries(
            self._pool,
            lambda conn: write(conn, items),
            what="outcomes",
            transaction=not all_delivered,
        )

    @staticmethod
    def _outcome_arrays(items: list[AttemptOutcome]) -> list[list[Any]]:
        return [
            [i.delivery_id for i in items],
            [i.attempt for i in items],
            [i.started_at for i in items],
            [i.result.duration_s * 1000 for i in items],
            [i.decision.outcome.value for i in items],
            [i.result.status for i in items],
            [i.result.error for i in items],
            [i.result.excerpt for i in items],
            [_STATE[i.decision.outcome] for i in items],
            [i.decision.delay_s for i in items],
            [i.decision.reason for i in items],
        ]

    async def _write_delivered(self, conn: asyncpg.Connection, items: list[AttemptOutcome]) -> None:
        subscription_ids = sorted({i.subscription_id for i in items})
        rows = await conn.fetch(
            _RECORD_ALL_DELIVERED, *self._outcome_arrays(items), subscription_ids
        )
        for row in rows:
            _note_transition(row["id"], row["old_state"], row["new_state"])

    async def _write(self, conn: asyncpg.Connection, items: list[AttemptOutcome]) -> None:
        await conn.execute(_RECORD, *self._outcome_arrays(items))
        await self._track_circuits(conn, items)

    async def _track_circuits(self, conn: asyncpg.Connection, items: list[AttemptOutcome]) -> None:
        """Per subscription, in id order (concurrent batches lock subscriptions in the same
        order): a success resets the count, the failures after the last success add to it.
        A 429 is no failure (the subscriber is up and asks to slow down): it pauses instead."""
        by_subscription: dict[str, list[Outcome]] = defaultdict(list)
        pauses: dict[str, tuple[datetime, float]] = {}
        for item in items:
            outcomes = by_subscription[item.subscription_id]
            pause_s = item.decision.pause_s
            if pause_s is None:
                outcomes.append(item.decision.outcome)
            elif pause_s > 0:
                until = item.started_at + timedelta(seconds=item.result.duration_s + pause_s)
                held = pauses.get(item.subscription_id, (until, pause_s))
                pauses[item.subscription_id] = max(held, (until, pause_s))
        for sub_id in sorted(by_subscription):
            if sub_id in pauses:
                await conn.execute(_PAUSE, sub_id, *pauses[sub_id])
            outcomes = by_subscription[sub_id]
            if Outcome.GONE in outcomes:
                await self._disable(conn, sub_id, "HTTP 410 Gone: subscription disabled", "gone")
                continue
            rows = []
            if Outcome.DELIVERED in outcomes:
                rows.append(await conn.fetchrow(_CIRCUIT_SUCCESS, [sub_id]))
                last = len(outcomes) - 1 - outcomes[::-1].index(Outcome.DELIVERED)
                outcomes = outcomes[last + 1 :]
            failures = sum(o in (Outcome.RETRY, Outcome.EXHAUSTED) for o in outcomes)
            if failures:
                rows.append(
                    await conn.fetchrow(
                        _CIRCUIT_FAILURES,
                        sub_id,
                        self._settings.circuit_failure_threshold,
                        self._settings.circuit_cooldown_s,
                        self._settings.auto_disable_after_s,
                        failures,
                    )
                )
            for row in rows:
                if row is None:
                    continue
                _note_transition(sub_id, row["old_state"], row["new_state"])
                if row["too_long"]:
                    limit_s = self._settings.auto_disable_after_s
                    await self._disable(
                        conn, sub_id, f"failing for over {limit_s:.0f}s: auto-disabled", "failing"
                    )

    async def _disable(
        self, conn: asyncpg.Connection, subscription_id: str, reason: str, kind: str
    ) -> None:
        if await conn.fetchval(_DISABLE_SUBSCRIPTION, subscription_id, reason):
            metrics.SUBSCRIPTIONS_DISABLED.labels(kind).inc()
            log.warning("subscription_disabled", subscription_id=subscription_id, reason=reason)
        # Its waiting deliveries are kept as dead letters (replayed once it is enabled again).
        await park_pending(conn, subscription_id, reason)


def _degraded(item: AttemptOutcome, exc: Exception) -> AttemptOutcome:
    """``item`` as PostgreSQL will take it: no excerpt, the error replaced by why."""
    note = safe_text(f"outcome not storable as it was ({type(exc).__name__})", limit_chars=200)
    result = replace(item.result, excerpt=None, error=note)
    decision = item.decision
    if decision.reason is not None:
        decision = replace(decision, reason=note)
    return replace(item, result=result, decision=decision)


def _note_transition(subscription_id: str, old_state: str, new_state: str) -> None:
    if old_state != new_state:
        metrics.CIRCUIT_TRANSITIONS.labels(new_state).inc()
        log.warning(
            "circuit_opened" if new_state == CircuitState.OPEN else "circuit_closed",
            subscription_id=subscription_id,
        )
