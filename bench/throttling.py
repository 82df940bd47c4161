"""Throttling subscribers (429): how fast they get their events, and at what cost in attempts.

    python -m bench.throttling                  # both scenarios, 150 events each
    python -m bench.throttling --events 300 --only rate-limited

Scenarios (one subscription each, the platform in burst mode with its default settings):

* ``first-attempt``: the subscriber answers the first attempt of each event 429 +
  ``Retry-After: 2`` and every later one 200 (issue 13's livelock: 0 of 150 in 240 s before);
* ``rate-limited``: the subscriber allows 20 requests a second (a token bucket holding one
  second's worth) and answers 429 + ``Retry-After: 1`` beyond that.

Printed per scenario: events, wall time (publish to the last event accepted), achieved rate,
attempts per event (max and mean), 429s. Services: DELIVERY_DATABASE_URL / DELIVERY_AMQP_URL
when set (a database and queue names of its own, removed afterwards), otherwise throwaway local
servers.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import secrets
import statistics
import time
from collections import Counter
from typing import Any

import aio_pika
import asyncpg

from delivery import publish_many
from delivery.broker.topology import Names, delete
from delivery.settings import Settings
from delivery.store import subscriptions
from delivery.store.migrations import migrate
from delivery.testing.factories import balance
from delivery.testing.receiver import scripted_subscriber
from delivery.testing.services import create_database, drop_database, provision_services
from delivery.testing.throttling import FirstAttemptRefuser, RateLimitedSubscriber
from workers.process import run_process

SCENARIOS = ("first-attempt", "rate-limited")


async def run_scenario(
    name: str, events: int, db_admin: str, amqp: str, *, args_timeline: bool = False
) -> dict[str, Any]:
    db_name = f"dlv_bench_throttle_{secrets.token_hex(4)}"
    db_url = await create_database(db_admin, db_name)
    prefix = f"bt{secrets.token_hex(4)}"
    try:
        await migrate(db_url)
        settings = Settings(
            database_url=db_url,
            amqp_url=amqp,
            amqp_prefix=prefix,
            admin_port=0,
            allow_private_targets=True,  # the subscribers listen on 127.0.0.1
            log_format="console",
            log_level="warning",
        )
        subscriber = (
            FirstAttemptRefuser(retry_after_s=2)
            if name == "first-attempt"
            else RateLimitedSubscriber(rate_per_s=20)
        )
        conn = await asyncpg.connect(db_url)
        try:
            async with scripted_subscriber(subscriber.answer) as base:
                await subscriptions.add(conn, url=f"{base}/hook", patterns="*")
                batch = [balance(i, account=f"acc_{i % 7}") for i in range(events)]
                started = time.monotonic()
                await publish_many(conn, batch)
                await run_process(
                    settings,
                    relay=True,
                    worker=True,
                    handle_signals=False,
                    until_idle=True,
                    idle_timeout_s=900,
                )
                wall_s = time.monotonic() - started
            circuit_opened = await conn.fetchval(
                "SELECT bool_or(circuit_state = 'open') FROM delivery.subscriptions"
            )
            dead = await conn.fetchval(
                "SELECT count(*) FROM delivery.deliveries WHERE state = 'dead'"
            )
        finally:
            await conn.close()
    finally:
        await drop_database(db_admin, db_name)
        with contextlib.suppress(Exception):
            connection = await aio_pika.connect(amqp)
            async with connection:
                await delete(connection, Names(prefix))
    if args_timeline:
        t0 = subscriber.answers[0][0] if subscriber.answers else 0.0
        for t, status in subscriber.answers:
            print(f"  {t - t0:8.3f} {status}")
    attempts: Counter[str] = subscriber.attempts
    per_event = list(attempts.values())
    delivered = len(subscriber.delivered)
    accepted_s = wall_s
    if isinstance(subscriber, RateLimitedSubscriber) and subscriber.first_accepted_s:
        assert subscriber.last_accepted_s is not None
        accepted_s = subscriber.last_accepted_s - subscriber.first_accepted_s
    return {
        "scenario": name,
        "events": events,
        "delivered": delivered,
        "dead": dead,
        "wall_s": round(wall_s, 1),
        "rate_per_s": round(delivered / wall_s, 1),
        "accepting_rate_per_s": round(delivered / accepted_s, 1) if accepted_s else None,
        "attempts_max": max(per_event, default=0),
        "attempts_mean": round(statistics.fmean(per_event), 2) if per_event else 0,
        "refused_429": subscriber.refused,
        "circuit_opened": bool(circuit_opened),
    }


async def main(args: argparse.Namespace) -> None:
    with provision_services(progress=lambda line: print(f"[services] {line}")) as services:
        for name in args.only or SCENARIOS:
            result = await run_scenario(
                name,
                args.events,
                services.database_url,
                services.amqp_url,
                args_timeline=args.timeline,
            )
            print(json.dumps(result))


def cli() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--events", type=int, default=150)
    parser.add_argument("--only", action="append", choices=SCENARIOS)
    parser.add_argument("--timeline", action="store_true", help="print every answer's time")
    asyncio.run(main(parser.parse_args()))


if __name__ == "__main__":
    cli()
