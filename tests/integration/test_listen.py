"""The one LISTEN loop (``delivery.store.listen``) the relay, the stream feed and the
subscription index share: payloads reach their channel's handler, and a lost connection is
followed by a new LISTEN and a resync, since what was notified meanwhile is gone."""

from __future__ import annotations

import asyncio

import asyncpg
import pytest

from delivery.store.listen import RECONNECT, START, Listener
from delivery.testing.waits import wait_until

pytestmark = pytest.mark.integration


async def test_payloads_reach_their_channel_and_a_lost_connection_listens_again_and_resyncs(
    settings,
):
    received: list[tuple[str, str]] = []
    resyncs: list[str] = []
    listener = Listener(
        settings.database_url,
        {
            "listen_test_a": lambda payload: received.append(("a", payload)),
            "listen_test_b": lambda payload: received.append(("b", payload)),
        },
        resync=resyncs.append,
        name="test",
    )
    stop = asyncio.Event()
    conn = await asyncpg.connect(settings.database_url)
    try:
        async with asyncio.TaskGroup() as tg:
            tg.create_task(listener.run(stop))
            try:
                # Given a listener that has taken effect (told to resync: from the start)
                await wait_until(lambda: listener.listening, timeout_s=15, what="listening")
                assert resyncs == [START]
                # When each channel is notified, each handler gets its own payloads
                await conn.execute("SELECT pg_notify('listen_test_a', '1')")
                await conn.execute("SELECT pg_notify('listen_test_b', '2')")
                await wait_until(lambda: len(received) == 2, timeout_s=15, what="two payloads")
                assert sorted(received) == [("a", "1"), ("b", "2")]
                # When its backend is terminated
                terminated = await conn.fetchval(
                    "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity"
                    " WHERE datname = current_database() AND query LIKE 'LISTEN %'"
                )
                assert terminated == 1
                # Then it listens again on a new connection and says to resync
                await wait_until(
                    lambda: resyncs == [START, RECONNECT] and listener.listening,
                    timeout_s=15,
                    what="a new LISTEN and a resync after the connection was lost",
                )
                await conn.execute("SELECT pg_notify('listen_test_b', '3')")
                await wait_until(
                    lambda: ("b", "3") in received, timeout_s=15, what="a payload after it"
                )
            finally:
                stop.set()
        assert not listener.listening
    finally:
        await conn.close()
