"""Pausing a subscription (``delivery subscriptions pause`` / ``resume``, ``POST .../pause``).

Unlike ``disabled`` (its new events are parked as dead letters), a paused subscription keeps
getting its events as pending deliveries: dispatch creates them without attempting them, the
scheduler's claim does not scan the subscription, and on resume they go out in order, like any
backlog. A delivery a worker already held when the pause came (at most its per-subscription
share) still goes out; nothing is parked by a pause.
"""

from __future__ import annotations

import asyncpg

from delivery.errors import InputError, NotFoundError
from delivery.secrets import NO_KEYS, SecretBox
from delivery.store.states import SubscriptionState
from delivery.store.subscriptions import FIELDS, Subscription
from delivery.store.tenants import DEFAULT_TENANT

_COLUMNS = ", ".join(FIELDS)
# $3: the states it may move from (its own state included: pausing twice changes nothing).
# A resume forgets since when it was failing: the time paused is not time failing, and a long
# pause must not auto-disable it at its first failure after (DELIVERY_AUTO_DISABLE_AFTER_S).
_MOVE = f"""
UPDATE delivery.subscriptions
SET state = $4, updated_at = CASE WHEN state = $4 THEN updated_at ELSE now() END,
    failing_since = CASE WHEN state = 'paused' AND $4 = 'active' THEN NULL
                         ELSE failing_since END
WHERE id = $1 AND tenant_id = $2 AND state = ANY($3::text[])
RETURNING {_COLUMNS}
"""
_STATE = "SELECT state FROM delivery.subscriptions WHERE id = $1 AND tenant_id = $2"


async def pause(
    conn: asyncpg.Connection,
    subscription_id: str,
    *,
    tenant_id: str = DEFAULT_TENANT,
    box: SecretBox = NO_KEYS,
) -> Subscription:
    """Hold the subscription's deliveries until ``resume``; its events keep arriving."""
    return await _move(
        conn,
        subscription_id,
        tenant_id,
        (SubscriptionState.ACTIVE, SubscriptionState.PAUSED),
        SubscriptionState.PAUSED,
        box=box,
    )


async def resume(
    conn: asyncpg.Connection,
    subscription_id: str,
    *,
    tenant_id: str = DEFAULT_TENANT,
    box: SecretBox = NO_KEYS,
) -> Subscription:
    """Deliver what waited during the pause, in order, and what comes from now on."""
    return await _move(
        conn,
        subscription_id,
        tenant_id,
        (SubscriptionState.PAUSED, SubscriptionState.ACTIVE),
        SubscriptionState.ACTIVE,
        box=box,
    )


async def _move(
    conn: asyncpg.Connection,
    subscription_id: str,
    tenant_id: str,
    sources: tuple[SubscriptionState, ...],
    target: SubscriptionState,
    *,
    box: SecretBox,
) -> Subscription:
    row = await conn.fetchrow(_MOVE, subscription_id, tenant_id, list(sources), target)
    if row is not None:
        return Subscription.from_row(row, box=box)
    state = await conn.fetchval(_STATE, subscription_id, tenant_id)
    if state == SubscriptionState.DISABLED:
        # A disabled subscription's events are dead letters already: pausing or resuming it
        # would hide that; enabling it is the operator's explicit step.
        verb = "paused" if target == SubscriptionState.PAUSED else "resumed"
        raise InputError(
            f"subscription {subscription_id!r} is disabled and cannot be {verb}:"
            " enable it first (`delivery subscriptions enable ID`)"
        )
    if state == SubscriptionState.REMOVED:
        raise NotFoundError(f"subscription {subscription_id!r} was removed")
    # Never there, or another tenant's: the same answer, so nothing tells them apart.
    raise NotFoundError(f"subscription {subscription_id!r} does not exist")
