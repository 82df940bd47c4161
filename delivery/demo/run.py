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
import random
import secrets
import sys
import time
from pathlib import Path
from urllib.parse import urlsplit

import aio_pika
import asyncpg

from delivery.broker.topology import Names
from delivery.demo.drive import _with_platform
from delivery.demo.progress import _Progress, say
from delivery.demo.scenario import ACCOUNTS, ROUTES, _Route, realistic_events
from delivery.demo.summary import _describe, _summary
from delivery.ops.logs import configure_logging
from delivery.outbox import validate_all
from delivery.settings import Settings
from delivery.store.migrations import DEFAULT_MIGRATIONS_DIR, migrate
from delivery.store.subscriptions import Subscription, add
from delivery.testing.processes import ProvisionError
from delivery.testing.receiver import Receiver
from delivery.testing.services import Services, create_database, drop_database, provision_services


async def run_demo(
    *, events: int = 3000, keep: bool = False, migrations: Path = DEFAULT_MIGRATIONS_DIR
) -> int:
    """Run the demo; 0 when every event reached every matching subscription, correctly signed."""
    if events < len(ACCOUNTS):
        sys.stderr.write(f"delivery demo: --events must be at least {len(ACCOUNTS)}\n")
        return 2
    configure_logging("console", "warning", no_color=Settings().no_color)
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
                migrations=migrations,
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


async def _run(
    *,
    database_url: str,
    amqp_url: str,
    prefix: str,
    count: int,
    began: float,
    migrations: Path,
) -> int:
    await migrate(database_url, migrations)
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
                allow_private_targets=True,  # the demo's receiver listens on 127.0.0.1
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
