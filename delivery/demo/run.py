"""``delivery demo``: the whole platform on this machine, for a newcomer to watch.

Throwaway PostgreSQL and RabbitMQ (or the servers named by the environment, then in a database
and a queue prefix of the demo's own, removed afterwards), a local receiver that verifies every
signature, three subscriptions, a few thousand realistic trade and account events published
through the transactional outbox, live progress, and a summary that checks every delivery.

Narration and progress go to standard error; the summary goes to standard output.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import random
import secrets
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from decimal import Decimal
from typing import Any
from urllib.parse import urlsplit

import aio_pika
import asyncpg

from delivery.broker.topology import Names
from delivery.events import NewEvent
from delivery.ops.health import Health
from delivery.ops.logs import configure_logging
from delivery.outbox import publish_many, validate_all
from delivery.settings import Settings
from delivery.store.migrations import migrate
from delivery.store.subscriptions import Subscription, add
from delivery.testing.receiver import Receiver
from delivery.testing.services import (
    ProvisionError,
    Services,
    create_database,
    drop_database,
    provision_services,
)

ACCOUNTS = tuple(f"acc_{n:03d}" for n in range(1, 21))
WATCHED_ACCOUNT = ACCOUNTS[0]
BATCH_SIZE = 200  # events per publishing transaction
PUBLISH_RATE_PER_S = 1_000  # a steady producer, so deliveries arrive while it publishes
READY_TIMEOUT_S = 20.0  # for the relay and workers to connect
STALL_TIMEOUT_S = 30.0  # give up when no delivery arrives for this long
OK_LINE = "OK: every event delivered, every signature verified"

_INSTRUMENTS = {"BTC-USD": 67_000, "ETH-USD": 3_500, "SOL-USD": 150, "EUR-USD": 1}
_CENT = Decimal("0.01")


@dataclass(frozen=True)
class _Route:
    """One demo subscription: where the receiver hears it and what it asks for."""

    name: str
    path: str
    patterns: str
    account_id: str | None = None


ROUTES = (
    _Route("trades", "/trades", "trade.*"),
    _Route(f"{WATCHED_ACCOUNT} balances", "/balances", "account.balance_changed", WATCHED_ACCOUNT),
    _Route("everything", "/everything", "*"),
)


def say(line: str) -> None:
    sys.stderr.write(f"  {line}\n")
    sys.stderr.flush()


# -- the events -------------------------------------------------------------------------------


def realistic_events(count: int, rng: random.Random) -> list[dict[str, Any]]:
    """Every account opens first; then trades, cancellations and balance changes, with money as
    decimal strings and balances that add up."""
    events: list[dict[str, Any]] = [
        {
            "type": "account.created",
            "account_id": account,
            "data": {"owner": f"owner of {account}", "currency": "USD"},
        }
        for account in ACCOUNTS
    ]
    balances = dict.fromkeys(ACCOUNTS, Decimal("10000.00"))
    while len(events) < count:
        account = rng.choice(ACCOUNTS)
        n = len(events)
        roll = rng.random()
        if roll < 0.45:
            instrument = rng.choice(list(_INSTRUMENTS))
            mid = _INSTRUMENTS[instrument]
            price = Decimal(str(mid * rng.uniform(0.97, 1.03))).quantize(_CENT)
            events.append(
                {
                    "type": "trade.executed",
                    "account_id": account,
                    "data": {
                        "trade_id": f"trd_{n:06d}",
                        "order_id": f"ord_{n:06d}",
                        "instrument": instrument,
                        "side": rng.choice(["buy", "sell"]),
                        "quantity": rng.choice(["0.0100", "0.2500", "1.0000", "3.5000"]),
                        "price": str(price),
                        "executed_at": datetime.now(UTC).isoformat(),
                    },
                }
            )
        elif roll < 0.55:
            events.append(
                {
                    "type": "trade.cancelled",
                    "account_id": account,
                    "data": {
                        "trade_id": f"trd_{n:06d}",
                        "order_id": f"ord_{n:06d}",
                        "reason": rng.choice(["user", "risk", "expired"]),
                    },
                }
            )
        else:
            delta = Decimal(rng.randint(-25_000, 25_000)) / 100
            if balances[account] + delta < 0:
                delta = -delta
            balances[account] += delta
            if delta >= 0:
                reason = rng.choice(["deposit", "trade", "adjustment"])
            else:
                reason = rng.choice(["withdrawal", "trade", "fee"])
            events.append(
                {
                    "type": "account.balance_changed",
                    "account_id": account,
                    "data": {
                        "asset": "USD",
                        "delta": str(delta),
                        "balance": str(balances[account]),
                        "reason": reason,
                    },
                }
            )
    return events[:count]


# -- progress ---------------------------------------------------------------------------------


def _bar(done: int, total: int, width: int = 24) -> str:
    filled = min(width, width * done // total) if total else width
    return "[" + "#" * filled + "." * (width - filled) + "]"


@dataclass
class _Progress:
    """Redrawn in place on a terminal (10 times a second); elsewhere one line a second."""

    receiver: Receiver
    total_events: int
    total_deliveries: int
    published: int = 0
    tty: bool = field(default_factory=sys.stderr.isatty)

    def line(self) -> str:
        delivered = self.receiver.delivered_count()
        return (
            f"  {_bar(self.published, self.total_events)} "
            f"{self.published:>{len(f'{self.total_events:,}')},}/{self.total_events:,} published"
            f"   {_bar(delivered, self.total_deliveries)} "
            f"{delivered:>{len(f'{self.total_deliveries:,}')},}/{self.total_deliveries:,}"
            " delivered"
        )

    def draw(self) -> None:
        sys.stderr.write(("\r" + self.line()) if self.tty else (self.line() + "\n"))
        sys.stderr.flush()

    async def run(self, done: asyncio.Event) -> None:
        interval_s = 0.1 if self.tty else 1.0
        while not done.is_set():
            self.draw()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(done.wait(), interval_s)
        self.draw()
        if self.tty:
            sys.stderr.write("\n")


# -- the run ----------------------------------------------------------------------------------


async def run_demo(*, events: int = 3000, keep: bool = False) -> int:
    """Run the demo; 0 when every event reached every matching subscription, correctly signed."""
    if events < len(ACCOUNTS):
        sys.stderr.write(f"delivery demo: --events must be at least {len(ACCOUNTS)}\n")
        return 2
    configure_logging("console", "warning")
    began = time.time()
    sys.stderr.write(
        "delivery demo: producer -> outbox (PostgreSQL) -> relay -> RabbitMQ -> workers"
        " -> signed webhooks -> a local receiver\n"
    )
    say("looking for PostgreSQL and RabbitMQ (throwaway ones start in about 6 s)...")
    with contextlib.ExitStack() as stack:
        try:
            services = await _provision(stack)
        except ProvisionError as exc:
            sys.stderr.write(f"delivery demo: could not get PostgreSQL and RabbitMQ: {exc}\n")
            return 1
        # A database and a queue prefix of the demo's own: on someone's real servers nothing
        # of theirs is touched, and everything is removed afterwards (unless --keep).
        suffix = secrets.token_hex(4)
        db_name, prefix = f"demo_{suffix}", f"demo-{suffix}"
        try:
            database_url = await create_database(services.database_url, db_name)
        except (OSError, asyncpg.PostgresError) as exc:
            sys.stderr.write(
                f"delivery demo: cannot create database {db_name} on "
                f"{_where(services.database_url)}: {exc}\n"
                "  (unset DELIVERY_DATABASE_URL and DELIVERY_AMQP_URL to use throwaway servers)\n"
            )
            return 1
        interrupted = False
        try:
            return await _run(
                database_url=database_url,
                amqp_url=services.amqp_url,
                prefix=prefix,
                count=events,
                began=began,
            )
        except asyncio.CancelledError:  # Ctrl-C
            interrupted = True
            raise
        finally:
            if keep:
                say("--keep: everything is left in place; to look around:")
                say(
                    f"  export DELIVERY_DATABASE_URL={database_url} "
                    f"DELIVERY_AMQP_URL={services.amqp_url} DELIVERY_AMQP_PREFIX={prefix}"
                )
                say("  delivery status; delivery subscriptions list")
                if services.source != "env":
                    say(
                        f"  the throwaway servers ({_where(services.database_url)}, "
                        f"{_where(services.amqp_url)}) keep running until you stop them"
                    )
                stack.pop_all()
            else:
                say("interrupted; cleaning up..." if interrupted else "cleaning up...")
                with contextlib.suppress(Exception):
                    await drop_database(services.database_url, db_name)
                await _delete_broker_objects(services.amqp_url, Names(prefix))
                await asyncio.to_thread(stack.close)
            say(f"done in {time.time() - began:.1f} s")


async def _provision(stack: contextlib.ExitStack) -> Services:
    """Enter ``provision_services`` in a thread (starting servers blocks for seconds). On Ctrl-C
    the thread cannot be stopped: let it finish, so that ``stack`` tears down what it started."""
    entering = asyncio.ensure_future(
        asyncio.to_thread(stack.enter_context, provision_services(progress=say))
    )
    try:
        return await asyncio.shield(entering)
    except asyncio.CancelledError:
        with contextlib.suppress(BaseException):
            await entering
        raise


def _where(url: str) -> str:
    parts = urlsplit(url)
    return f"{parts.hostname}:{parts.port}"


async def _delete_broker_objects(amqp_url: str, names: Names) -> None:
    """Leave a shared broker as we found it (best effort: a throwaway one goes away anyway)."""
    with contextlib.suppress(Exception):
        connection = await aio_pika.connect(amqp_url, timeout=5)
        async with connection:
            channel = await connection.channel()
            for queue in (names.dispatch_queue, names.dead_queue):
                await channel.queue_delete(queue)
            for exchange in (names.events_exchange, names.dead_exchange):
                await channel.exchange_delete(exchange)


async def _run(*, database_url: str, amqp_url: str, prefix: str, count: int, began: float) -> int:
    await migrate(database_url)
    say(f"created database {urlsplit(database_url).path.lstrip('/')} and migrated it")
    conn = await asyncpg.connect(database_url)
    try:
        async with Receiver() as receiver:
            subs: dict[_Route, Subscription] = {}
            for route in ROUTES:
                sub = await add(
                    conn,
                    url=receiver.url(route.path),
                    patterns=route.patterns,
                    account_id=route.account_id,
                )
                receiver.expect_secret(route.path, sub.secret)
                subs[route] = sub
            say(f"a receiver on {receiver.url('')} checks every Standard Webhooks signature")
            say(f"{len(subs)} subscriptions, each with its own whsec_ secret:")
            name_w = max(len(route.name) for route in subs)
            events_w = max(len(_describe(sub)) for sub in subs.values())
            for route, sub in subs.items():
                say(f"  {route.name:<{name_w}}  {_describe(sub):<{events_w}}  -> {route.path}")

            batch = validate_all(realistic_events(count, random.Random(7)))
            expected = {
                route: {e.id for e in batch if sub.matches(e.type, e.account_id)}
                for route, sub in subs.items()
            }
            settings = Settings(
                database_url=database_url,
                amqp_url=amqp_url,
                amqp_prefix=prefix,
                admin_port=0,
                log_format="console",
                log_level="warning",
                relay_poll_interval_s=0.2,
                scheduler_poll_interval_s=0.2,
                # Deliveries to a local receiver finish in milliseconds: a short drain deadline
                # keeps the exit quick even when something is wrong.
                shutdown_timeout_s=5,
            )
            progress = _Progress(receiver, len(batch), sum(len(ids) for ids in expected.values()))
            outcome = await _with_platform(
                settings=settings,
                conn=conn,
                batch=batch,
                receiver=receiver,
                expected=expected,
                progress=progress,
            )
            if isinstance(outcome, str):
                sys.stderr.write(f"delivery demo: {outcome}\n")
                return 1
            run = outcome
            return _summary(receiver, subs, expected, run, began)
    finally:
        await conn.close()


async def _with_platform(
    *,
    settings: Settings,
    conn: asyncpg.Connection,
    batch: list[NewEvent],
    receiver: Receiver,
    expected: dict[_Route, set[str]],
    progress: _Progress,
) -> _RunTimes | str:
    """Run the platform process (``delivery run``, in this event loop) while publishing and
    waiting; then drain and stop it. A string says what went wrong."""
    from workers.process import run_process  # the embedding API of `delivery run`

    stop = asyncio.Event()
    health: list[Health] = []
    outcome: _RunTimes | str = "the platform process stopped before the end"
    try:
        async with asyncio.TaskGroup() as tg:
            tg.create_task(
                run_process(
                    settings,
                    relay=True,
                    worker=True,
                    stop=stop,
                    ready=health.append,
                    handle_signals=False,
                ),
                name="delivery run",
            )
            try:
                not_ready = await _wait_ready(health)
                if not_ready is not None:
                    outcome = not_ready
                else:
                    say("relay + dispatch + delivery workers are running (`delivery run`)")
                    say(
                        f"publishing {len(batch):,} events for {len(ACCOUNTS)} accounts, "
                        f"{BATCH_SIZE} per transaction, about {PUBLISH_RATE_PER_S:,} a second:"
                    )
                    outcome = await _publish_and_wait(
                        conn=conn,
                        batch=batch,
                        receiver=receiver,
                        expected=expected,
                        progress=progress,
                        tg=tg,
                    )
            finally:
                stop.set()  # drain and stop the platform process
    except* Exception as group:
        first = group.exceptions[0]
        outcome = f"stopped by an error: {type(first).__name__}: {first}"
    return outcome


def _describe(sub: Subscription) -> str:
    text = ",".join(sub.event_patterns)
    return f"{text} (account {sub.account_id})" if sub.account_id else text


async def _wait_ready(health: list[Health]) -> str | None:
    """``None`` once the relay and workers are connected, else why not (after a deadline)."""
    deadline = time.monotonic() + READY_TIMEOUT_S
    while not (health and health[0].ready):
        if time.monotonic() > deadline:
            report = health[0].report() if health else {"components": "not started"}
            return f"the platform did not become ready in {READY_TIMEOUT_S:.0f} s: {report}"
        await asyncio.sleep(0.05)
    return None


@dataclass(frozen=True)
class _RunTimes:
    commit_at: dict[str, float]  # event id -> time.time() just after its transaction committed
    first_publish_at: float
    published_in_s: float
    transactions: int
    stalled: bool


async def _publish_and_wait(
    *,
    conn: asyncpg.Connection,
    batch: list[NewEvent],
    receiver: Receiver,
    expected: dict[_Route, set[str]],
    progress: _Progress,
    tg: asyncio.TaskGroup,
) -> _RunTimes:
    drawn = asyncio.Event()
    drawer = tg.create_task(progress.run(drawn))
    commit_at: dict[str, float] = {}
    first_publish_at, started = time.time(), time.monotonic()
    transactions = 0
    for n, start in enumerate(range(0, len(batch), BATCH_SIZE)):
        # A steady producer: batch n leaves at n * BATCH_SIZE / rate seconds.
        due = started + n * BATCH_SIZE / PUBLISH_RATE_PER_S
        if (pause_s := due - time.monotonic()) > 0:
            await asyncio.sleep(pause_s)
        chunk = batch[start : start + BATCH_SIZE]
        async with conn.transaction():
            result = await publish_many(conn, chunk)
        committed = time.time()
        transactions += 1
        commit_at.update(dict.fromkeys(result.published, committed))
        progress.published += len(chunk)
    published_in_s = time.time() - first_publish_at

    wanted = {route.path: len(ids) for route, ids in expected.items()}

    def complete(r: Receiver) -> bool:
        return all(r.unique_count(path) >= n for path, n in wanted.items())

    stalled = False
    while True:
        before = receiver.delivered_count()
        try:
            await receiver.wait_for(complete, STALL_TIMEOUT_S, "every delivery")
            break
        except TimeoutError:
            if receiver.delivered_count() == before:  # nothing at all for the whole wait
                stalled = True
                break
    drawn.set()
    await drawer
    return _RunTimes(commit_at, first_publish_at, published_in_s, transactions, stalled)


# -- the summary ------------------------------------------------------------------------------


def out(line: str) -> None:
    sys.stdout.write(line + "\n")


def _percentile(ordered: list[float], fraction: float) -> float:
    """Nearest-rank percentile of an ascending list."""
    return ordered[max(0, math.ceil(fraction * len(ordered)) - 1)]


def _table(rows: list[tuple[str, ...]], right: set[int]) -> Iterator[str]:
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    for row in rows:
        cells = [
            c.rjust(w) if i in right else c.ljust(w)
            for i, (c, w) in enumerate(zip(row, widths, strict=True))
        ]
        yield "  ".join(cells).rstrip()


def _summary(
    receiver: Receiver,
    subs: dict[_Route, Subscription],
    expected: dict[_Route, set[str]],
    run: _RunTimes,
    began: float,
) -> int:
    rows, failures = _check(receiver, subs, expected)
    if run.stalled:
        failures.append(f"nothing arrived for {STALL_TIMEOUT_S:.0f} s; gave up waiting")
    out("")
    out(
        f"published {len(run.commit_at):,} events for {len(ACCOUNTS)} accounts in "
        f"{run.transactions:,} transactions over {run.published_in_s:.1f} s"
    )
    out("")
    for line in _table(rows, right={2, 3, 4, 5}):
        out(line)
    out("")
    for line in _timings(receiver, run):
        out(line)
    out(f"wall time   {time.time() - began:.1f} s for the whole demo so far")
    out("FAILED: " + "; ".join(failures) if failures else OK_LINE)
    sys.stdout.flush()  # before the clean-up narration on standard error
    return 1 if failures else 0


def _check(
    receiver: Receiver, subs: dict[_Route, Subscription], expected: dict[_Route, set[str]]
) -> tuple[list[tuple[str, ...]], list[str]]:
    """The table's rows, and what is wrong: an event missing or sent where it should not
    go, a signature that does not verify, a request nobody should have sent."""
    failures: list[str] = []
    rows: list[tuple[str, ...]] = [
        ("subscription", "events", "expected", "delivered", "duplicates", "bad signatures")
    ]
    totals = [0, 0, 0, 0]
    for route, sub in subs.items():
        want = expected[route]
        got = receiver.unique_ids(route.path)
        dupes = sum(n - 1 for n in receiver.duplicates(route.path).values())
        bad = sum(1 for a in receiver.arrivals if a.path == route.path and not a.signature_ok)
        counts = (len(want), len(got & want), dupes, bad)
        rows.append((route.name, _describe(sub), *(f"{n:,}" for n in counts)))
        totals = [t + n for t, n in zip(totals, counts, strict=True)]
        if missing := len(want - got):
            failures.append(f"{route.name}: {missing:,} of {len(want):,} events not delivered")
        if unexpected := len(got - want):
            failures.append(f"{route.name}: {unexpected:,} events it did not subscribe to")
        if bad:
            failures.append(f"{route.name}: {bad:,} requests failed signature verification")
    rows.append(("total", "", *(f"{n:,}" for n in totals)))
    paths = {route.path for route in subs}
    if strays := sum(1 for a in receiver.arrivals if a.path not in paths):
        failures.append(f"{strays:,} requests to paths no subscription uses")
    return rows, failures


def _timings(receiver: Receiver, run: _RunTimes) -> Iterator[str]:
    delivered = receiver.delivered()
    if not delivered:
        return
    last_arrival = max(a.arrived_at for a in delivered)
    span_s = last_arrival - run.first_publish_at
    yield (
        f"throughput  {len(delivered):,} deliveries in {span_s:.1f} s = "
        f"{len(delivered) / span_s:,.0f} deliveries/s (first publish to last arrival)"
    )
    first_arrivals: dict[tuple[str, str], float] = {}
    for arrival in delivered:
        first_arrivals.setdefault((arrival.path, arrival.webhook_id), arrival.arrived_at)
    latencies = sorted(
        at - run.commit_at[webhook_id]
        for (_path, webhook_id), at in first_arrivals.items()
        if webhook_id in run.commit_at
    )
    if not latencies:
        return
    yield (
        "latency     publish commit -> subscriber's 2xx: "
        f"p50 {_percentile(latencies, 0.50) * 1000:,.0f} ms, "
        f"p99 {_percentile(latencies, 0.99) * 1000:,.0f} ms, "
        f"max {latencies[-1] * 1000:,.0f} ms"
    )
    if last_arrival - max(run.commit_at.values()) > 1.0:
        yield (
            "            (mostly time in line: the events were published faster than this"
            " machine delivered them)"
        )
