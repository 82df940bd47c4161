"""``delivery demo``: the whole platform on this machine, for a newcomer to watch.

Throwaway PostgreSQL and RabbitMQ (or the ones named by the environment, in a fresh database and
queue prefix), a local receiver that verifies every signature, three subscriptions, a few
thousand realistic trade and account events, live progress, and a summary.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import secrets
import statistics
import sys
import time
from collections.abc import Callable
from typing import Any

import asyncpg

from delivery.health import Health
from delivery.logs import configure_logging
from delivery.migrate import migrate
from delivery.outbox import publish_many
from delivery.provision import create_database, drop_database, provision_services
from delivery.receiver import Receiver
from delivery.settings import Settings
from delivery.subscriptions import Subscription, add

ACCOUNTS = [f"acc_{n:03d}" for n in range(1, 21)]
WATCHED_ACCOUNT = ACCOUNTS[0]
_BATCH = 200
_DEADLINE_S = 90.0


def say(line: str) -> None:
    sys.stderr.write(f"  {line}\n")
    sys.stderr.flush()


def _bar(done: int, total: int, width: int = 30) -> str:
    filled = int(width * done / total) if total else width
    return "[" + "#" * filled + "." * (width - filled) + "]"


def realistic_events(count: int, rng: random.Random) -> list[dict[str, Any]]:
    """Each account opens first, then trades, cancellations and balance changes."""
    events: list[dict[str, Any]] = [
        {
            "type": "account.created",
            "account_id": a,
            "data": {"owner": f"owner of {a}", "currency": "USD"},
        }
        for a in ACCOUNTS
    ]
    balances = dict.fromkeys(ACCOUNTS, 10_000.0)
    instruments = ["BTC-USD", "ETH-USD", "SOL-USD", "EUR-USD"]
    while len(events) < count:
        account = rng.choice(ACCOUNTS)
        n = len(events)
        roll = rng.random()
        if roll < 0.45:
            quantity = rng.choice(["0.0100", "0.2500", "1.0000", "3.5000"])
            events.append(
                {
                    "type": "trade.executed",
                    "account_id": account,
                    "data": {
                        "trade_id": f"trd_{n:06d}",
                        "order_id": f"ord_{n:06d}",
                        "instrument": rng.choice(instruments),
                        "side": rng.choice(["buy", "sell"]),
                        "quantity": quantity,
                        "price": f"{rng.uniform(10, 70000):.2f}",
                        "executed_at": "2026-11-23T10:00:00Z",
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
            delta = round(rng.uniform(-250, 250), 2)
            balances[account] += delta
            events.append(
                {
                    "type": "account.balance_changed",
                    "account_id": account,
                    "data": {
                        "asset": "USD",
                        "delta": f"{delta:.2f}",
                        "balance": f"{balances[account]:.2f}",
                        "reason": rng.choice(["deposit", "withdrawal", "trade", "fee"]),
                    },
                }
            )
    return events[:count]


async def run_demo(*, events: int = 3000, keep: bool = False) -> int:
    from workers.process import run_process

    if events < len(ACCOUNTS):
        sys.stderr.write(f"delivery demo: --events must be at least {len(ACCOUNTS)}\n")
        return 2
    configure_logging("console", "warning")
    began = time.time()
    sys.stderr.write("delivery demo: outbox -> relay -> RabbitMQ -> workers -> signed webhooks\n")
    with contextlib.ExitStack() as stack:
        say("finding PostgreSQL and RabbitMQ (throwaway ones start in about 6 s)...")
        services = await asyncio.to_thread(stack.enter_context, provision_services(progress=say))
        say(f"services: {services.source}")
        name = f"demo_{secrets.token_hex(4)}"
        database_url = services.database_url
        if services.source == "env":
            # Someone's real server: work in a database of our own, dropped afterwards.
            database_url = await create_database(services.database_url, name)
        try:
            return await _demo(
                database_url=database_url,
                amqp_url=services.amqp_url,
                prefix=name,
                count=events,
                run_process=run_process,
                began=began,
            )
        finally:
            if services.source == "env" and not keep:
                with contextlib.suppress(Exception):
                    await drop_database(services.database_url, name)
            if keep:
                say(f"--keep: DELIVERY_DATABASE_URL={database_url}")
                say(f"--keep: DELIVERY_AMQP_URL={services.amqp_url} DELIVERY_AMQP_PREFIX={name}")
                stack.pop_all()
            else:
                say("tearing down...")
                await asyncio.to_thread(stack.close)
    return 1  # pragma: no cover - the with block always returns


async def _demo(
    *,
    database_url: str,
    amqp_url: str,
    prefix: str,
    count: int,
    run_process: Callable[..., Any],
    began: float,
) -> int:
    await migrate(database_url)
    say("migrated the database (schema `delivery`)")
    conn = await asyncpg.connect(database_url)
    try:
        async with Receiver() as receiver:
            subs: dict[str, Subscription] = {}
            plan = [
                ("trades", "/trades", "trade.*", None),
                (
                    f"{WATCHED_ACCOUNT} balances",
                    "/balances",
                    "account.balance_changed",
                    WATCHED_ACCOUNT,
                ),
                ("everything", "/everything", "*", None),
            ]
            for label, path, pattern, account in plan:
                sub = await add(conn, url=receiver.url(path), patterns=pattern, account_id=account)
                receiver.expect_secret(path, sub.secret)
                subs[label] = sub
            say(f"receiver on {receiver.url('/')} verifying Standard Webhooks signatures")
            for label, sub in subs.items():
                say(f"subscription {sub.id}: {label:<22} {','.join(sub.event_patterns)}")

            settings = Settings(
                database_url=database_url,
                amqp_url=amqp_url,
                amqp_prefix=prefix,
                admin_port=0,
                log_format="console",
                log_level="warning",
                relay_poll_interval_s=0.2,
                scheduler_poll_interval_s=0.2,
            )
            stop = asyncio.Event()
            holder: list[Health] = []
            rng = random.Random(7)
            batch = realistic_events(count, rng)
            expected = {
                label: sum(sub.matches(e["type"], e["account_id"]) for e in batch)
                for label, sub in subs.items()
            }
            total_expected = sum(expected.values())
            commit_times: dict[str, float] = {}
            async with asyncio.TaskGroup() as tg:
                tg.create_task(
                    run_process(
                        settings,
                        relay=True,
                        worker=True,
                        stop=stop,
                        ready=holder.append,
                        handle_signals=False,
                    )
                )
                say("started relay + dispatch + delivery workers (`delivery run`, in-process)")
                first_publish = time.time()
                for start in range(0, len(batch), _BATCH):
                    chunk = batch[start : start + _BATCH]
                    async with conn.transaction():
                        result = await publish_many(conn, chunk)
                    now = time.time()
                    commit_times.update(dict.fromkeys(result.published, now))
                    _progress(
                        start + len(chunk), len(batch), len(receiver.delivered()), total_expected
                    )
                deadline = time.monotonic() + _DEADLINE_S
                while len(receiver.delivered()) < total_expected and time.monotonic() < deadline:
                    _progress(len(batch), len(batch), len(receiver.delivered()), total_expected)
                    with contextlib.suppress(TimeoutError):
                        await receiver.wait_for(
                            lambda r: len(r.delivered()) >= total_expected,
                            timeout_s=0.25,
                            what="every delivery",
                        )
                _progress(len(batch), len(batch), len(receiver.delivered()), total_expected)
                if sys.stderr.isatty():
                    sys.stderr.write("\n")
                stop.set()
            return _summary(
                receiver=receiver,
                subs=subs,
                plan=plan,
                expected=expected,
                commit_times=commit_times,
                first_publish=first_publish,
                began=began,
            )
    finally:
        await conn.close()


_last_progress = [0.0]


def _progress(published: int, total: int, delivered: int, expected: int) -> None:
    """Redraw in place on a terminal (10 times a second); elsewhere a line a second."""
    tty = sys.stderr.isatty()
    now = time.monotonic()
    done = published == total and delivered >= expected
    if not done and now - _last_progress[0] < (0.1 if tty else 1.0):
        return
    _last_progress[0] = now
    sys.stderr.write(
        f"{chr(13) if tty else ''}  {_bar(published, total)} {published:>6,}/{total:,} published"
        f"   {_bar(delivered, expected)} {delivered:>6,}/{expected:,} delivered"
        f"{'' if tty else chr(10)}"
    )
    sys.stderr.flush()


def _summary(
    *,
    receiver: Receiver,
    subs: dict[str, Subscription],
    plan: list[tuple[str, str, str, str | None]],
    expected: dict[str, int],
    commit_times: dict[str, float],
    first_publish: float,
    began: float,
) -> int:
    delivered = receiver.delivered()
    paths = {label: path for label, path, _p, _a in plan}
    out = sys.stdout
    out.write("\n")
    out.write(
        f"{'subscription':<24} {'events':<36} {'expected':>8} {'delivered':>9} "
        f"{'dupes':>6} {'bad sig':>7}\n"
    )
    failures: list[str] = []
    for label, sub in subs.items():
        path = paths[label]
        got = receiver.unique_ids(path)
        dupes = sum(n - 1 for n in receiver.duplicates(path).values())
        bad = sum(1 for a in receiver.arrivals if a.path == path and a.signature_ok is not True)
        events_text = ",".join(sub.event_patterns) + (
            f" ({sub.account_id})" if sub.account_id else ""
        )
        out.write(
            f"{label:<24} {events_text:<36} {expected[label]:>8,} {len(got):>9,} "
            f"{dupes:>6} {bad:>7}\n"
        )
        if len(got) != expected[label]:
            failures.append(f"{label}: {len(got)}/{expected[label]} delivered")
        if bad:
            failures.append(f"{label}: {bad} bad signatures")
    latencies = sorted(
        a.arrived_at - commit_times[a.webhook_id] for a in delivered if a.webhook_id in commit_times
    )
    if delivered:
        span = max(a.arrived_at for a in delivered) - first_publish
        out.write(
            f"\n{len(commit_times):,} events published, {len(delivered):,} deliveries "
            f"in {span:.1f} s = {len(delivered) / span:,.0f} deliveries/s\n"
        )
    if latencies:
        p99 = latencies[min(len(latencies) - 1, int(len(latencies) * 0.99))]
        out.write(
            "latency publish-commit -> subscriber: "
            f"p50 {statistics.median(latencies) * 1000:,.0f} ms, p99 {p99 * 1000:,.0f} ms\n"
        )
    out.write(f"whole demo: {time.time() - began:.1f} s\n")
    if failures:
        out.write("FAILED: " + "; ".join(failures) + "\n")
        return 1
    out.write("OK: every event delivered, every signature verified\n")
    return 0
