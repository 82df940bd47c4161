"""``/v1/ops/...`` (scope ``operator``): the platform's health across tenants, for on-call.
The same numbers as ``delivery status`` (``delivery.store.status``, ``delivery.broker.depths``)."""

from __future__ import annotations

from typing import Any

from delivery.api.models import (
    Backlog,
    HealthList,
    OpsOverview,
    PoisonOut,
    PoisonPage,
    SubscriptionHealth,
    UnhealthySince,
)
from delivery.api.routing import Call, Reply
from delivery.broker.depths import queue_report
from delivery.broker.topology import Names
from delivery.store.status import outbox_backlog, subscription_health
from delivery.store.unhealthy import unhealthy

_POISON_SHOWN = 100


def is_unhealthy(sub: dict[str, Any]) -> bool:
    """Disabled, circuit open, failing, retrying or dead letters; paused is a choice, not a
    fault, and counts only for what it left failing."""
    return bool(
        sub["state"] == "disabled"
        or sub["circuit"] != "closed"
        or sub["consecutive_failures"] > 0
        or sub["retrying"] > 0
        or sub["dead"] > 0
    )


def by_impact(subs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Unhealthy subscriptions, the most stuck work first (dead + retrying + pending), then
    the longest failing (an unset ``failing_since`` last), then by id for a stable order."""
    unhealthy = [s for s in subs if is_unhealthy(s)]
    return sorted(
        unhealthy,
        key=lambda s: (
            -(s["dead"] + s["retrying"] + s["pending"]),
            s["failing_since"] is None,
            s["failing_since"] or "",
            s["id"],
        ),
    )


async def overview(call: Call) -> Reply:
    backlog = await outbox_backlog(call.pool)
    subs = await subscription_health(call.pool)
    names = Names(call.settings.amqp_prefix)
    depths, queues_error = await queue_report(call.settings.amqp_url or None, names)
    poison = await call.pool.fetchval("SELECT count(*) FROM delivery.poison_messages")
    return Reply(
        200,
        OpsOverview(
            outbox=Backlog(pending=backlog.pending, oldest_age_s=round(backlog.oldest_s, 3)),
            queues=depths,
            queues_error=queues_error,
            poison_messages=poison,
            unhealthy=[SubscriptionHealth(**s) for s in by_impact(subs)],
            unhealthy_since=[
                UnhealthySince(**u) for u in await unhealthy(call.pool, queues_error=queues_error)
            ],
        ),
    )


async def poison_messages(call: Call) -> Reply:
    rows = await call.pool.fetch(
        "SELECT id, received_at, message_id, routing_key, reason, death_count"
        " FROM delivery.poison_messages ORDER BY id DESC LIMIT $1",
        _POISON_SHOWN,
    )
    total = await call.pool.fetchval("SELECT count(*) FROM delivery.poison_messages")
    return Reply(200, PoisonPage(items=[PoisonOut(**dict(r)) for r in rows], total=total))


async def tenant_health(call: Call) -> Reply:
    """The caller's tenant's subscriptions with their health (the subscriber's first page)."""
    subs = await subscription_health(call.pool, call.caller.tenant_id)
    return Reply(200, HealthList(items=[SubscriptionHealth(**s) for s in subs]))
