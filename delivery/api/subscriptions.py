"""``/v1/subscriptions``: create, list, get, change, remove (history kept), rotate the
secret, pause, resume, replay a time window, the deliveries with their attempts, and an
ordered subscription's blocked accounts."""

from __future__ import annotations

from datetime import datetime
from typing import Any

import asyncpg

from delivery.api import pagination
from delivery.api.models import (
    BlockedAccount,
    BlockedAccounts,
    DeliveryOut,
    DeliveryPage,
    Replayed,
    SubscriptionOut,
    SubscriptionPage,
    SubscriptionWithSecret,
)
from delivery.api.problems import ApiError
from delivery.api.routing import Call, Reply
from delivery.durations import parse_schedule_s
from delivery.errors import InputError
from delivery.settings import Settings
from delivery.signing import Signing
from delivery.store import pages, pausing, replays
from delivery.store import subscriptions as subs
from delivery.store.status import blocked_accounts_of
from delivery.store.subscription_changes import update
from delivery.targets import check_target


def _out(sub: subs.Subscription, *, with_secret: bool = False) -> SubscriptionOut:
    shown = sub.public_dict(with_secret=with_secret)
    fields = {
        "id": shown["id"],
        "url": shown["url"],
        "events": shown["event_patterns"],
        "account_id": shown["account_id"],
        "state": str(sub.state),
        "disabled_reason": sub.disabled_reason,
        "retry_schedule": shown.get("retry_schedule"),
        "timeout_s": sub.timeout_s,
        "circuit_state": str(sub.circuit_state),
        "ordered": sub.ordered,
        "signing": str(sub.signing),
        "public_key": sub.public_key,
        "created_at": sub.created_at,
        "updated_at": sub.updated_at,
    }
    if with_secret:
        return SubscriptionWithSecret(**fields, secret=shown.get("secret"))
    return SubscriptionOut(**fields)


def _schedule(text: str | None) -> tuple[float, ...] | None:
    if text is None:
        return None
    try:
        return parse_schedule_s(text)
    except ValueError as exc:
        raise InputError(f"retry_schedule: {exc}") from None


async def _checked_url(url: str, settings: Settings) -> str:
    """The canonical URL, refused (422 naming ``url``) when the SSRF guard blocks it."""
    try:
        canonical = subs.validate_url(url)
    except InputError as exc:
        raise ApiError("unprocessable", str(exc), field="url") from None
    if not settings.allow_private_targets:
        await check_target(canonical)
    return canonical


async def create(call: Call) -> Reply:
    body = call.body
    url = await _checked_url(body.url, call.settings)
    schedule = _schedule(body.retry_schedule)
    async with call.pool.acquire() as conn, conn.transaction():
        sub = await subs.add(
            conn,
            url=url,
            patterns=body.events,
            account_id=body.account_id,
            secret=body.secret,
            retry_schedule_s=schedule,
            timeout_s=body.timeout_s,
            signing=Signing(body.signing),
            ordered=body.ordered,
            tenant_id=call.caller.tenant_id,
            box=call.box,
        )
    return Reply(201, _out(sub, with_secret=True))


async def list_subscriptions(call: Call) -> Reply:
    q = call.query

    async def fetch(
        conn: asyncpg.Connection, after: tuple[datetime, str] | None
    ) -> list[subs.Subscription]:
        rows = await pages.subscriptions(conn, call.caller.tenant_id, limit=q.limit, after=after)
        return [subs.Subscription.from_row(r, box=call.box) for r in rows]

    return await pagination.listing(
        call,
        fetch,
        kinds=(datetime, str),
        key=lambda s: (s.created_at, s.id),
        answer=lambda shown, cursor: SubscriptionPage(
            items=[_out(s) for s in shown], next_cursor=cursor
        ),
    )


async def get(call: Call) -> Reply:
    async with call.pool.acquire() as conn:
        return Reply(
            200,
            _out(await subs.get(conn, call.path.id, tenant_id=call.caller.tenant_id, box=call.box)),
        )


async def change(call: Call) -> Reply:
    body = call.body
    url = await _checked_url(body.url, call.settings) if body.url is not None else None
    async with call.pool.acquire() as conn:
        sub = await update(
            conn,
            call.path.id,
            tenant_id=call.caller.tenant_id,
            url=url,
            patterns=body.events,
            account_id=body.account_id,
            retry_schedule_s=_schedule(body.retry_schedule),
            timeout_s=body.timeout_s,
            box=call.box,
        )
    return Reply(200, _out(sub))


async def remove(call: Call) -> Reply:
    async with call.pool.acquire() as conn:
        await subs.remove(conn, call.path.id, keep_history=True, tenant_id=call.caller.tenant_id)
    return Reply(204)


async def rotate_secret(call: Call) -> Reply:
    async with call.pool.acquire() as conn, conn.transaction():
        sub = await subs.rotate_secret(
            conn,
            call.path.id,
            grace_s=call.settings.secret_rotation_grace_s,
            tenant_id=call.caller.tenant_id,
            box=call.box,
        )
    return Reply(200, _out(sub, with_secret=True))


async def deliveries(call: Call) -> Reply:
    q = call.query

    async def fetch(conn: asyncpg.Connection, after: int | None) -> list[dict[str, Any]]:
        await subs.get(conn, call.path.id, tenant_id=call.caller.tenant_id)  # 404 unless its
        return await pages.subscription_deliveries(
            conn,
            call.path.id,
            limit=q.limit,
            after=after,
            state=q.state,
            since=q.since,
            until=q.until,
        )

    return await pagination.listing(
        call,
        fetch,
        key=lambda r: (r["id"],),
        answer=lambda shown, cursor: DeliveryPage(
            items=[DeliveryOut.model_validate(r) for r in shown], next_cursor=cursor
        ),
    )


async def blocked_accounts(call: Call) -> Reply:
    async with call.pool.acquire() as conn:
        await subs.get(conn, call.path.id, tenant_id=call.caller.tenant_id)  # 404 unless its
        rows = await blocked_accounts_of(conn, call.path.id)
    return Reply(200, BlockedAccounts(items=[BlockedAccount(**r) for r in rows]))


async def pause(call: Call) -> Reply:
    async with call.pool.acquire() as conn:
        sub = await pausing.pause(conn, call.path.id, tenant_id=call.caller.tenant_id, box=call.box)
    return Reply(200, _out(sub))


async def resume(call: Call) -> Reply:
    async with call.pool.acquire() as conn:
        sub = await pausing.resume(
            conn, call.path.id, tenant_id=call.caller.tenant_id, box=call.box
        )
    return Reply(200, _out(sub))


async def replay(call: Call) -> Reply:
    window = call.body
    async with call.pool.acquire() as conn:
        replayed = await replays.replay_window(
            conn, call.path.id, window.since, window.until, tenant_id=call.caller.tenant_id
        )
    return Reply(202, Replayed(replayed=replayed))
