"""Opaque keyset cursors: the sort key of a page's last row, base64url-encoded JSON.

Keyset, not offset: a page costs one index range scan however deep it is, and rows inserted
meanwhile neither repeat nor vanish from later pages. Clients treat the cursor as opaque; a
cursor that does not decode answers 400 naming ``cursor``.
"""

from __future__ import annotations

import base64
import binascii
from collections.abc import Awaitable, Callable, Sequence
from datetime import datetime
from typing import Any, TypeVar

import asyncpg
import orjson
from pydantic import BaseModel

from delivery.api.problems import ApiError
from delivery.api.routing import Call, Reply

T = TypeVar("T")
Key = tuple[int | str | datetime, ...]


def encode(*key: int | str | datetime) -> str:
    values = [v.isoformat() if isinstance(v, datetime) else v for v in key]
    return base64.urlsafe_b64encode(orjson.dumps(values)).decode().rstrip("=")


def _convert(kind: type, value: Any) -> Any:
    if kind is datetime and isinstance(value, str):
        moment = datetime.fromisoformat(value)
        if moment.tzinfo is not None:
            return moment
    elif kind is int and isinstance(value, int) and not isinstance(value, bool):
        if -(2**63) <= value < 2**63:
            return value
    elif kind is str and isinstance(value, str):
        return value
    raise ValueError("not a cursor value")


def _values(cursor: str) -> list[Any]:
    raw = orjson.loads(base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4)))
    if not isinstance(raw, list):
        raise TypeError("not a list")
    return raw


def decode(cursor: str, *kinds: type) -> tuple[Any, ...]:
    """The key ``encode`` made, each value converted to its kind (``int``, ``str``,
    ``datetime``); ``ApiError`` 400 if it is not one."""
    try:
        raw = _values(cursor)
        if len(raw) == len(kinds):
            return tuple(_convert(k, v) for k, v in zip(kinds, raw, strict=True))
    except (ValueError, TypeError, binascii.Error, orjson.JSONDecodeError):
        pass
    raise ApiError("invalid_request", "cursor: is not a cursor this API gave out", field="cursor")


def page(rows: Sequence[T], limit: int) -> tuple[Sequence[T], bool]:
    """Rows fetched with ``LIMIT limit + 1``: the page, and whether another follows."""
    return rows[:limit], len(rows) > limit


def next_page(
    rows: Sequence[T], limit: int, key: Callable[[T], Key]
) -> tuple[Sequence[T], str | None]:
    """Rows fetched with ``LIMIT limit + 1``: the page, and the cursor of the next one (the
    ``key`` of this page's last row), ``None`` when this is the last."""
    shown, more = page(rows, limit)
    return shown, encode(*key(shown[-1])) if more else None


async def listing(
    call: Call,
    fetch: Callable[[asyncpg.Connection, Any], Awaitable[Sequence[T]]],
    *,
    key: Callable[[T], Key],
    answer: Callable[[Sequence[T], str | None], BaseModel],
    kinds: tuple[type, ...] = (int,),
) -> Reply:
    """One page of a listing, the shape every list handler shares: the query's ``cursor``
    decoded as ``kinds`` (the one value when there is one kind, else the tuple; ``None`` on the
    first page), ``fetch(conn, after)`` for at most ``limit + 1`` rows, then ``answer(page,
    next_cursor)`` with 200; the next cursor is ``key`` of the page's last row."""
    q = call.query
    after: Any = None
    if q.cursor:
        values = decode(q.cursor, *kinds)
        after = values[0] if len(kinds) == 1 else values
    async with call.pool.acquire() as conn:
        rows = await fetch(conn, after)
    shown, cursor = next_page(rows, q.limit, key)
    return Reply(200, answer(shown, cursor))
