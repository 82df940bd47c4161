"""``/v1/events``: publish (one envelope or a batch, all or nothing), one event with its
deliveries, and the newest-first listing."""

from __future__ import annotations

import re
from typing import Any

import asyncpg

from delivery.api import pagination
from delivery.api.models import (
    MAX_BATCH,
    EventDetail,
    EventOut,
    EventPage,
    PublishResult,
)
from delivery.api.problems import ApiError, field_of
from delivery.api.routing import Call, Reply
from delivery.errors import InputError
from delivery.events import NewEvent, parse_event
from delivery.outbox import publish_validated
from delivery.store import pages, quotas

IDEMPOTENCY_KEY = "Idempotency-Key"
_EVENT_ID = re.compile(r"[A-Za-z0-9_.:-]{1,64}")


def _invalid(message: str, prefix: str) -> ApiError:
    first = message.split("; ", 1)[0]
    inner = field_of(first)
    field = f"{prefix}.{inner}" if prefix and inner else (prefix or inner)
    return ApiError("invalid_request", f"{prefix + ': ' if prefix else ''}{first}", field=field)


def parse_body(raw: Any, idempotency_key: str | None) -> list[NewEvent]:
    """The events of a publish body, each validated; ``ApiError`` 400 naming the first bad
    one's field and index (``events[3].data.price``). Nothing is written before this passes."""
    if idempotency_key is not None and not _EVENT_ID.fullmatch(idempotency_key):
        raise ApiError(
            "invalid_request",
            f"{IDEMPOTENCY_KEY}: must be an event id, at most 64 characters of A-Z a-z 0-9 _ . : -",
            field=IDEMPOTENCY_KEY,
        )
    if isinstance(raw, dict) and "events" in raw and "type" not in raw:
        if set(raw) != {"events"}:
            extra = sorted(set(raw) - {"events"})[0]
            raise ApiError("invalid_request", f"{extra}: is not a field of a batch", field=extra)
        items = raw["events"]
        if not isinstance(items, list) or not 1 <= len(items) <= MAX_BATCH:
            raise ApiError(
                "invalid_request",
                f"events: must be a list of 1 to {MAX_BATCH:,} events",
                field="events",
            )
        if idempotency_key is not None:
            raise ApiError(
                "invalid_request",
                f"{IDEMPOTENCY_KEY}: is for a single event; a batch's events carry their ids",
                field=IDEMPOTENCY_KEY,
            )
        parsed = []
        for index, item in enumerate(items):
            try:
                parsed.append(parse_event(item))
            except InputError as exc:
                raise _invalid(str(exc), f"events[{index}]") from None
        return parsed
    if isinstance(raw, dict) and idempotency_key is not None:
        if raw.get("id", idempotency_key) != idempotency_key:
            raise ApiError(
                "invalid_request",
                f"id: differs from the {IDEMPOTENCY_KEY} header (give one, or the same)",
                field="id",
            )
        raw = {**raw, "id": idempotency_key}
    try:
        return [parse_event(raw)]
    except InputError as exc:
        raise _invalid(str(exc), "") from None


def _refusal(decision: quotas.RateDecision, events: int) -> ApiError:
    headers = decision.headers()
    if decision.retry_after_s is None:  # more events than the burst: waiting cannot help
        burst = quotas.burst_events(decision.limit_per_s or 1)
        return ApiError(
            "unprocessable",
            f"events: {events} events are more than this tenant may send at once ({burst});"
            " split the batch",
            field="events",
            headers=headers,
        )
    return ApiError(
        "rate_limited",
        f"over this tenant's rate of {decision.limit_per_s} events/s;"
        f" retry after {headers['Retry-After']} s",
        headers=headers,
    )


async def publish(call: Call) -> Reply:
    idempotency_key = call.request.headers.get(IDEMPOTENCY_KEY)
    batch = parse_body(call.body, idempotency_key)
    tenant = call.caller.tenant_id
    async with call.pool.acquire() as conn:
        # Taken before (outside) the publishing transaction: the rate's row lock is then held
        # for one statement only, and a refusal writes nothing.
        decision = await quotas.take(conn, tenant, len(batch))
        if not decision.allowed:
            raise _refusal(decision, len(batch))
        # One statement, atomic by itself: the whole batch or nothing.
        result = await publish_validated(conn, batch, tenant=tenant)
    return Reply(
        202,
        PublishResult(
            published=len(result.published),
            duplicates=len(result.duplicates),
            ids=[e.id for e in batch],
        ),
        headers=decision.headers(),
    )


async def get_event(call: Call) -> Reply:
    tenant = call.caller.tenant_id
    async with call.pool.acquire() as conn:
        found = await pages.event(conn, tenant, call.path.id)
        deliveries = await pages.event_deliveries(conn, tenant, call.path.id)
        awaiting = await pages.awaiting_dispatch(conn, tenant, found)
    found.pop("pk")
    detail = {"event": found, "deliveries": deliveries, "awaiting_dispatch": awaiting}
    return Reply(200, EventDetail.model_validate(detail))


async def list_events(call: Call) -> Reply:
    q = call.query

    async def fetch(conn: asyncpg.Connection, after: int | None) -> list[dict[str, Any]]:
        return await pages.events(
            conn,
            call.caller.tenant_id,
            limit=q.limit,
            after=after,
            event_type=q.type,
            account_id=q.account_id,
            since=q.since,
            until=q.until,
        )

    return await pagination.listing(
        call,
        fetch,
        key=lambda r: (r["pk"],),
        answer=lambda shown, cursor: EventPage(
            items=[
                EventOut.model_validate({k: v for k, v in r.items() if k != "pk"}) for r in shown
            ],
            next_cursor=cursor,
        ),
    )
