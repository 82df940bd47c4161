"""What the live stream reads from the outbox: an account's stored events after a sequence
(a client's history), and the shared feed's reads of newly committed rows.

The feed cannot read ``pk > the last pk seen``: pks are drawn at insert, so a transaction
holding a lower pk can commit after a higher one was read, and such a row would be skipped.
Each row carries the transaction that wrote it (``tx``, migration 0023). A read in a
snapshot S sees every row of every transaction older than S's xmin (all of them have ended),
so the next read asks for ``tx >= xmin(S)`` only: rows of transactions still running at S are
read again later (the caller drops the pks it has already passed on).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import asyncpg

_COLUMNS = "pk, tenant_id, event_id, type, account_id, sequence, occurred_at, data::text AS data"
_HISTORY = f"""
SELECT {_COLUMNS} FROM delivery.outbox
WHERE tenant_id = $1 AND account_id = $2 AND sequence > $3 AND sequence <= $4
ORDER BY sequence
LIMIT $5
"""
_HORIZON = "SELECT pg_snapshot_xmin(pg_current_snapshot())::text"
_NEW_ROWS = f"""
SELECT {_COLUMNS}, tx::text AS tx, extract(epoch FROM created_at)::float8 AS created_at_s
FROM delivery.outbox
WHERE tx >= $1::xid8
ORDER BY pk
"""


@dataclass(frozen=True)
class FeedRead:
    horizon: int  # the xmin of this read's snapshot: the next read starts there
    rows: Sequence[Any]  # every visible row with tx >= the previous horizon, in pk order


async def horizon(conn: asyncpg.Connection) -> int:
    """Where a feed starting now begins: rows of transactions ended before now are history."""
    return int(await conn.fetchval(_HORIZON))


async def read_new(conn: asyncpg.Connection, since_horizon: int) -> FeedRead:
    # Repeatable read: the horizon and the rows come from one snapshot.
    async with conn.transaction(isolation="repeatable_read", readonly=True):
        now = int(await conn.fetchval(_HORIZON))
        rows = await conn.fetch(_NEW_ROWS, since_horizon)
    return FeedRead(horizon=now, rows=rows)


async def history(
    conn: asyncpg.Connection | asyncpg.Pool,
    tenant_id: str,
    account_id: str,
    *,
    after: int,
    through: int,
    limit: int,
) -> list[Any]:
    """Up to ``limit`` of the account's events with ``after < sequence <= through``."""
    return list(await conn.fetch(_HISTORY, tenant_id, account_id, after, through, limit))


async def last_sequence(
    conn: asyncpg.Connection | asyncpg.Pool, tenant_id: str, account_id: str
) -> int:
    """The account's last committed sequence (0 if it has none)."""
    value = await conn.fetchval(
        "SELECT last_sequence FROM delivery.account_sequences"
        " WHERE tenant_id = $1 AND account_id = $2",
        tenant_id,
        account_id,
    )
    return int(value or 0)
