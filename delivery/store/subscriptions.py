"""Subscriptions: who gets which events, where, signed with which secrets.

Each belongs to a tenant and is matched only to that tenant's events. Every function here acts
within one tenant (``tenant_id``, ``default`` unless named): another tenant's subscription is
answered exactly as an id that does not exist, so nothing tells the two apart.
"""

from __future__ import annotations

import fnmatch
import re
import secrets
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from datetime import datetime
from typing import Any

import asyncpg
from pydantic import TypeAdapter, ValidationError

from delivery.durations import check_schedule_s
from delivery.errors import ConfigError, InputError, NotFoundError, QuotaExceededError
from delivery.events import EVENT_TYPES, AccountId, format_timestamp
from delivery.secrets import KEYS_VARIABLE, NO_KEYS, SecretBox, is_sealed
from delivery.settings import MAX_HTTP_TIMEOUT_S
from delivery.signing import Signing, SigningKey, generate, public_key, signing_key, validate
from delivery.store.dead_letters import park_pending
from delivery.store.states import CircuitState, SubscriptionState
from delivery.store.tenants import DEFAULT_TENANT
from delivery.targets import canonical_url, mask_url

_PATTERN = re.compile(r"^[a-z0-9_.*?\[\]-]+$")
_ACCOUNT_ID: TypeAdapter[str] = TypeAdapter(AccountId)
FIELDS = (
    "id",
    "tenant_id",
    "url",
    "event_patterns",
    "account_id",
    "state",
    "disabled_reason",
    "secret",
    "previous_secret",
    "previous_secret_expires_at",
    "signing",
    "ordered",
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
    tenant_id: str
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
    signing: Signing = Signing.HMAC  # ed25519: secret is a whsk_ key (v1a signatures)
    # Per account, event N+1 waits until N was delivered or skipped (migration 0022).
    ordered: bool = False

    @classmethod
    def from_row(cls, row: Any, prefix: str = "", *, box: SecretBox = NO_KEYS) -> Subscription:
        """A loaded row; its secrets opened by ``box`` (once per sealed value: it memoises)."""
        values = {f: row[prefix + f] for f in FIELDS}
        values["secret"] = box.open(values["secret"])
        if values["previous_secret"] is not None:
            values["previous_secret"] = box.open(values["previous_secret"])
        values["signing"] = Signing(values["signing"])
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

    def signing_keys(self, now: datetime) -> list[SigningKey]:
        """The current secret, plus the previous one while its grace period lasts."""
        secrets_ = [self.secret]
        if (
            self.previous_secret
            and self.previous_secret_expires_at is not None
            and self.previous_secret_expires_at > now
        ):
            secrets_.append(self.previous_secret)
        if any(is_sealed(s) for s in secrets_):  # retryable: the fix is the process's key
            raise ConfigError(f"{self.id}: its secret is sealed and no {KEYS_VARIABLE} opens it")
        return [signing_key(s) for s in secrets_]

    @property
    def public_key(self) -> str | None:
        """The ``whpk_`` key its subscriber verifies with (Ed25519 only; None if unopened)."""
        if self.signing != Signing.ED25519 or is_sealed(self.secret):
            return None
        return public_key(self.secret)

    def public_dict(self, *, with_secret: bool = False) -> dict[str, Any]:
        """For ``--json`` output: timestamps as RFC 3339; secrets only when asked for."""
        out = asdict(self)
        out["event_patterns"] = list(self.event_patterns)
        out["url"] = mask_url(self.url)  # a row from before credentials were refused
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
        if self.signing == Signing.ED25519:
            # The platform keeps the secret key; the public key is public, shown every time.
            out["public_key"] = self.public_key
            del out["secret"]
        elif not with_secret:
            del out["secret"]
        return out


_ID = re.compile(r"^[A-Za-z0-9_-]{1,64}$")


def new_subscription_id() -> str:
    return "sub_" + secrets.token_hex(8)


def parse_subscription_id(text: str) -> str:
    """A subscription id as typed: ``InputError`` unless it could be one (``sub_`` + hex)."""
    if not (text.isascii() and _ID.fullmatch(text)):
        raise InputError(f"{text!r} is not a subscription id (see `delivery subscriptions list`)")
    return text


def validate_url(url: str) -> str:
    """The canonical form of a subscription URL (see ``delivery.targets.canonical_url``)."""
    return canonical_url(url)


def validate_account_id(account_id: str | None) -> str | None:
    """A subscription's account follows the rules of an event's ``account_id``."""
    if account_id is None:
        return None
    try:
        return _ACCOUNT_ID.validate_python(account_id)
    except ValidationError as exc:
        raise InputError(f"account: {exc.errors()[0]['msg']}") from None


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
    tenant_id: str = DEFAULT_TENANT,
    url: str,
    patterns: str | Sequence[str],
    account_id: str | None = None,
    secret: str | None = None,
    retry_schedule_s: tuple[float, ...] | None = None,
    timeout_s: float | None = None,
    signing: Signing = Signing.HMAC,
    ordered: bool = False,
    box: SecretBox = NO_KEYS,
) -> Subscription:
    # Everything is checked before the row is written: a refusal writes nothing.
    url = validate_url(url)
    if timeout_s is not None and not 0 < timeout_s <= MAX_HTTP_TIMEOUT_S:
        raise InputError(f"timeout: must be between 0 and {MAX_HTTP_TIMEOUT_S:g} seconds")
    parsed = parse_patterns(patterns)
    account_id = validate_account_id(account_id)
    signing = Signing(signing)
    if secret is not None:
        validate(signing, secret)
    if retry_schedule_s is not None:
        try:
            retry_schedule_s = check_schedule_s(tuple(retry_schedule_s))
        except ValueError as exc:
            raise InputError(f"retry schedule: {exc}") from None
    # The tenant's row stays locked until the caller's transaction ends, so two concurrent adds
    # cannot both see room for one more (a savepoint when the caller has a transaction).
    async with conn.transaction():
        await _check_quota(conn, tenant_id)
        row = await conn.fetchrow(
            f"""
            INSERT INTO delivery.subscriptions
                (id, tenant_id, url, event_patterns, account_id, secret, retry_schedule_s,
                 timeout_s, signing, ordered)
            VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10)
            RETURNING {_COLUMNS}
            """,
            new_subscription_id(),
            tenant_id,
            url,
            list(parsed),
            account_id,
            box.seal(secret or generate(signing)),
            list(retry_schedule_s) if retry_schedule_s else None,
            timeout_s,
            signing,
            ordered,
        )
    return Subscription.from_row(row, box=box)


