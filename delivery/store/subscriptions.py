"""Subscriptions: who gets which events, where, signed with which secrets."""

from __future__ import annotations

import fnmatch
import re
import secrets
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from datetime import datetime
from typing import Any
from urllib.parse import urlsplit

import asyncpg

from delivery.errors import InputError, NotFoundError
from delivery.events import EVENT_TYPES, format_timestamp
from delivery.signing import generate_secret, secret_key
from delivery.store.states import CircuitState, SubscriptionState

_PATTERN = re.compile(r"^[a-z0-9_.*?\[\]-]+$")
FIELDS = (
    "id",
    "url",
    "event_patterns",
    "account_id",
    "state",
    "disabled_reason",
    "secret",
    "previous_secret",
    "previous_secret_expires_at",
    "retry_schedule_s",
    "timeout_s",
    "circuit_state",
    "circuit_retry_at",
    "consecutive_failures",
    "failing_since",
    "paced_until",
    "created_at",
    "updated_at",
)
_COLUMNS = ", ".join(FIELDS)


def select_list(alias: str, prefix: str) -> str:
    """``s.id AS sub_id, ...``: subscription columns inside a larger query, for ``from_row``."""
    return ", ".join(f"{alias}.{f} AS {prefix}{f}" for f in FIELDS)


@dataclass(frozen=True, slots=True)
class Subscription:
    id: str
    url: str
    event_patterns: tuple[str, ...]
    account_id: str | None
    state: SubscriptionState
    disabled_reason: str | None
    secret: str
    previous_secret: str | None
    previous_secret_expires_at: datetime | None
    retry_schedule_s: tuple[float, ...] | None
    timeout_s: float | None
    circuit_state: CircuitState
    circuit_retry_at: datetime | None
    consecutive_failures: int
    failing_since: datetime | None
    paced_until: datetime | None  # a 429's Retry-After holds the subscription back until then
    created_at: datetime
    updated_at: datetime

    @classmethod
    def from_row(cls, row: Any, prefix: str = "") -> Subscription:
        values = {f: row[prefix + f] for f in FIELDS}
        schedule = values["retry_schedule_s"]
        values["retry_schedule_s"] = tuple(schedule) if schedule is not None else None
        values["event_patterns"] = tuple(values["event_patterns"])
        values["state"] = SubscriptionState(values["state"])
        values["circuit_state"] = CircuitState(values["circuit_state"])
        return cls(**values)

    @property
    def circuit_open(self) -> bool:
        return self.circuit_state == CircuitState.OPEN

    def paced(self, now: datetime) -> bool:
        """Held back by a subscriber's 429 (``Retry-After``) at ``now``."""
        return self.paced_until is not None and self.paced_until > now

    def matches(self, event_type: str, account_id: str) -> bool:
        if self.account_id is not None and self.account_id != account_id:
            return False
        return any(fnmatch.fnmatchcase(event_type, p) for p in self.event_patterns)

    def signing_keys(self, now: datetime) -> list[bytes]:
        """The current secret, plus the previous one while its grace period lasts."""
        keys = [secret_key(self.secret)]
        if (
            self.previous_secret
            and self.previous_secret_expires_at is not None
            and self.previous_secret_expires_at > now
        ):
            keys.append(secret_key(self.previous_secret))
        return keys

    def public_dict(self, *, with_secret: bool = False) -> dict[str, Any]:
        """For ``--json`` output: timestamps as RFC 3339; secrets only when asked for."""
        out = asdict(self)
        out["event_patterns"] = list(self.event_patterns)
        for key in (
            "created_at",
            "updated_at",
            "previous_secret_expires_at",
            "circuit_retry_at",
            "failing_since",
            "paced_until",
        ):
            if out[key] is not None:
                out[key] = format_timestamp(out[key])
        if self.retry_schedule_s is not None:
            from delivery.durations import format_schedule

            out["retry_schedule"] = format_schedule(self.retry_schedule_s)
        del out["retry_schedule_s"]
        del out["previous_secret"]
        if not with_secret:
            del out["secret"]
        return out


def new_subscription_id() -> str:
    return "sub_" + secrets.token_hex(8)


def validate_url(url: str) -> str:
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise InputError(f"url: {url!r} is not an http(s) URL with a host")
    return url


