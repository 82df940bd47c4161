"""``/v1/dead-letters``: the ``dlq`` commands over HTTP, scoped to the caller's tenant. Replay,
purge and skip take ``ids`` or a filter; the tenant's matching ids are resolved first, so another
tenant's dead letters are never touched (and are not told apart from missing ones)."""

from __future__ import annotations

from typing import Any

import asyncpg

from delivery.api import pagination
from delivery.api.models import (
    DeadLetterOut,
    DeadLetterPage,
    DeadLetterSelection,
    DeadLettersPurged,
    DeadLettersReplayed,
    DeadLettersSkipped,
)
from delivery.api.problems import ApiError
from delivery.api.routing import Call, Reply
from delivery.store import dead_letters, pages


async def list_dead_letters(call: Call) -> Reply:
    q = call.query

    async def fetch(conn: asyncpg.Connection, after: int | None) -> list[dict[str, Any]]:
        return await pages.dead_letters(
            conn,
            call.caller.tenant_id,
            limit=q.limit,
            after=after,
            subscription_id=q.subscription_id,
            since=q.since,
            until=q.until,
        )

    return await pagination.listing(
        call,
        fetch,
        key=lambda r: (r["id"],),
        answer=lambda shown, cursor: DeadLetterPage(
            items=[DeadLetterOut.model_validate(r) for r in shown], next_cursor=cursor
        ),
    )


async def _selected(call: Call) -> list[int]:
    sel: DeadLetterSelection = call.body
    filtered = sel.subscription_id is not None or sel.since is not None or sel.until is not None
    if sum([sel.ids is not None, filtered, sel.all]) != 1:
        raise ApiError(
            "invalid_request",
            "name dead letters by ids, by a filter (subscription_id, since, until) or all: true"
            " (one of them)",
            field="ids",
        )
    async with call.pool.acquire() as conn:
        return await pages.dead_letter_ids(
            conn,
            call.caller.tenant_id,
            ids=sel.ids,
            subscription_id=sel.subscription_id,
            since=sel.since,
            until=sel.until,
        )


def _selector(call: Call, ids: list[int]) -> dead_letters.Selector:
    return dead_letters.Selector(ids=tuple(ids), tenant_id=call.caller.tenant_id)


async def replay(call: Call) -> Reply:
    ids = await _selected(call)
    if not ids:
        return Reply(200, DeadLettersReplayed(replayed=0, skipped=0))
    replayed, skipped = await dead_letters.replay(call.pool, _selector(call, ids))
    return Reply(200, DeadLettersReplayed(replayed=replayed, skipped=skipped))


async def purge(call: Call) -> Reply:
    ids = await _selected(call)
    if not ids:
        return Reply(200, DeadLettersPurged(purged=0))
    purged = await dead_letters.purge(call.pool, _selector(call, ids))
    return Reply(200, DeadLettersPurged(purged=purged))


async def skip(call: Call) -> Reply:
    ids = await _selected(call)
    if not ids:
        return Reply(200, DeadLettersSkipped(skipped=0))
    skipped = await dead_letters.skip(call.pool, _selector(call, ids))
    return Reply(200, DeadLettersSkipped(skipped=skipped))
