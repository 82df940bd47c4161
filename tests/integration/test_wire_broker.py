"""A pack of events through a real broker: the bodies, trace context and creation times that
went in come out (the format itself: tests/unit/test_wire.py)."""

from __future__ import annotations

import aio_pika
import pytest

from delivery.broker.topology import Names, declare
from delivery.broker.wire import decode, pack_rows
from delivery.events import envelope_from_row, render_body
from delivery.testing.factories import outbox_row

pytestmark = pytest.mark.integration


async def test_a_pack_survives_a_real_broker_round_trip(settings):
    names = Names(settings.amqp_prefix)
    tp = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"
    rows = [outbox_row(i, tp=tp if i == 3 else None) for i in range(1, 5)]
    (out,) = pack_rows(rows, per_message=50)
    connection = await aio_pika.connect(settings.amqp_url)
    try:
        channel = await connection.channel(publisher_confirms=True)
        topology = await declare(channel, names, delivery_limit=20)
        await topology.events.publish(out.message, routing_key=out.routing_key, mandatory=True)
        incoming = await topology.dispatch.get(timeout=10, fail=True)
        assert incoming is not None
        events = decode(incoming)
        await incoming.ack()
    finally:
        await connection.close()
    assert [e.body for e in events] == [render_body(envelope_from_row(r)) for r in rows]
    assert [e.traceparent for e in events] == [None, None, tp, None]
    # to the microsecond (AMQP's own float would be 32-bit: 128 s steps at today's epoch)
    assert [e.created_at_s for e in events] == pytest.approx(
        [r["created_at_s"] for r in rows], abs=1e-6
    )
