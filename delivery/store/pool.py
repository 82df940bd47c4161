"""PostgreSQL plumbing: pools, connection-class error detection, whole-transaction retries."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import TypeVar

import asyncpg
import structlog
from tenacity import (
    AsyncRetrying,
    retry_if_exception,
    stop_after_delay,
    wait_exponential_jitter,
)

from delivery.ops import metrics

log = structlog.get_logger("delivery.db")

T = TypeVar("T")

SCHEMA = "delivery"

# SQLSTATEs worth retrying the whole transaction on: admin shutdown / crash / cannot connect
# now (57P01-57P03), too many connections, serialization failure, deadlock.
_RETRYABLE_SQLSTATES = frozenset({"57P01", "57P02", "57P03", "53300", "40001", "40P01"})


def is_connection_error(exc: BaseException) -> bool:
    """True for errors after which the same transaction may succeed on a fresh connection."""
    if isinstance(exc, asyncpg.PostgresError):
        state = getattr(exc, "sqlstate", None) or ""
        return state.startswith("08") or state in _RETRYABLE_SQLSTATES
    return isinstance(
        exc,
        asyncpg.ConnectionDoesNotExistError
        | asyncpg.InterfaceError
        | asyncpg.exceptions.ConnectionFailureError
        # "cannot switch to state ...; another operation is in progress": the protocol state
        # was broken mid-COMMIT by a terminated backend; the pool discards that connection.
        | asyncpg.exceptions.InternalClientError
        | OSError
        | TimeoutError
        | ConnectionError,
    )


async def _no_session_reset(_conn: asyncpg.Connection) -> None:
    """Our pooled connections never LISTEN, take advisory locks or SET anything (LISTEN and
    the migration lock use connections of their own), so the default reset query on every
    release is a wasted round trip. asyncpg still rolls back an open transaction."""


# Which server a new connection landed on: its address, port and start time. A change means a
# failover (a multi-host URL found another primary) or a restart.
_SERVER = """
SELECT set_config('jit', 'off', false), inet_server_addr()::text, inet_server_port(),
       pg_postmaster_start_time()::text
"""
_server_seen: list[tuple[object, ...]] = []


async def _session_settings(conn: asyncpg.Connection) -> None:
    # JIT compiles a query whose estimated cost is high, every time it runs. With a
    # 1,000,000-row deliveries table the scheduler's claim crossed that line: 400-600 ms of
    # LLVM compiling per 2 ms claim, and a backlog drained at ~250 events/s. Nothing we run
    # gains from it. A setting rather than a startup parameter, which PgBouncer would refuse;
    # the same round trip says which server this is.
    row = await conn.fetchrow(_SERVER)
    server = tuple(row.values())[1:] if row is not None else ()
    if _server_seen and _server_seen[-1] != server:
        metrics.DATABASE_SERVER_CHANGES.inc()
        log.warning("database_server_changed", was=_server_seen[-1], now=server)
    _server_seen[:] = [server]


async def create_pool(url: str, *, min_size: int = 1, max_size: int = 10) -> asyncpg.Pool:
    """A pool whose connections fail fast on a dead server instead of hanging."""
    pool = await asyncpg.create_pool(
        url,
        min_size=min_size,
        max_size=max_size,
        command_timeout=60,
        timeout=10,
        reset=_no_session_reset,
        init=_session_settings,
    )
    assert pool is not None
    return pool


async def with_retries(
    pool: asyncpg.Pool,
    work: Callable[[asyncpg.Connection], Awaitable[T]],
    *,
    deadline_s: float = 60.0,
    what: str = "transaction",
    transaction: bool = True,
) -> T:
    """Run ``work(conn)`` in a fresh transaction, retrying the *whole* transaction on
    connection-class errors with backoff until ``deadline_s``; never on data errors.
    ``transaction=False`` is for work whose writes are one statement (atomic by itself; reads
    before it need no common snapshot): it saves the BEGIN and COMMIT round trips."""
    # The common case, first and without the retry machinery (this is on the hot path).
    try:
        return await _transaction(pool, work, what, transaction)
    except BaseException as exc:
        if not is_connection_error(exc):
            raise
    async for attempt in AsyncRetrying(
        retry=retry_if_exception(is_connection_error),
        wait=wait_exponential_jitter(multiplier=0.1, max=5.0),
        stop=stop_after_delay(deadline_s),
        reraise=True,
    ):
        with attempt:
            return await _transaction(pool, work, what, transaction)
    raise AssertionError("unreachable")  # pragma: no cover


async def _transaction(
    pool: asyncpg.Pool,
    work: Callable[[asyncpg.Connection], Awaitable[T]],
    what: str,
    transaction: bool,
) -> T:
    try:
        async with pool.acquire() as conn:
            if not transaction:
                return await work(conn)
            async with conn.transaction():
                return await work(conn)
    except BaseException as exc:
        if is_connection_error(exc):
            if _lost_connection(exc):
                # The pool does not ping idle connections: after a server restart every idle
                # one fails once. Drop them all now rather than one failure at a time.
                await pool.expire_connections()
            log.warning("db_retry", what=what, error=repr(exc)[:200])
        raise


def _lost_connection(exc: BaseException) -> bool:
    """Errors that say the link itself is gone (not a deadlock or serialisation failure)."""
    if isinstance(exc, asyncpg.PostgresError):
        state = getattr(exc, "sqlstate", None) or ""
        return state.startswith(("08", "57P"))
    return True
