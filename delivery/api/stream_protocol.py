"""The live stream's messages: the client's subscribe message, checked, and the frames the
server sends that are not events. Pure: no I/O."""

from __future__ import annotations

import fnmatch
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Annotated, Any, Literal

import orjson
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from delivery.errors import InputError
from delivery.events import AccountId
from delivery.store.subscriptions import parse_patterns

# Close codes (RFC 6455 4000-4999 are the application's).
CLOSE_BEHIND = 4008  # the client's buffer filled: reconnect and resume with `after`
CLOSE_BAD_SUBSCRIBE = 4400  # the subscribe message was not understood: fix it
CLOSE_TRY_LATER = 1013  # the tenant's client limit is reached (RFC 6455 "try again later")
CLOSE_GOING_AWAY = 1001  # the server is stopping: reconnect and resume with `after`
CLOSE_SERVER_ERROR = 1011  # something failed on our side (logged): reconnect and resume
MAX_ACCOUNTS = 1_000

HEARTBEAT_FRAME = orjson.dumps({"op": "heartbeat"}).decode()


class _Subscribe(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    op: Literal["subscribe"]
    accounts: Annotated[list[AccountId], Field(min_length=1, max_length=MAX_ACCOUNTS)] | None = None
    types: Annotated[list[str], Field(min_length=1, max_length=16)] | None = None
    after: dict[AccountId, Annotated[int, Field(ge=0, le=2**62)]] = Field(
        default_factory=dict, max_length=MAX_ACCOUNTS
    )


@dataclass(frozen=True)
class Subscription:
    """What one client asked for: ``accounts`` None means every account of its tenant."""

    accounts: frozenset[str] | None
    types: tuple[str, ...] | None
    after: Mapping[str, int]

    def wants(self, account_id: str, event_type: str) -> bool:
        if self.accounts is not None and account_id not in self.accounts:
            return False
        return self.types is None or any(fnmatch.fnmatchcase(event_type, p) for p in self.types)


def parse_subscribe(raw: str | bytes) -> Subscription:
    """The first message of a connection; ``InputError`` with one line naming the field."""
    try:
        obj: Any = orjson.loads(raw)
    except orjson.JSONDecodeError:
        raise InputError('send {"op": "subscribe", ...} as JSON first') from None
    try:
        msg = _Subscribe.model_validate(obj)
    except ValidationError as exc:
        err = exc.errors()[0]
        field = ".".join(str(p) for p in err["loc"]) or "message"
        raise InputError(f"{field}: {err['msg']}") from None
    try:
        types = parse_patterns(msg.types) if msg.types is not None else None
    except InputError as exc:  # the subscriptions' word for the field is "events"
        raise InputError("types" + str(exc).removeprefix("events")) from None
    accounts = frozenset(msg.accounts) if msg.accounts is not None else None
    if accounts is not None:
        stray = sorted(set(msg.after) - accounts)
        if stray:
            raise InputError(f"after: {stray[0]!r} is not one of the subscribed accounts")
    return Subscription(accounts=accounts, types=types, after=dict(msg.after))