async def _check_quota(conn: asyncpg.Connection, tenant_id: str) -> None:
    """``QuotaExceededError`` when the tenant has ``max_subscriptions`` already (removed ones do
    not count); locks the tenant's row for the rest of the transaction. FOR NO KEY UPDATE:
    it excludes the next add, not the foreign-key checks of other writes naming the tenant."""
    quota = await conn.fetchrow(
        "SELECT max_subscriptions FROM delivery.tenants WHERE id = $1 FOR NO KEY UPDATE",
        tenant_id,
    )
    if quota is None:
        raise NotFoundError(f"tenant {tenant_id!r} does not exist")
    limit = quota["max_subscriptions"]
    if limit is None:
        return
    held = await conn.fetchval(
        "SELECT count(*) FROM delivery.subscriptions WHERE tenant_id = $1 AND state <> 'removed'",
        tenant_id,
    )
    if held >= limit:
        raise QuotaExceededError(
            f"tenant {tenant_id!r} has {held} subscription(s), its quota (max_subscriptions"
            f" {limit}): remove one or have the quota raised"
        )


async def list_all(
    conn: asyncpg.Connection, *, tenant_id: str = DEFAULT_TENANT, box: SecretBox = NO_KEYS
) -> list[Subscription]:
    """The tenant's subscriptions but the removed ones (whose rows only keep their history)."""
    rows = await conn.fetch(
        f"SELECT {_COLUMNS} FROM delivery.subscriptions WHERE tenant_id = $1"
        " AND state <> 'removed' ORDER BY created_at, id",
        tenant_id,
    )
    return [Subscription.from_row(r, box=box) for r in rows]


async def get(
    conn: asyncpg.Connection,
    subscription_id: str,
    *,
    tenant_id: str = DEFAULT_TENANT,
    box: SecretBox = NO_KEYS,
) -> Subscription:
    row = await conn.fetchrow(
        f"SELECT {_COLUMNS} FROM delivery.subscriptions WHERE id = $1 AND tenant_id = $2",
        subscription_id,
        tenant_id,
    )
    if row is None:
        raise NotFoundError(f"subscription {subscription_id!r} does not exist")
    if row["state"] == SubscriptionState.REMOVED:
        raise NotFoundError(f"subscription {subscription_id!r} was removed")
    return Subscription.from_row(row, box=box)


