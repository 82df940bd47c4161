"""``GET /v1/accounts/{account_id}/balances``: the snapshot a stream client starts from
(``store.balances``), consistent as of ``sequence``; then the stream ``after`` it."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field

from delivery.api.routing import Call, Reply
from delivery.events import AccountId
from delivery.store import balances


class AccountPath(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    account_id: AccountId


class AccountBalances(BaseModel):
    model_config = ConfigDict(frozen=True)

    account_id: str
    sequence: int = Field(description="the account's last sequence this snapshot includes")
    balances: dict[str, str] = Field(
        description="asset -> balance (a decimal string), from account.balance_changed events"
    )


async def get_balances(call: Call) -> Reply:
    found = await balances.snapshot(
        call.pool, call.path.account_id, tenant_id=call.caller.tenant_id
    )
    return Reply(
        200,
        AccountBalances(
            account_id=found.account_id, sequence=found.sequence, balances=found.balances
        ),
    )