def parse_patterns(text: str | Sequence[str]) -> tuple[str, ...]:
    items = text.split(",") if isinstance(text, str) else list(text)
    patterns = tuple(p.strip() for p in items if p.strip())
    if not patterns:
        raise InputError("events: give at least one pattern, e.g. 'trade.*' or '*'")
    for pattern in patterns:
        if not _PATTERN.match(pattern):
            raise InputError(f"events: {pattern!r} is not a glob on event types like 'trade.*'")
        if not any(fnmatch.fnmatchcase(t, pattern) for t in EVENT_TYPES):
            raise InputError(
                f"events: {pattern!r} matches no known event type ({', '.join(EVENT_TYPES)})"
            )
    return patterns


async def add(
    conn: asyncpg.Connection,
    *,
    url: str,
    patterns: str | Sequence[str],
    account_id: str | None = None,
    secret: str | None = None,
    retry_schedule_s: tuple[float, ...] | None = None,
    timeout_s: float | None = None,
) -> Subscription:
    validate_url(url)
    if timeout_s is not None and not 0 < timeout_s <= 300:
        raise InputError("timeout: must be between 0 and 300 seconds")
    parsed = parse_patterns(patterns)
    if secret is not None:
        if not secret.startswith("whsec_"):
            raise InputError("secret: must start with whsec_")
        secret_key(secret)
    row = await conn.fetchrow(
        f"""
        INSERT INTO delivery.subscriptions
            (id, url, event_patterns, account_id, secret, retry_schedule_s, timeout_s)
        VALUES ($1, $2, $3, $4, $5, $6, $7)
        RETURNING {_COLUMNS}
        """,
        new_subscription_id(),
        url,
        list(parsed),
        account_id,
        secret or generate_secret(),
        list(retry_schedule_s) if retry_schedule_s else None,
        timeout_s,
    )
    return Subscription.from_row(row)


async def list_all(conn: asyncpg.Connection) -> list[Subscription]:
    rows = await conn.fetch(
        f"SELECT {_COLUMNS} FROM delivery.subscriptions ORDER BY created_at, id"
    )
    return [Subscription.from_row(r) for r in rows]


async def get(conn: asyncpg.Connection, subscription_id: str) -> Subscription:
    row = await conn.fetchrow(
        f"SELECT {_COLUMNS} FROM delivery.subscriptions WHERE id = $1", subscription_id
    )
    if row is None:
        raise NotFoundError(f"subscription {subscription_id!r} does not exist")
    return Subscription.from_row(row)


async def set_state(
    conn: asyncpg.Connection,
    subscription_id: str,
    state: SubscriptionState,
    *,
    reason: str | None = None,
) -> Subscription:
    row = await conn.fetchrow(
        f"""
        UPDATE delivery.subscriptions
        SET state = $2, disabled_reason = CASE WHEN $2 = 'disabled' THEN $3 END, updated_at = now(),
            consecutive_failures = 0, circuit_state = 'closed', circuit_retry_at = NULL,
            failing_since = NULL
        WHERE id = $1
        RETURNING {_COLUMNS}
        """,
        subscription_id,
        state,
        reason,
    )
    if row is None:
        raise NotFoundError(f"subscription {subscription_id!r} does not exist")
    return Subscription.from_row(row)


async def rotate_secret(
    conn: asyncpg.Connection, subscription_id: str, *, grace_s: float, new_secret: str | None = None
) -> Subscription:
    if new_secret is not None:
        secret_key(new_secret)
    row = await conn.fetchrow(
        f"""
        UPDATE delivery.subscriptions
        SET previous_secret = secret, secret = $2,
            previous_secret_expires_at = now() + make_interval(secs => $3), updated_at = now()
        WHERE id = $1
        RETURNING {_COLUMNS}
        """,
        subscription_id,
        new_secret or generate_secret(),
        grace_s,
    )
    if row is None:
        raise NotFoundError(f"subscription {subscription_id!r} does not exist")
    return Subscription.from_row(row)


async def remove(conn: asyncpg.Connection, subscription_id: str) -> None:
    result = await conn.execute("DELETE FROM delivery.subscriptions WHERE id = $1", subscription_id)
    if result.endswith(" 0"):
        raise NotFoundError(f"subscription {subscription_id!r} does not exist")