async def exists(
    conn: asyncpg.Connection, subscription_id: str, *, tenant_id: str = DEFAULT_TENANT
) -> None:
    """``NotFoundError`` unless the tenant's subscription exists (or was removed: its history
    stays)."""
    found = await conn.fetchval(
        "SELECT true FROM delivery.subscriptions WHERE id = $1 AND tenant_id = $2",
        subscription_id,
        tenant_id,
    )
    if not found:
        raise NotFoundError(f"subscription {subscription_id!r} does not exist")


async def set_state(
    conn: asyncpg.Connection,
    subscription_id: str,
    state: SubscriptionState,
    *,
    reason: str | None = None,
    tenant_id: str = DEFAULT_TENANT,
    box: SecretBox = NO_KEYS,
) -> Subscription:
    row = await conn.fetchrow(
        f"""
        UPDATE delivery.subscriptions
        SET state = $2, disabled_reason = CASE WHEN $2 = 'disabled' THEN $3 END, updated_at = now(),
            consecutive_failures = 0, circuit_state = 'closed', circuit_retry_at = NULL,
            failing_since = NULL
        WHERE id = $1 AND tenant_id = $4 AND state <> 'removed'
        RETURNING {_COLUMNS}
        """,
        subscription_id,
        state,
        reason,
        tenant_id,
    )
    if row is None:
        raise NotFoundError(await _missing(conn, subscription_id, tenant_id))
    return Subscription.from_row(row, box=box)


async def rotate_secret(
    conn: asyncpg.Connection,
    subscription_id: str,
    *,
    grace_s: float,
    new_secret: str | None = None,
    tenant_id: str = DEFAULT_TENANT,
    box: SecretBox = NO_KEYS,
) -> Subscription:
    async with conn.transaction():
        # Read under the row lock: the new secret is of the subscription's kind, and the
        # outgoing one is sealed too if it was written before the key was set.
        current = await conn.fetchrow(
            "SELECT secret, signing FROM delivery.subscriptions"
            " WHERE id = $1 AND tenant_id = $2 AND state <> 'removed' FOR UPDATE",
            subscription_id,
            tenant_id,
        )
        if current is None:
            raise NotFoundError(await _missing(conn, subscription_id, tenant_id))
        signing = Signing(current["signing"])
        if new_secret is not None:
            validate(signing, new_secret)
        row = await conn.fetchrow(
            f"""
            UPDATE delivery.subscriptions
            SET previous_secret = $4, secret = $2,
                previous_secret_expires_at = now() + make_interval(secs => $3), updated_at = now()
            WHERE id = $1
            RETURNING {_COLUMNS}
            """,
            subscription_id,
            box.seal(new_secret or generate(signing)),
            grace_s,
            box.seal(current["secret"]),
        )
    return Subscription.from_row(row, box=box)


async def _missing(conn: asyncpg.Connection, subscription_id: str, tenant_id: str) -> str:
    """Why ``subscription_id`` cannot be acted on: it never existed (for this tenant), or it
    was removed."""
    state = await conn.fetchval(
        "SELECT state FROM delivery.subscriptions WHERE id = $1 AND tenant_id = $2",
        subscription_id,
        tenant_id,
    )
    if state == SubscriptionState.REMOVED:
        return f"subscription {subscription_id!r} was removed"
    return f"subscription {subscription_id!r} does not exist"


async def remove(
    conn: asyncpg.Connection,
    subscription_id: str,
    *,
    keep_history: bool = True,
    tenant_id: str = DEFAULT_TENANT,
) -> None:
    """Stop delivering to a subscription. Its deliveries, attempts and dead letters stay (its
    pending deliveries become dead letters) unless ``keep_history`` is false: then the row and
    all of that are deleted, as they are for an already removed one."""
    if not keep_history:
        result = await conn.execute(
            "DELETE FROM delivery.subscriptions WHERE id = $1 AND tenant_id = $2",
            subscription_id,
            tenant_id,
        )
        if result.endswith(" 0"):
            raise NotFoundError(f"subscription {subscription_id!r} does not exist")
        return
    async with conn.transaction():
        removed = await conn.fetchval(
            """
            UPDATE delivery.subscriptions
            SET state = 'removed', disabled_reason = 'removed by operator', updated_at = now(),
                circuit_state = 'closed', circuit_retry_at = NULL, consecutive_failures = 0,
                failing_since = NULL
            WHERE id = $1 AND tenant_id = $2 AND state <> 'removed'
            RETURNING id
            """,
            subscription_id,
            tenant_id,
        )
        if removed is None:
            raise NotFoundError(await _missing(conn, subscription_id, tenant_id))
        await park_pending(conn, subscription_id, "subscription removed by operator")
