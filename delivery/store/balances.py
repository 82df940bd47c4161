"""The balances snapshot (migration 0023): per (tenant, account, asset) the balance of the
latest ``account.balance_changed`` event, kept by a trigger in the publishing transaction.

One statement reads the account's sequence and its balances, so both come from one snapshot:
the balances are those of events 1..N and no later one.
"""

from __future__ import annotations

from dataclasses import dataclass

import asyncpg

from delivery.errors import NotFoundError
from delivery.store.tenants import DEFAULT_TENANT

_SNAPSHOT = """
SELECT s.last_sequence, b.asset, b.balance::text AS balance
FROM delivery.account_sequences s
LEFT JOIN delivery.account_balances b
    ON b.tenant_id = s.tenant_id AND b.account_id = s.account_id
WHERE s.tenant_id = $1 AND s.account_id = $2
ORDER BY b.asset
"""


@dataclass(frozen=True)
class Balances:
    account_id: str
    sequence: int  # the account's last sequence as of this snapshot
    balances: dict[str, str]  # asset -> decimal string, as published


async def snapshot(
    conn: asyncpg.Connection | asyncpg.Pool, account_id: str, *, tenant_id: str = DEFAULT_TENANT
) -> Balances:
    """``NotFoundError`` for an account this tenant never published (another tenant's too)."""
    rows = await conn.fetch(_SNAPSHOT, tenant_id, account_id)
    if not rows:
        raise NotFoundError(f"account {account_id!r} not found")
    return Balances(
        account_id=account_id,
        sequence=rows[0]["last_sequence"],
        balances={r["asset"]: r["balance"] for r in rows if r["asset"] is not None},
    )
