"""Runs webhook attempts with bounded concurrency and records each outcome durably.

A job arrives with its :class:`~delivery.worker.capacity.Reservation` and owns it from then on:
the subscriber's share and request slot are given back when the POST returns, the process
share when the outcome is committed (or the delivery handed back). What surrounds an attempt
(metrics, the trace span, the log line) is a hook (``delivery.worker.hooks``).
"""

from __future__ import annotations

import asyncio
import random
import time
from collections.abc import Sequence
from datetime import UTC, datetime

import asyncpg
import structlog

from delivery.ops import metrics
from delivery.secrets import NO_KEYS, SecretBox
from delivery.settings import Settings
from delivery.signing import webhook_headers
from delivery.store.pool import with_retries
from delivery.store.states import DeliveryState
from delivery.text import safe_text
from delivery.worker.capacity import Capacity, Reservation
from delivery.worker.hooks import Attempt, AttemptHook, Hooks, default_hooks
from delivery.worker.jobs import Job, lease_for
from delivery.worker.outcomes import AttemptOutcome, OutcomeRecorder
from delivery.worker.pacing import Pacer
from delivery.worker.retry import Outcome, RetryPolicy, decide
from delivery.worker.sender import Sender, failed_attempt

log = structlog.get_logger("delivery.deliverer")

_HAND_BACK = "UPDATE delivery.deliveries SET lease_until = NULL WHERE id = $1 AND state = 'pending'"
# A delivery whose attempt crashed, or whose outcome could not be written, is given back and
# counted; after MAX_UNRECORDED_HANDBACKS it goes to the dead letters with the reason instead
# of being POSTed again and again (a reply nobody foresaw once made 2,963 POSTs a minute).
MAX_UNRECORDED_HANDBACKS = 3
_HAND_BACK_UNRECORDED = """
UPDATE delivery.deliveries
SET lease_until = NULL,
    unrecorded_handbacks = unrecorded_handbacks + 1,
    state = CASE WHEN unrecorded_handbacks + 1 >= $2 THEN 'dead' ELSE state END,
    dead_at = CASE WHEN unrecorded_handbacks + 1 >= $2 THEN clock_timestamp() ELSE dead_at END,
    dead_reason = CASE WHEN unrecorded_handbacks + 1 >= $2 THEN $3 ELSE dead_reason END
WHERE id = $1 AND state = 'pending'
RETURNING state
"""
# Leases of the deliveries this process holds are renewed while it holds them, so a delivery
# waiting for a slow outcome commit (lock waits, a slow disk) is not attempted again by another
# worker. Only a lease still held is extended: a handed-back or recorded one stays as it is.
# SKIP LOCKED: a row locked right now is being recorded (which ends its lease anyway), and
# waiting for it could deadlock with the outcome recorder's batch (chaos saw one).
_RENEW = """
UPDATE delivery.deliveries d
SET lease_until = clock_timestamp() + make_interval(secs => v.lease_s)
FROM unnest($1::bigint[], $2::float8[]) AS v(id, lease_s)
WHERE d.id = v.id AND d.id IN (
    SELECT id FROM delivery.deliveries
    WHERE id = ANY($1::bigint[]) AND state = 'pending' AND lease_until IS NOT NULL
    FOR UPDATE SKIP LOCKED
)
"""
# Renewed this many times per shortest lease, so one missed renewal does not lose it.
_RENEWALS_PER_LEASE = 3


