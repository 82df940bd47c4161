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

from delivery.aio import backoff_s, wait_any
from delivery.events import envelope_from_row, render_body
from delivery.ops import metrics
from delivery.ops.health import Health
from delivery.settings import Settings
from delivery.store.dead_letters import park
from delivery.store.pool import is_connection_error, with_retries
from delivery.store.states import SubscriptionState
from delivery.store.status import BLOCKED_ACCOUNTS
from delivery.store.subscriptions import Subscription, select_list
from delivery.worker.deliverer import Deliverer
from delivery.worker.jobs import Job, lease_per_timeout

log = structlog.get_logger("delivery.scheduler")

# Fair claim, subscription by subscription: each one's due rows come from index range scans
# that stop at its free slots (an open circuit whose cool-down is over gets one probe), and
# saturated, cooling or paused (429) subscriptions are not scanned at all, so one subscriber's
# backlog never costs a claim anything nor fills it. A subscription's due retries come before
# its first attempts (their own index): a probe, or the first request after a pause, is then a
# retry, which may well succeed, rather than a fresh event a throttling subscriber refuses
# again. An operator's paused subscription is not scanned either: its deliveries wait for its
# resume. The lock is SKIP LOCKED.
_CLAIM = f"""
WITH subs AS (
    SELECT s.id,
           CASE WHEN s.circuit_state = 'open' THEN 1 ELSE coalesce(busy.free, $4::int) END AS free
    FROM delivery.subscriptions s
    LEFT JOIN unnest($5::text[], $6::int[]) AS busy(subscription_id, free)
        ON busy.subscription_id = s.id
    WHERE s.id <> ALL($2::text[]) AND s.state <> 'paused'
      AND NOT (s.circuit_state = 'open' AND s.circuit_retry_at > clock_timestamp())
      AND (s.paced_until IS NULL OR s.paced_until <= clock_timestamp())
), candidates AS (
    SELECT d.id
    FROM subs CROSS JOIN LATERAL (
        SELECT id FROM (
            (SELECT id, next_attempt_at, true AS retry FROM delivery.deliveries
             WHERE subscription_id = subs.id AND state = 'pending' AND attempts > 0
               AND next_attempt_at <= clock_timestamp()
               AND (lease_until IS NULL OR lease_until < clock_timestamp())
             ORDER BY next_attempt_at LIMIT subs.free)
            UNION
            (SELECT id, next_attempt_at, attempts > 0 FROM delivery.deliveries
        WHERE subscription_id = subs.id AND state = 'pending'
          AND next_attempt_at <= clock_timestamp()
          AND (lease_until IS NULL OR lease_until < clock_timestamp())
        ORDER BY next_attempt_at
        LIMIT subs.free)
        ) u
        ORDER BY retry DESC, next_attempt_at
        LIMIT subs.free
    ) d
    WHERE subs.free > 0
), due AS (
    SELECT d.id FROM delivery.deliveries d
    WHERE d.id IN (SELECT id FROM candidates) AND d.state = 'pending'
      AND (d.lease_until IS NULL OR d.lease_until < clock_timestamp())
    ORDER BY d.attempts = 0, d.next_attempt_at
    LIMIT $1
    FOR UPDATE SKIP LOCKED
), claimed AS (
    UPDATE delivery.deliveries d
    SET lease_until = clock_timestamp() + make_interval(
        secs => greatest($3, coalesce(s.timeout_s, $7) * $8)
    )
    FROM due, delivery.subscriptions s
    WHERE d.id = due.id AND s.id = d.subscription_id
    RETURNING d.id, d.event_id, d.subscription_id, d.attempts
)
SELECT c.id AS delivery_id, c.attempts,
       o.event_id, o.type, o.account_id, o.sequence, o.occurred_at, o.data::text AS data,
       o.traceparent, extract(epoch FROM o.created_at)::float8 AS created_at_s,
       {select_list("s", "sub_")}
FROM claimed c
JOIN delivery.outbox o ON o.event_id = c.event_id
JOIN delivery.subscriptions s ON s.id = c.subscription_id
"""
_SATURATED_DUE = """
SELECT EXISTS (
    SELECT 1 FROM delivery.deliveries
    WHERE state = 'pending' AND next_attempt_at <= clock_timestamp()
      AND (lease_until IS NULL OR lease_until < clock_timestamp())
      AND subscription_id = ANY($1::text[])
)
"""
# Only one worker may probe an open circuit per cooldown: whoever moves the retry time wins.
_TAKE_PROBES = """
UPDATE delivery.subscriptions
SET circuit_retry_at = clock_timestamp() + make_interval(secs => $2)
WHERE id = ANY($1::text[]) AND circuit_state = 'open' AND circuit_retry_at <= clock_timestamp()
RETURNING id
"""
_GAUGES = f"""
SELECT
    (SELECT count(*) FROM delivery.subscriptions WHERE state = 'active') AS active,
    (SELECT count(*) FROM delivery.subscriptions WHERE state = 'disabled') AS disabled,
    (SELECT count(*) FROM delivery.subscriptions WHERE state = 'paused') AS paused,
    (SELECT count(*) FROM delivery.subscriptions WHERE circuit_state = 'open') AS circuits_open,
    (SELECT count(*) FROM delivery.subscriptions WHERE paced_until > clock_timestamp()) AS paced,
    (SELECT count(*) FROM delivery.deliveries WHERE state = 'pending' AND attempts = 0) AS fresh,
    (SELECT count(*) FROM delivery.deliveries WHERE state = 'pending' AND attempts > 0) AS retrying,
    ({BLOCKED_ACCOUNTS}) AS blocked_accounts
"""
# Claims read a subscription's due rows in index order and stop at its free slots. With stale
# statistics (a backlog that grew faster than autovacuum's analyze) the planner can take a
# bitmap scan of the subscription's every pending row and sort them instead: 95 ms per claim
# at 600 k pending rows, 5.5 ms in index order (measured side by side). Claims never want it.
_INDEX_ORDER = "SET LOCAL enable_bitmapscan = off"
_GAUGES_EVERY_S = 5.0
# Woken by a freed slot, wait this long for more to free up, so one claim carries several
# rows: a subscriber's local queue keeps its request slots busy meanwhile (a profile of a
# flat-out run had 19 % of the worker in claims at 2 ms).
_COALESCE_S = 0.01
# PostgreSQL's clock may be a little behind this process's.
_PAUSE_END_MARGIN_S = 0.05
_UNLEASE = "UPDATE delivery.deliveries SET lease_until = NULL WHERE id = ANY($1::bigint[])"


