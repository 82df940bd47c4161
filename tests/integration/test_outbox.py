"""The outbox's per-account sequence, on the real database only (no broker): gapless over
publishes and batches, and a duplicate id moves nothing."""

from __future__ import annotations

from dataclasses import replace

import asyncpg
import pytest

from delivery import InputError, parse_event, publish, publish_many
from delivery.testing.factories import balance, trade

pytestmark = pytest.mark.integration


async def _sequences(conn: asyncpg.Connection) -> dict[str, list[int]]:
    rows = await conn.fetch(
        "SELECT account_id, array_agg(sequence ORDER BY sequence) s FROM delivery.outbox GROUP BY 1"
    )
    return {r["account_id"]: r["s"] for r in rows}


async def test_sequences_run_one_to_n_per_account_over_publishes_and_batches(settings):
    conn = await asyncpg.connect(settings.database_url)
    await publish(conn, trade(0, account="acc_a", id="evt_0"))
    await publish_many(
        conn, [trade(i, account=("acc_a", "acc_b")[i % 2], id=f"evt_{i}") for i in range(1, 8)]
    )
    async with conn.transaction():
        await publish_many(conn, [balance(8, account="acc_b", id="evt_8")])
        await publish_many(conn, [balance(9, account="acc_c", id="evt_9")])
    await publish(conn, trade(10, account="acc_a", id="evt_10"))
    assert await _sequences(conn) == {
        "acc_a": [1, 2, 3, 4, 5],
        "acc_b": [1, 2, 3, 4, 5],
        "acc_c": [1],
    }
    # In the caller's order within a batch.
    order = await conn.fetch(
        "SELECT event_id FROM delivery.outbox WHERE account_id = 'acc_a' ORDER BY sequence"
    )
    assert [r["event_id"] for r in order] == ["evt_0", "evt_2", "evt_4", "evt_6", "evt_10"]
    counters = dict(
        await conn.fetch("SELECT account_id, last_sequence FROM delivery.account_sequences")
    )
    assert counters == {"acc_a": 5, "acc_b": 5, "acc_c": 1}
    await conn.close()


async def test_a_duplicate_id_is_reported_and_leaves_the_accounts_counter_alone(settings):
    conn = await asyncpg.connect(settings.database_url)
    first = await publish_many(
        conn, [trade(1, account="acc_a", id="evt_1"), trade(2, account="acc_a", id="evt_2")]
    )
    assert first.as_dict() == {"published": 2, "duplicates": 0}
    # The same id again, alone and beside a new one.
    alone = await publish(conn, trade(1, account="acc_a", id="evt_1"))
    assert alone.duplicates == ["evt_1"] and alone.published == []
    mixed = await publish_many(
        conn, [trade(2, account="acc_a", id="evt_2"), trade(3, account="acc_a", id="evt_3")]
    )
    assert mixed.duplicates == ["evt_2"] and mixed.published == ["evt_3"]
    # The next event gets the next number: nothing was counted for the duplicates.
    assert await conn.fetchval("SELECT sequence FROM delivery.outbox WHERE event_id = 'evt_3'") == 3
    assert await _sequences(conn) == {"acc_a": [1, 2, 3]}
    assert (
        await conn.fetchval(
            "SELECT last_sequence FROM delivery.account_sequences WHERE account_id = 'acc_a'"
        )
        == 3
    )
    await conn.close()


async def test_a_new_event_built_by_hand_is_validated_and_a_bad_one_writes_nothing(settings):
    # NewEvent is a plain dataclass: a control character in its id used to reach the outbox,
    # where the worker could never record an attempt for it.
    good = parse_event(trade(1, account="acc_a", id="evt_good"))
    conn = await asyncpg.connect(settings.database_url)
    try:
        for bad in (replace(good, id="evt_\x00nul"), replace(good, account_id="acc\x1b[2J")):
            with pytest.raises(InputError, match=r"event 2: (id|account_id): contains a control"):
                await publish_many(conn, [good, bad])
        assert await conn.fetchval("SELECT count(*) FROM delivery.outbox") == 0
        assert (await publish_many(conn, [good])).published == ["evt_good"]
    finally:
        await conn.close()