class Deliverer:
    def __init__(
        self,
        settings: Settings,
        pool: asyncpg.Pool,
        sender: Sender,
        *,
        capacity: Capacity | None = None,
        hooks: Sequence[AttemptHook] | None = None,
        rng: random.Random | None = None,
        box: SecretBox = NO_KEYS,
    ) -> None:
        self._settings = settings
        self._pool = pool
        self._sender = sender
        self._rng = rng or random.Random()
        self._default_policy = RetryPolicy(settings.retry_schedule_s)
        self._outcomes = OutcomeRecorder(settings, pool)
        #: What this process may hold; dispatch and the scheduler reserve from it.
        self.capacity = capacity or Capacity.from_settings(settings)
        #: The pace of each subscriber that answered 429; dispatch and the scheduler consult it.
        self.pacer = Pacer()
        #: Opens the stored secrets as dispatch and the scheduler load subscriptions (once per
        #: sealed value, so no attempt decrypts).
        self.box = box
        self._hooks = Hooks(default_hooks(settings) if hooks is None else hooks)
        self._tg: asyncio.TaskGroup | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        self._leases: dict[int, float] = {}  # delivery id -> lease seconds, while held here

    def submit(self, job: Job, reservation: Reservation) -> None:
        """Start a job with the reservation handed over for it (the deliverer gives it back).
        After shutdown began, its task hands the lease back instead."""
        if self._tg is None:  # not running: nobody could hand it back, its lease ends on its own
            reservation.release()
            log.info("delivery_handed_back", delivery_id=job.delivery_id)
            return
        self._leases[job.delivery_id] = lease_for(self._settings, job.subscription)
        task = self._tg.create_task(self._run_job(job, reservation))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def run(self, stop: asyncio.Event, force: asyncio.Event) -> None:
        """Own every attempt's task. On ``stop``: finish in-flight attempts within the
        shutdown timeout (or until ``force``), then cancel the rest, handing their leases back."""
        async with asyncio.TaskGroup() as tg:
            self._tg = tg
            try:
                renewer = tg.create_task(self._renew_leases())
                await stop.wait()
                self.capacity.close()
                deadline = self._settings.shutdown_timeout_s
                drained = asyncio.create_task(self.capacity.idle.wait())
                forced = asyncio.create_task(force.wait())
                _done, pending = await asyncio.wait(
                    {drained, forced}, timeout=deadline, return_when=asyncio.FIRST_COMPLETED
                )
                for task in pending:
                    task.cancel()
                if not self.capacity.idle.is_set():
                    log.warning("drain_deadline_passed", in_flight=self.capacity.held)
                    for job_task in list(self._tasks):
                        job_task.cancel()
                renewer.cancel()
            finally:
                self._tg = None  # the group is closing: submit starts no task in it now

    async def _renew_leases(self) -> None:
        every_s = self._settings.delivery_lease_s / _RENEWALS_PER_LEASE
        while True:
            await asyncio.sleep(every_s)
            if not self._leases:
                continue
            ids, leases = list(self._leases), list(self._leases.values())
            try:
                await self._pool.execute(_RENEW, ids, leases)
            except Exception as exc:  # PostgreSQL away: the leases may lapse, as after a crash
                log.warning("lease_renewal_failed", held=len(ids), error=repr(exc)[:200])

    async def _run_job(self, job: Job, reservation: Reservation) -> None:
        # The subscriber's share (a request slot, and its place among the work held for it) is
        # given back as soon as the POST returns; the process share (and the lease) are held
        # until the outcome is committed, so nothing is attempted twice and memory stays bounded.
        metrics.IN_FLIGHT.inc()
        try:
            if not self.capacity.closed:  # draining: it goes back without waiting for a slot
                await reservation.request_slot()
                if not await self._wait_for_turn(job):
                    # Its subscriber asked for a pause (429): back to PostgreSQL instead of
                    # into the pause, where claims take its due retries first once it is over.
                    reservation.end_request()
                    await self._hand_back(job)
                    metrics.PACING_HAND_BACKS.inc()
                    return
            if self.capacity.closed:
                # Draining: queued work (and work submitted since) goes back to PostgreSQL for
                # another worker instead of starting a request the deadline may cut.
                reservation.end_request()
                await self._hand_back(job)
                log.info("delivery_handed_back", delivery_id=job.delivery_id)
                return
            await self._attempt(job, reservation)
        except asyncio.CancelledError:
            # Shutdown deadline: give the delivery back so another worker retries it now.
            # The subscriber may have received it; the retry carries the same webhook-id.
            await asyncio.shield(self._hand_back(job))
            raise
        except Exception as exc:
            log.exception("delivery_attempt_crashed", delivery_id=job.delivery_id)
            await self._hand_back_unrecorded(job, exc)
        finally:
            self._leases.pop(job.delivery_id, None)
            metrics.IN_FLIGHT.dec()
            reservation.release()

    async def _wait_for_turn(self, job: Job) -> bool:
        """Wait for the subscriber's pace (a fraction of a second at most); ``False`` when it
        is paused (a 429's Retry-After), so the delivery should go back."""
        waited_s = 0.0
        while (wait_s := self.pacer.turn(job.subscription.id)) > 0:
            if self.pacer.paused(job.subscription.id):
                return False
            if self.capacity.closed:
                break
            await asyncio.sleep(wait_s)
            waited_s += wait_s
        if waited_s:
            metrics.PACING_WAIT.inc(waited_s)
        return True

    async def _hand_back(self, job: Job) -> None:
        self._leases.pop(job.delivery_id, None)  # never renewed again once given back
        try:
            await with_retries(
                self._pool, lambda c: c.execute(_HAND_BACK, job.delivery_id), deadline_s=5
            )
        except Exception as exc:  # the lease then simply expires
            log.warning("hand_back_failed", delivery_id=job.delivery_id, error=repr(exc)[:200])

    async def _hand_back_unrecorded(self, job: Job, error: Exception) -> None:
        """Give back a delivery that has no outcome, counting it; the last time allowed, it
        goes to the dead letters instead (an operator replays it once the cause is fixed)."""
        self._leases.pop(job.delivery_id, None)
        reason = safe_text(
            f"handed back {MAX_UNRECORDED_HANDBACKS} times without a recorded outcome "
            f"(last: {type(error).__name__}: {error})",
            limit_chars=300,
        )
        try:
            state = await with_retries(
                self._pool,
                lambda c: c.fetchval(
                    _HAND_BACK_UNRECORDED, job.delivery_id, MAX_UNRECORDED_HANDBACKS, reason
                ),
                deadline_s=5,
            )
        except Exception as exc:  # the lease then simply expires
            log.warning("hand_back_failed", delivery_id=job.delivery_id, error=repr(exc)[:200])
            return
        if state == DeliveryState.DEAD:
            metrics.ATTEMPT_LOOPS_BROKEN.inc()
            metrics.DEAD_LETTERS.labels("unrecorded").inc()
            log.error("attempt_loop_broken", delivery_id=job.delivery_id, reason=reason)

    async def _attempt(self, job: Job, reservation: Reservation) -> None:
        """Sign, post, decide, record; the hooks see each step. Whatever goes wrong before the
        outcome is written (a secret that cannot sign, a reply nobody foresaw) is the attempt's
        result, recorded on the schedule like any failure: never an immediate re-POST."""
        sub = job.subscription
        started_at = datetime.now(UTC)
        attempt = Attempt(job, started_at, {})
        sent_s = self.pacer.now_s()
        try:
            attempt.headers = webhook_headers(
                sub.signing_keys(started_at), job.event_id, int(time.time()), job.body
            )
        except Exception as exc:
            result = failed_attempt(exc, 0.0)
        else:
            self._hooks.before_attempt(attempt)
            try:
                result = await self._sender.post(
                    sub.url, attempt.headers, job.body, timeout_s=sub.timeout_s
                )
            except BaseException as exc:  # cancelled at the drain deadline: handed back
                self._hooks.on_handed_back(attempt, exc)
                raise
        reservation.end_request()
        policy = RetryPolicy(sub.retry_schedule_s) if sub.retry_schedule_s else self._default_policy
        decision = decide(
            status=result.status,
            error=result.error,
            retry_after_s=result.retry_after_s,
            attempt=job.attempt,
            policy=policy,
            rng=self._rng,
            max_pause_s=self._settings.throttle_max_pause_s,
            permanent=result.permanent,
        )
        # The pace changes before the outcome is committed, so what waits here for this
        # subscriber sees a pause at once.
        if decision.pause_s is not None:
            self.pacer.throttled(sub.id, sent_s=sent_s, pause_s=decision.pause_s)
        elif decision.outcome is Outcome.DELIVERED:
            self.pacer.succeeded(sub.id)
        self._hooks.after_response(attempt, result, decision)
        await self._outcomes.record(
            AttemptOutcome(job.delivery_id, sub.id, job.attempt, started_at, result, decision)
        )
        self._hooks.after_attempt(attempt, result, decision)
