"""The broker is a doorbell, not the truth: whoever can publish on the events exchange cannot
have a webhook signed. Dispatch reads every event from the outbox; a message naming an event
the outbox lacks is poison, recorded with that reason and counted, and never POSTed."""

from __future__ import annotations

import aio_pika
import asyncpg
import orjson
import pytest

from delivery import publish_many
from delivery.broker.topology import Names, declare
from delivery.events import envelope_from_row, render_body
from delivery.testing.factories import add_subscription, trade
from delivery.testing.metrics import counter_value
from delivery.testing.receiver import Receiver
from delivery.testing.waits import wait_until
from tests.support import running

pytestmark = pytest.mark.integration


def _envelope(event_id: str, price: str) -> bytes:
    """A well-formed webhook body, as a relay would put it on the wire."""
    event = trade(1, id=event_id)
    event["data"]["price"] = price  # type: ignore[index]
    return orjson.dumps(
        {
            **event,
            "sequence": 1,
            "occurred_at": "2026-01-01T00:00:00Z",
        }
    )


async def _publish_on_the_exchange(
    settings, body: bytes, message_id: str, content_type: str = "application/json"
) -> None:
    """Straight onto the events exchange with aio-pika, as an intruder with broker access (or
    a relay of a newer release, writing a format this worker does not know)."""
    connection = await aio_pika.connect(settings.amqp_url)
    try:
        channel = await connection.channel(publisher_confirms=True)
        topology = await declare(
            channel, Names(settings.amqp_prefix), delivery_limit=settings.amqp_delivery_limit
        )
        await topology.events.publish(
            aio_pika.Message(
                body,
                message_id=message_id,
                content_type=content_type,
                headers={"x-created-at-us": 1_767_225_600_000_000},
            ),
            routing_key="trade.executed",
            mandatory=True,
        )
    finally:
        await connection.close()


async def test_a_message_with_no_outbox_row_is_poison_with_the_reason_and_never_posted(settings):
    conn = await asyncpg.connect(settings.database_url)
    async with Receiver() as receiver:
        await add_subscription(conn, receiver, "/h", patterns="*")
        rejected = counter_value("delivery_poison_messages_total", reason="no_outbox_row")
        async with running(settings):
            # When a message no relay sent is published on the events exchange
            await _publish_on_the_exchange(settings, _envelope("evt_forged", "1.00"), "forged-1")
            # Then it is recorded as poison, with the reason
            await wait_until(
                lambda: conn.fetchval("SELECT count(*) = 1 FROM delivery.poison_messages"),
                timeout_s=30,
                what="the forged message recorded as poison",
            )
            # and a real event published after it goes out (dispatch kept flowing)
            await publish_many(conn, [trade(2, id="evt_real")])
            await receiver.wait_for(
                lambda r: "evt_real" in r.unique_ids(), timeout_s=30, what="the real event"
            )
        # and the forged event was never POSTed nor made a delivery
        assert [a.webhook_id for a in receiver.arrivals] == ["evt_real"]
        assert await conn.fetchval(
            "SELECT count(*) FROM delivery.deliveries WHERE event_id = 'evt_forged'"
        ) == 0
        row = await conn.fetchrow("SELECT message_id, reason FROM delivery.poison_messages")
        assert row["message_id"] == "forged-1"
        assert row["reason"] == (
            "unprocessable: event evt_forged has no outbox row: no relay sent it"
        )
        # and it was counted as such
        assert (
            counter_value("delivery_poison_messages_total", reason="no_outbox_row")
            == rejected + 1
        )
    await conn.close()


async def test_a_message_reusing_a_real_event_id_delivers_the_outbox_body_not_its_own(settings):
    conn = await asyncpg.connect(settings.database_url)
    async with Receiver() as receiver:
        await add_subscription(conn, receiver, "/h", patterns="*")
        # Given a real event in the outbox that no relay has sent yet
        await publish_many(conn, [trade(1, id="evt_true")])
        row = await conn.fetchrow(
            "SELECT event_id, type, account_id, sequence, occurred_at, data::text AS data"
            " FROM delivery.outbox"
        )
        stored = render_body(envelope_from_row(row))
        async with running(settings, relay=False):
            # When a message with that id and another price rings the doorbell first
            await _publish_on_the_exchange(settings, _envelope("evt_true", "0.01"), "tampered")
            # Then the subscriber gets the event as the outbox holds it
            await receiver.wait_for(
                lambda r: "evt_true" in r.unique_ids(), timeout_s=30, what="the event"
            )
        (arrival,) = receiver.delivered()
        assert arrival.body == stored
        assert b'"price":"64000.50"' in arrival.body
        assert arrival.signature_ok
        assert await conn.fetchval("SELECT count(*) FROM delivery.poison_messages") == 0
    await conn.close()


async def test_a_message_in_a_wire_format_this_worker_does_not_know_is_poison_not_misparsed(
    settings,
):
    """runbooks/rolling-upgrade.md, "read first, write later": should a newer relay's format
    reach this worker anyway, the message is recorded with the reason, never guessed at. The
    body here is a real event's, in the outbox, so only the content type is unknown."""
    conn = await asyncpg.connect(settings.database_url)
    async with Receiver() as receiver:
        await add_subscription(conn, receiver, "/h", patterns="*")
        await publish_many(conn, [trade(1, id="evt_newer_format")])
        row = await conn.fetchrow(
            "SELECT event_id, type, account_id, sequence, occurred_at, data::text AS data"
            " FROM delivery.outbox"
        )
        body = render_body(envelope_from_row(row))
        async with running(settings, relay=False):
            # When a message of a format no release of this worker writes reaches it
            await _publish_on_the_exchange(
                settings, body, "newer-1", content_type="application/vnd.delivery.v2+json"
            )
            # Then it is recorded as poison, naming the format
            await wait_until(
                lambda: conn.fetchval("SELECT count(*) = 1 FROM delivery.poison_messages"),
                timeout_s=30,
                what="the message of an unknown format recorded as poison",
            )
        reason = await conn.fetchval("SELECT reason FROM delivery.poison_messages")
        assert reason == (
            "unprocessable: unknown wire format (content type "
            "'application/vnd.delivery.v2+json'): this worker reads application/json and "
            "application/x-ndjson only"
        )
        # and nothing was read out of it: no delivery, no POST
        assert receiver.arrivals == []
        assert await conn.fetchval("SELECT count(*) FROM delivery.deliveries") == 0
    await conn.close()
