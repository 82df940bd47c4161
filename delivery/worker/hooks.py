"""What happens around one attempt besides the attempt itself: metrics, the trace span, the log
line and the test-only crash points, each a hook (dramatiq's middleware, at the scale of one
attempt). The deliverer calls every hook of its list at each point, in order:

- ``before_attempt``: the request is signed and about to be sent (a hook may add headers);
- ``on_handed_back``: the POST did not return (cancelled at the drain deadline);
- ``after_response``: the POST returned and its outcome is decided, not yet committed;
- ``after_attempt``: the outcome is committed.
"""

from __future__ import annotations

import os
import time
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import TYPE_CHECKING

import structlog

from delivery.ops import metrics, tracing
from delivery.settings import Settings
from delivery.worker.jobs import Job
from delivery.worker.retry import Decision, Outcome
from delivery.worker.sender import AttemptResult

if TYPE_CHECKING:
    from opentelemetry.trace import Span

log = structlog.get_logger("delivery.deliverer")


@dataclass(eq=False, slots=True)
class Attempt:
    """One attempt of a job, as its hooks see it (the same object at every point)."""

    job: Job
    started_at: datetime
    headers: dict[str, str]  # the request's, signed; before_attempt may add to them


class AttemptHook:
    """Does nothing at every point; a hook overrides the points it needs."""

    def before_attempt(self, attempt: Attempt) -> None:
        return None

    def on_handed_back(self, attempt: Attempt, error: BaseException) -> None:
        return None

    def after_response(self, attempt: Attempt, result: AttemptResult, decision: Decision) -> None:
        return None

    def after_attempt(self, attempt: Attempt, result: AttemptResult, decision: Decision) -> None:
        return None


class Hooks(AttemptHook):
    """A list of hooks as one: each point calls every hook, in order."""

    def __init__(self, hooks: Sequence[AttemptHook]) -> None:
        self._hooks = tuple(hooks)

    def before_attempt(self, attempt: Attempt) -> None:
        for hook in self._hooks:
            hook.before_attempt(attempt)

    def on_handed_back(self, attempt: Attempt, error: BaseException) -> None:
        for hook in self._hooks:
            hook.on_handed_back(attempt, error)

    def after_response(self, attempt: Attempt, result: AttemptResult, decision: Decision) -> None:
        for hook in self._hooks:
            hook.after_response(attempt, result, decision)

    def after_attempt(self, attempt: Attempt, result: AttemptResult, decision: Decision) -> None:
        for hook in self._hooks:
            hook.after_attempt(attempt, result, decision)


def default_hooks(settings: Settings) -> list[AttemptHook]:
    """The hooks of a process: a crash point first when a test set one (so nothing after it in
    the attempt is counted or logged), then metrics, tracing and the log line."""
    hooks: list[AttemptHook] = []
    if settings.dangerous_crash_point:
        hooks.append(CrashPointHook(settings.dangerous_crash_point))
    hooks += [MetricsHook(), TracingHook(), LoggingHook()]
    return hooks


class MetricsHook(AttemptHook):
    def after_response(self, attempt: Attempt, result: AttemptResult, decision: Decision) -> None:
        metrics.ATTEMPT_DURATION.observe(result.duration_s)

    def after_attempt(self, attempt: Attempt, result: AttemptResult, decision: Decision) -> None:
        outcome = decision.outcome
        metrics.ATTEMPTS.labels(outcome.value).inc()
        created_at_s = attempt.job.created_at_s
        if outcome is Outcome.DELIVERED and created_at_s is not None:
            metrics.END_TO_END.observe(max(0.0, time.time() - created_at_s))
        elif outcome is Outcome.RETRY:
            metrics.RETRIES_SCHEDULED.inc()
        if decision.throttled:
            metrics.THROTTLED.inc()
        elif outcome in (Outcome.EXHAUSTED, Outcome.PERMANENT, Outcome.GONE):
            metrics.DEAD_LETTERS.labels(outcome.value).inc()


class TracingHook(AttemptHook):
    """The attempt's span, a child of the producer's; with tracing off, the stored traceparent
    goes to the subscriber as is."""

    def __init__(self) -> None:
        self._spans: dict[Attempt, Span] = {}

    def before_attempt(self, attempt: Attempt) -> None:
        job = attempt.job
        if tracing.tracer is not None:
            self._spans[attempt] = tracing.start_attempt(
                attempt.headers,
                traceparent=job.traceparent,
                body=job.body,
                subscription_id=job.subscription.id,
                attempt=job.attempt,
            )
        elif job.traceparent:
            attempt.headers["traceparent"] = job.traceparent

    def on_handed_back(self, attempt: Attempt, error: BaseException) -> None:
        span = self._spans.pop(attempt, None)
        if span is not None:
            tracing.end_attempt(span, outcome="handed_back", status=None, error=repr(error))

    def after_response(self, attempt: Attempt, result: AttemptResult, decision: Decision) -> None:
        span = self._spans.pop(attempt, None)
        if span is not None:
            tracing.end_attempt(
                span, outcome=decision.outcome.value, status=result.status, error=result.error
            )


class LoggingHook(AttemptHook):
    def after_attempt(self, attempt: Attempt, result: AttemptResult, decision: Decision) -> None:
        job = attempt.job
        context = {
            "event_id": job.event_id,
            "subscription_id": job.subscription.id,
            "attempt": job.attempt,
            "outcome": decision.outcome.value,
            "status": result.status,
            "duration_ms": round(result.duration_s * 1000, 1),
        }
        if tracing.tracer is not None:
            # The attempt's span has ended by now; its ids travel in the request's header.
            context.update(tracing.log_ids(attempt.headers.get("traceparent")))
        if decision.outcome is Outcome.DELIVERED:
            log.debug("attempt", **context)
        else:
            delay_s = decision.delay_s
            log.info(
                "attempt_failed",
                **context,
                error=result.error,
                next_attempt_in_s=None if delay_s is None else round(delay_s, 1),
            )


class CrashPointHook(AttemptHook):
    """Test-only fault injection for the crash-recovery tests: the process exits abruptly after
    the POST returned (``after_post``) or after its outcome was committed (``after_record``)."""

    def __init__(self, point: str) -> None:
        self._point = point

    def after_response(self, attempt: Attempt, result: AttemptResult, decision: Decision) -> None:
        self._crash_if("after_post")

    def after_attempt(self, attempt: Attempt, result: AttemptResult, decision: Decision) -> None:
        self._crash_if("after_record")

    def _crash_if(self, point: str) -> None:
        if self._point == point:
            log.warning("dangerous_crash_point_reached", point=point)
            os._exit(137)
