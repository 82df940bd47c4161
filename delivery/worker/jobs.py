"""A job (one leased delivery, ready to attempt) and the arithmetic of leases and capacity that
dispatch, the scheduler and the deliverer share: pure functions of the settings."""

from __future__ import annotations

import math
from dataclasses import dataclass

from delivery.settings import Settings
from delivery.store.subscriptions import Subscription


def subscription_hold_cap(settings: Settings) -> int:
    """Deliveries of one subscription a process may hold: its request slots plus its queue, but
    the queue never takes one subscriber past a quarter of the process, so however the knobs
    are set, a hanging subscriber leaves most of the capacity to the others."""
    requests = settings.per_subscription_max_in_flight
    return min(
        requests + settings.per_subscription_max_queued,
        max(requests, settings.max_in_flight // 4),
    )


def lease_per_timeout(settings: Settings) -> float:
    """A lease lasts at least this many times the attempt's timeout: the rounds of requests a
    queued delivery may wait behind, its own attempt, and as much again for recording it. So a
    slow answer is never attempted twice at once, whatever DELIVERY_DELIVERY_LEASE_S says."""
    requests = settings.per_subscription_max_in_flight
    queued = subscription_hold_cap(settings) - requests
    return 2.0 + math.ceil(queued / requests)


def lease_for(settings: Settings, subscription: Subscription) -> float:
    """Seconds a delivery of this subscription stays leased to the worker attempting it."""
    timeout_s = subscription.timeout_s or settings.http_timeout_s
    return max(settings.delivery_lease_s, timeout_s * lease_per_timeout(settings))


@dataclass(frozen=True, slots=True)
class Job:
    """One leased delivery, ready to attempt."""

    delivery_id: int
    event_id: str
    subscription: Subscription
    body: bytes
    attempt: int  # the number this attempt will have (1 = first)
    created_at_s: float | None  # outbox commit time, for the end-to-end histogram
    traceparent: str | None = None
