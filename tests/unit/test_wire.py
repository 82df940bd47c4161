"""The relay-to-dispatch message format: packs carry exactly the bodies subscribers get (pure;
the round trip through a real broker is in tests/integration/test_wire_broker.py)."""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any

import aio_pika
import pytest

from delivery.broker.wire import PACK, SINGLE, decode, event_count, pack_rows
from delivery.errors import PoisonMessageError
from delivery.events import envelope_from_row, render_body
from delivery.testing.factories import outbox_row


def _incoming(message: aio_pika.Message) -> Any:
    # What decode reads of an incoming message: its body, content type and headers.
    return SimpleNamespace(
        body=message.body, content_type=message.content_type, headers=message.headers
    )


def test_a_pack_carries_the_exact_bodies_and_per_event_headers_in_order():
    tp = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"
    rows = [outbox_row(i, tp=tp if i == 2 else None) for i in range(1, 6)]
    (out,) = pack_rows(rows, per_message=50)
    assert out.pks == [1, 2, 3, 4, 5] and out.message.content_type == PACK
    events = decode(_incoming(out.message))
    assert [e.body for e in events] == [render_body(envelope_from_row(r)) for r in rows]
    assert [e.facts.id for e in events] == [f"evt_{i}" for i in range(1, 6)]
    assert [e.traceparent for e in events] == [None, tp, None, None, None]
    assert [e.created_at_s for e in events] == pytest.approx([r["created_at_s"] for r in rows], abs=1e-6)
    assert event_count(_incoming(out.message)) == 5


def test_packs_hold_one_type_at_most_n_events_and_redriven_events_travel_alone():
    rows = [outbox_row(i, "trade.executed" if i % 2 else "account.closed") for i in range(1, 8)]
    rows.append(outbox_row(8, redrives=1))
    out = pack_rows(rows, per_message=3)
    assert [(o.routing_key, o.pks) for o in out] == [
        ("trade.executed", [1, 3, 5]),  # full: sent
        ("account.closed", [2, 4, 6]),
        ("account.closed", [8]),  # redriven: alone
        ("trade.executed", [7]),  # what is left at the end
    ]
    assert all(o.message.content_type != PACK for o in out if len(o.pks) == 1)


def test_one_event_per_message_is_the_single_format():
    out = pack_rows([outbox_row(1), outbox_row(2)], per_message=1)
    assert [o.pks for o in out] == [[1], [2]]
    (event,) = decode(_incoming(out[0].message))
    assert event.body == render_body(envelope_from_row(outbox_row(1)))


def test_a_bad_line_in_a_pack_is_named():
    (out,) = pack_rows([outbox_row(1), outbox_row(2)], per_message=10)
    broken = SimpleNamespace(
        body=b"{}\n" + out.message.body.split(b"\n")[1],
        content_type=PACK,
        headers=out.message.headers,
    )
    with pytest.raises(PoisonMessageError, match="pack line 1: body lacks id"):
        decode(broken)
    mismatched = SimpleNamespace(
        body=out.message.body, content_type=PACK, headers={"x-created-at-us": [1]}
    )
    with pytest.raises(PoisonMessageError, match="pack headers do not match"):
        decode(mismatched)


@pytest.mark.parametrize(
    "content_type", ["application/vnd.delivery.v2+json", "text/plain", None, "application/JSON"]
)
def test_a_format_this_worker_does_not_know_is_poison_naming_it_never_read_as_json(content_type):
    # A body that would decode as a perfectly good single event: only the format is unknown
    # (a newer release's relay, written before this worker learnt to read it).
    (out,) = pack_rows([outbox_row(1)], per_message=1)
    assert out.message.content_type == SINGLE
    message = SimpleNamespace(
        body=out.message.body, content_type=content_type, headers=out.message.headers
    )
    with pytest.raises(PoisonMessageError, match="unknown wire format") as caught:
        decode(message)
    assert repr(content_type) in str(caught.value)