class Scheduler:
    def __init__(
        self, settings: Settings, pool: asyncpg.Pool, deliverer: Deliverer, health: Health
    ) -> None:
        self._settings = settings
        self._pool = pool
        self._deliverer = deliverer
        self._capacity = deliverer.capacity
        self._pacer = deliverer.pacer
        self._health = health
        self._wake = asyncio.Event()
        self._backlog = False
        health.register("scheduler")

    def note_backlog(self) -> None:
        """Due work was left in PostgreSQL (no capacity): claim it as soon as a slot frees."""
        self._set_backlog(True)
        self._wake.set()

    def _set_backlog(self, backlog: bool) -> None:
        # A slot freed while there was a backlog wakes the claim loop (kept as a wake-up when
        # the backlog ends meanwhile); one freed without a backlog does not.
        if self._backlog and self._capacity.freed.is_set():
            self._wake.set()
        self._capacity.freed.clear()
        self._backlog = backlog

    def _woken(self) -> bool:
        return self._wake.is_set() or (self._backlog and self._capacity.freed.is_set())

    async def _wait(self, stop: asyncio.Event) -> None:
        """Until the next poll, a backlog's freed slot, new backlog, or the end of a pause
        this process saw begin (a 429's Retry-After): its subscriber's work is due then."""
        wakes = (self._wake, self._capacity.freed) if self._backlog else (self._wake,)
        timeout_s = self._settings.scheduler_poll_interval_s
        resume_in_s = self._pacer.next_resume_in_s()
        if resume_in_s is not None:
            timeout_s = min(timeout_s, resume_in_s + _PAUSE_END_MARGIN_S)
        await wait_any(stop, *wakes, timeout_s=timeout_s)

    async def run(self, stop: asyncio.Event) -> None:
        async with asyncio.TaskGroup() as tg:
            gauges = tg.create_task(self._refresh_gauges(stop))
            await self._claim_loop(stop)
            gauges.cancel()

    async def _refresh_gauges(self, stop: asyncio.Event) -> None:
        """Cluster-wide gauges (the same in every worker): cheap counts every few seconds."""
        while not stop.is_set():
            try:
                row = await self._pool.fetchrow(_GAUGES)
            except Exception as exc:
                log.debug("gauges_failed", error=repr(exc)[:200])
            else:
                assert row is not None
                metrics.SUBSCRIPTIONS.labels("active").set(row["active"])
                metrics.SUBSCRIPTIONS.labels("disabled").set(row["disabled"])
                metrics.SUBSCRIPTIONS.labels("paused").set(row["paused"])
                metrics.CIRCUITS_OPEN.set(row["circuits_open"])
                metrics.SUBSCRIPTIONS_PACED.set(row["paced"])
                metrics.ORDERED_BLOCKED_ACCOUNTS.set(row["blocked_accounts"])
                metrics.DELIVERIES_PENDING.labels("first_attempt").set(row["fresh"])
                metrics.DELIVERIES_PENDING.labels("retrying").set(row["retrying"])
            await wait_any(stop, timeout_s=_GAUGES_EVERY_S)

    async def _claim_loop(self, stop: asyncio.Event) -> None:
        failures = 0
        while not stop.is_set():
            self._wake.clear()
            self._capacity.freed.clear()
            free = self._capacity.free_slots()
            if free == 0:
                self._set_backlog(True)
                await self._wait(stop)
                continue
            try:
                claimed = await self.claim_once(free)
                # Rows came back, or due rows wait behind a saturated subscription: claim again
                # as soon as a slot frees. Otherwise nothing is due until the next poll.
                backlog = claimed > 0 or await self._saturated_have_due_work()
            except Exception as exc:
                if not is_connection_error(exc):
                    log.exception("scheduler_claim_failed")
                failures += 1
                self._health.set("scheduler", False)
                await wait_any(stop, timeout_s=backoff_s(failures))
                continue
            failures = 0
            self._health.set("scheduler", True)
            # A claim that did not fill the free slots took everything due that had room:
            # claiming again at once would find nothing new.
            self._set_backlog(backlog)
            if claimed < free or self._capacity.free_slots() == 0:
                await self._wait(stop)
                if self._backlog and self._woken():
                    # Woken by a freed slot: let a few more free up, so one claim carries
                    # several rows instead of one claim per finished attempt.
                    await asyncio.sleep(_COALESCE_S)

    async def _take_probes(self, open_subscriptions: list[str]) -> set[str]:
        if not open_subscriptions:
            return set()
        rows = await self._pool.fetch(
            _TAKE_PROBES, open_subscriptions, self._settings.circuit_cooldown_s
        )
        for row in rows:
            log.info("circuit_probe", subscription_id=row["id"])
        return {r["id"] for r in rows}

    async def _saturated_have_due_work(self) -> bool:
        saturated = self._capacity.saturated_subscriptions()
        if not saturated:
            return False

        async def due(conn: asyncpg.Connection) -> bool:
            await conn.execute(_INDEX_ORDER)
            return bool(await conn.fetchval(_SATURATED_DUE, saturated))

        return await with_retries(self._pool, due, deadline_s=10, what="saturated_due")

    async def claim_once(self, limit: int) -> int:
        free_by_subscription = self._capacity.free_slots_by_subscription()
        # Not scanned: subscribers with no room here, and those this process saw pause (a 429)
        # before the pause reached PostgreSQL.
        skipped = self._capacity.saturated_subscriptions() + self._pacer.paused_subscriptions()

        async def claim(conn: asyncpg.Connection) -> list[asyncpg.Record]:
            await conn.execute(_INDEX_ORDER)
            rows: list[asyncpg.Record] = await conn.fetch(
                _CLAIM,
                limit,
                skipped,
                self._settings.delivery_lease_s,
                self._capacity.subscription_cap,
                list(free_by_subscription),
                list(free_by_subscription.values()),
                self._settings.http_timeout_s,
                lease_per_timeout(self._settings),
            )
            return rows

        rows = await with_retries(self._pool, claim, deadline_s=10, what="claim_due")
        if not rows:
            return 0
        metrics.DELIVERIES_CLAIMED.inc(len(rows))
        over_capacity = []
        disabled = []
        # One Subscription per subscription, not per row: a claim is mostly one subscriber's.
        built: dict[str, Subscription] = {}
        subs = []
        for row in rows:
            sub = built.get(row["sub_id"])
            if sub is None:
                sub = built[row["sub_id"]] = Subscription.from_row(
                    row, prefix="sub_", box=self._deliverer.box
                )
            subs.append(sub)
        probes = await self._take_probes([s.id for s in subs if s.circuit_open])
        with self._capacity.reservations() as held:
            for row, sub in zip(rows, subs, strict=True):
                if sub.state == SubscriptionState.PAUSED:
                    # Paused since the claim's scan (not parked: it goes out on resume).
                    over_capacity.append(row["delivery_id"])
                    continue
                if sub.state != SubscriptionState.ACTIVE:
                    disabled.append(row["delivery_id"])
                    continue
                if sub.circuit_open and sub.id not in probes:
                    over_capacity.append(row["delivery_id"])
                    continue
                reservation = held.reserve(sub.id)
                if reservation is None:
                    over_capacity.append(row["delivery_id"])
                    continue
                job = Job(
                    delivery_id=row["delivery_id"],
                    event_id=row["event_id"],
                    subscription=sub,
                    body=render_body(envelope_from_row(row)),
                    attempt=row["attempts"] + 1,
                    created_at_s=row["created_at_s"],
                    traceparent=row["traceparent"],
                )
                self._deliverer.submit(job, held.hand_over(reservation))
        if over_capacity:
            await self._pool.execute(_UNLEASE, over_capacity)
        if disabled:
            # A subscription disabled while its delivery waited: keep it as a dead letter.
            await park(self._pool, disabled, "subscription disabled")
        return len(rows)
