"""Changing a subscription in place (``PATCH /v1/subscriptions/{id}``): its URL (checked by
the SSRF guard again), patterns, account, retry schedule or timeout. What is not given stays."""

from __future__ import annotations

from collections.abc import Sequence

import asyncpg

from delivery.durations import check_schedule_s
from delivery.errors import InputError, NotFoundError
from delivery.secrets import NO_KEYS, SecretBox
from delivery.settings import MAX_HTTP_TIMEOUT_S
from delivery.store.subscriptions import (
    FIELDS,
    Subscription,
    parse_patterns,
    validate_account_id,
    validate_url,
)


async def update(
    conn: asyncpg.Connection,
    subscription_id: str,
    *,
    tenant_id: str,
    url: str | None = None,
    patterns: Sequence[str] | None = None,
    account_id: str | None = None,
    retry_schedule_s: tuple[float, ...] | None = None,
    timeout_s: float | None = None,
    box: SecretBox = NO_KEYS,
) -> Subscription:
    # Everything is checked before the row is written: a refusal changes nothing.
    url = validate_url(url) if url is not None else None
    parsed = list(parse_patterns(patterns)) if patterns is not None else None
    account_id = validate_account_id(account_id)
    if timeout_s is not None and not 0 < timeout_s <= MAX_HTTP_TIMEOUT_S:
        raise InputError(f"timeout_s: must be between 0 and {MAX_HTTP_TIMEOUT_S:g} seconds")
    if retry_schedule_s is not None:
        try:
            retry_schedule_s = check_schedule_s(tuple(retry_schedule_s))
        except ValueError as exc:
            raise InputError(f"retry_schedule: {exc}") from None
    row = await conn.fetchrow(
        f"""
        UPDATE delivery.subscriptions
        SET url = coalesce($3, url), event_patterns = coalesce($4, event_patterns),
            account_id = coalesce($5, account_id),
            retry_schedule_s = coalesce($6, retry_schedule_s),
            timeout_s = coalesce($7, timeout_s), updated_at = now()
        WHERE id = $1 AND tenant_id = $2 AND state <> 'removed'
        RETURNING {", ".join(FIELDS)}
        """,
        subscription_id,
        tenant_id,
        url,
        parsed,
        account_id,
        list(retry_schedule_s) if retry_schedule_s is not None else None,
        timeout_s,
    )
    if row is None:
        raise NotFoundError(f"subscription {subscription_id!r} does not exist")
    return Subscription.from_row(row, box=box)
