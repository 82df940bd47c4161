"""Claims due deliveries from PostgreSQL: retries whose time has come, work the dispatcher had
no capacity for, and leases left behind by a crashed worker.

Why PostgreSQL and not TTL'd RabbitMQ retry queues: a waiting retry then holds nothing in the
broker or in a worker (no unacked message, no sleeping coroutine), it survives any restart with
the rest of the delivery's state, its time can be any value (``Retry-After``, jitter) rather
than one of a few queue tiers, and the on-call person can see and change it with SQL. RabbitMQ
3.10 has no delayed-message plugin, and per-message TTL only expires at the head of a queue.
"""

from __future__ import annotations

import asyncio

import asyncpg
import structlog

from delivery import metrics
from delivery.aio import wait_any
from delivery.db import is_connection_error, with_retries
from delivery.deliverer import Deliverer, Job
from delivery.envelope import envelope_from_row, render_body
from delivery.health import Health
from delivery.settings import Settings
from delivery.subscriptions import Subscription

log = structlog.get_logger("delivery.scheduler")

# Fair claim: saturated subscriptions are skipped before the scan, and no subscription gets
# more rows than it has free slots, so one subscriber's backlog never fills a claim that a
# healthy subscriber's due work should share. The scan is bounded; the lock is SKIP LOCKED.
_CLAIM = """
WITH candidates AS (
    SELECT id, next_attempt_at FROM (
        SELECT d.id, d.next_attempt_at,
               row_number() OVER (PARTITION BY d.subscription_id ORDER BY d.next_attempt_at) AS rn,
               coalesce(busy.free, $4::int) AS free
        FROM (
            SELECT id, subscription_id, next_attempt_at FROM delivery.deliveries
            WHERE state = 'pending'
              AND next_attempt_at <= clock_timestamp()
              AND (lease_until IS NULL OR lease_until < clock_timestamp())
              AND subscription_id <> ALL($2::text[])
            ORDER BY next_attempt_at
            LIMIT $1 * 4
        ) d
        LEFT JOIN unnest($5::text[], $6::int[]) AS busy(subscription_id, free)
            ON busy.subscription_id = d.subscription_id
    ) ranked
    WHERE rn <= free
), due AS (
    SELECT d.id FROM delivery.deliveries d
    WHERE d.id IN (SELECT id FROM candidates) AND d.state = 'pending'
      AND (d.lease_until IS NULL OR d.lease_until < clock_timestamp())
    ORDER BY d.next_attempt_at
    LIMIT $1
    FOR UPDATE SKIP LOCKED
), claimed AS (
    UPDATE delivery.deliveries d
    SET lease_until = clock_timestamp() + make_interval(secs => $3)
    FROM due WHERE d.id = due.id
    RETURNING d.id, d.event_id, d.subscription_id, d.attempts
)
SELECT c.id AS delivery_id, c.attempts,
       o.event_id, o.type, o.account_id, o.sequence, o.occurred_at, o.data::text AS data,
       o.traceparent, extract(epoch FROM o.created_at)::float8 AS created_at_s,
       s.id, s.url, s.event_patterns, s.account_id AS sub_account_id, s.state,
       s.disabled_reason, s.secret, s.previous_secret, s.previous_secret_expires_at,
       s.retry_schedule_s, s.created_at, s.updated_at
FROM claimed c
JOIN delivery.outbox o ON o.event_id = c.event_id
JOIN delivery.subscriptions s ON s.id = c.subscription_id
"""
# A subscription disabled while its delivery waited: keep the event as a dead letter.
PARK_DISABLED = """
UPDATE delivery.deliveries
SET state = 'dead', dead_at = clock_timestamp(), dead_reason = 'subscription disabled',
    lease_until = NULL
WHERE id = ANY($1::bigint[]) AND state = 'pending'
"""
_SATURATED_DUE = """
SELECT EXISTS (
    SELECT 1 FROM delivery.deliveries
    WHERE state = 'pending' AND next_attempt_at <= clock_timestamp()
      AND (lease_until IS NULL OR lease_until < clock_timestamp())
      AND subscription_id = ANY($1::text[])
)
"""
_UNLEASE = "UPDATE delivery.deliveries SET lease_until = NULL WHERE id = ANY($1::bigint[])"


