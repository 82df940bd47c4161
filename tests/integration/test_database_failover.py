"""A PostgreSQL failover under load (issue #16): the primary crashes (``-m immediate``), the
standby is promoted, and the running platform finds the new primary through its multi-host
``DELIVERY_DATABASE_URL`` (``target_session_attrs=read-write``) without a restart. With
synchronous replication no event whose commit the producer saw is lost."""

from __future__ import annotations

import asyncio
import contextlib
import time

import asyncpg
import pytest

from delivery.outbox import publish_many
from delivery.settings import Settings
from delivery.store.migrations import migrate
from delivery.store.pool import is_connection_error
from delivery.testing.env import IN_CI
from delivery.testing.factories import add_subscription, trade
from delivery.testing.metrics import counter_value
from delivery.testing.postgres_standby import LocalPostgresPair
from delivery.testing.processes import ProvisionError
from delivery.testing.receiver import Receiver
from delivery.testing.services import create_database
from delivery.testing.waits import wait_until
from tests.support import running

pytestmark = pytest.mark.integration

EVENTS = 300
BATCH = 10


async def _produce(url: str, committed: list[str], deadline_s: float) -> None:
    """Publish EVENTS events, BATCH a transaction, one after another; an id counts as committed
    once its COMMIT returned. A batch whose connection died is published again (same ids: a
    duplicate of a batch that did commit is a no-op) on a new connection to whichever server
    accepts writes now."""
    deadline = time.monotonic() + deadline_s
    conn: asyncpg.Connection | None = None
    batch_no = 0
    while batch_no < EVENTS // BATCH:
        events = [
            trade(i, account=f"acc_fo_{i % 5}", id=f"fo_{i}")
            for i in range(batch_no * BATCH, (batch_no + 1) * BATCH)
        ]
        try:
            if conn is None or conn.is_closed():
                conn = await asyncpg.connect(url, timeout=5)
            async with conn.transaction():
                await publish_many(conn, events)
        except Exception as exc:
            if not is_connection_error(exc) or time.monotonic() > deadline:
                raise
            conn = None
            await asyncio.sleep(0.1)  # pacing the reconnects, not waiting for a condition
            continue
        committed.extend(str(e["id"]) for e in events)
        batch_no += 1
        await asyncio.sleep(0.02)  # a steady trickle rather than one burst
    if conn is not None:
        await conn.close()


async def test_a_promoted_standby_takes_over_and_nothing_committed_is_lost(settings: Settings):
    pair = LocalPostgresPair(synchronous=True)
    try:
        try:
            await asyncio.to_thread(pair.start)
        except ProvisionError as exc:
            if IN_CI:
                pytest.fail(f"cannot start a throwaway PostgreSQL pair: {exc}")
            pytest.skip(f"cannot start a throwaway PostgreSQL pair: {exc}")
        url = await create_database(pair.url(), "delivery")
        await migrate(url)
        settings = settings.model_copy(update={"database_url": url})
        async with Receiver() as receiver:
            conn = await asyncpg.connect(url)
            try:
                await add_subscription(conn, receiver, "/hook", patterns="*")
            finally:
                await conn.close()
            async with running(settings) as health:
                # Given a platform delivering a steady stream of events
                committed: list[str] = []
                producer = asyncio.create_task(_produce(url, committed, deadline_s=60))
                await receiver.wait_for(
                    lambda r: r.unique_count() >= EVENTS // 4, 30, "a quarter delivered"
                )
                # When the primary crashes and the standby is promoted
                changes = counter_value("delivery_database_server_changes_total")
                crashed = time.monotonic()
                await asyncio.to_thread(pair.primary.stop, "immediate")
                await asyncio.to_thread(pair.standby.promote)
                promoted_after_s = time.monotonic() - crashed
                before = set(committed)
                # Then the producer and the platform carry on against the new primary
                await asyncio.wait_for(producer, 60)
                await receiver.wait_for(
                    lambda r: r.unique_ids() >= before | set(committed) and len(committed) > 0,
                    60,
                    "every committed event delivered",
                )
                recovered_after_s = time.monotonic() - crashed
                # And nothing committed is lost: every id whose COMMIT returned is in the
                # promoted server's outbox and was delivered, with a valid signature
                conn = await asyncpg.connect(pair.standby.url.rsplit("/", 1)[0] + "/delivery")
                try:
                    stored = {
                        r["event_id"]
                        for r in await conn.fetch("SELECT event_id FROM delivery.outbox")
                    }
                finally:
                    await conn.close()
                assert len(committed) == EVENTS
                assert set(committed) <= stored
                assert set(committed) <= receiver.unique_ids()
                assert all(a.signature_ok for a in receiver.delivered())
                # And the process reconnected by itself: still ready, never restarted, and it
                # counted the move to another server (DeliveryDatabaseFailover)
                await wait_until(lambda: health.ready, timeout_s=30, what="ready again")
                assert counter_value("delivery_database_server_changes_total") > changes
                print(
                    f"\n[failover] promoted {promoted_after_s:.1f} s after the crash; every "
                    f"committed event delivered {recovered_after_s:.1f} s after it; "
                    f"{len(receiver.duplicates())} duplicates"
                )
    finally:
        with contextlib.suppress(Exception):
            await asyncio.to_thread(pair.close)