def _subscription(row: asyncpg.Record) -> Subscription:
    fields = dict(row)
    fields["account_id"] = row["sub_account_id"]
    return Subscription.from_row(fields)


class Scheduler:
    def __init__(
        self, settings: Settings, pool: asyncpg.Pool, deliverer: Deliverer, health: Health
    ) -> None:
        self._settings = settings
        self._pool = pool
        self._deliverer = deliverer
        self._health = health
        self._wake = asyncio.Event()
        self._backlog = False
        deliverer.on_slot_freed = self._slot_freed
        health.register("scheduler")

    def note_backlog(self) -> None:
        """Due work was left in PostgreSQL (no capacity): claim it as soon as a slot frees."""
        self._backlog = True
        self._wake.set()

    def _slot_freed(self) -> None:
        if self._backlog:
            self._wake.set()

    async def run(self, stop: asyncio.Event) -> None:
        failures = 0
        while not stop.is_set():
            self._wake.clear()
            free = self._deliverer.free_slots()
            if free == 0:
                self._backlog = True
                await wait_any(stop, self._wake, timeout_s=self._settings.scheduler_poll_interval_s)
                continue
            try:
                claimed = await self.claim_once(free)
            except Exception as exc:
                if not is_connection_error(exc):
                    log.exception("scheduler_claim_failed")
                failures += 1
                self._health.set("scheduler", False)
                await wait_any(stop, timeout_s=min(0.1 * 2**failures, 5.0))
                continue
            failures = 0
            self._health.set("scheduler", True)
            # Rows came back, or due rows wait behind a saturated subscription: claim again as
            # soon as a slot frees. Otherwise nothing is due until the next poll.
            self._backlog = claimed > 0 or await self._saturated_have_due_work()
            if not self._backlog or self._deliverer.free_slots() == 0:
                await wait_any(stop, self._wake, timeout_s=self._settings.scheduler_poll_interval_s)

    async def _saturated_have_due_work(self) -> bool:
        saturated = self._deliverer.saturated_subscriptions()
        if not saturated:
            return False
        return bool(await self._pool.fetchval(_SATURATED_DUE, saturated))

    async def claim_once(self, limit: int) -> int:
        busy = self._deliverer.free_slots_by_subscription()
        rows = await with_retries(
            self._pool,
            lambda conn: conn.fetch(
                _CLAIM,
                limit,
                self._deliverer.saturated_subscriptions(),
                self._settings.delivery_lease_s,
                self._settings.per_subscription_max_in_flight,
                list(busy),
                list(busy.values()),
            ),
            deadline_s=10,
            what="claim_due",
        )
        if not rows:
            return 0
        metrics.DELIVERIES_CLAIMED.inc(len(rows))
        over_capacity = []
        disabled = []
        for row in rows:
            sub = _subscription(row)
            if sub.state != "active":
                disabled.append(row["delivery_id"])
                continue
            if not self._deliverer.try_reserve(sub.id):
                over_capacity.append(row["delivery_id"])
                continue
            self._deliverer.submit(
                Job(
                    delivery_id=row["delivery_id"],
                    event_id=row["event_id"],
                    subscription=sub,
                    body=render_body(envelope_from_row(row)),
                    attempt=row["attempts"] + 1,
                    created_at_s=row["created_at_s"],
                    traceparent=row["traceparent"],
                )
            )
        if over_capacity:
            await self._pool.execute(_UNLEASE, over_capacity)
        if disabled:
            await self._pool.execute(PARK_DISABLED, disabled)
        return len(rows)
