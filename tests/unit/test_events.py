"""The envelope and catalogue: clear one-line errors naming the field."""

from dataclasses import replace
from datetime import UTC, datetime

import pytest

from delivery.errors import InputError, PoisonMessageError
from delivery.events import (
    EVENT_TYPES,
    Envelope,
    NewEvent,
    check_new_event,
    parse_event,
    render_body,
    routing_facts,
)

TRADE = {
    "type": "trade.executed",
    "account_id": "acc_1",
    "data": {
        "trade_id": "t1",
        "order_id": "o1",
        "instrument": "BTC-USD",
        "side": "buy",
        "quantity": "0.5",
        "price": "64000.10",
        "executed_at": "2026-01-01T00:00:00Z",
    },
}


def test_a_valid_event_gets_an_id_and_a_time():
    event = parse_event(TRADE, now=datetime(2026, 2, 3, tzinfo=UTC))
    assert event.id.startswith("evt_") and len(event.id) <= 64
    assert event.occurred_at == datetime(2026, 2, 3, tzinfo=UTC)
    assert event.data["price"] == "64000.10"  # decimal strings kept exactly


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"type": "trade.exploded"}, "type: unknown event type 'trade.exploded'"),
        ({"account_id": None}, "account_id:"),
        ({"id": "has space"}, "id: must be at most 64 characters"),
        ({"id": "x" * 65}, "id:"),
        ({"data": {**TRADE["data"], "price": 64000.1}}, "data.price: must be a decimal string"),
        ({"data": {**TRADE["data"], "side": "hold"}}, "data.side:"),
        ({"data": {**TRADE["data"], "extra": 1}}, "data.extra: is not a field"),
        ({"occurred_at": "yesterday"}, "occurred_at:"),
        ({"sequence": 3}, "sequence: is assigned by the platform"),
    ],
)
def test_bad_events_name_the_field(change, message):
    raw = {**TRADE, **change}
    with pytest.raises(InputError) as info:
        parse_event(raw)
    assert message in str(info.value)
    assert "\n" not in str(info.value)


def test_missing_fields_are_named():
    with pytest.raises(InputError, match="account_id: is required"):
        parse_event({k: v for k, v in TRADE.items() if k != "account_id"})
    with pytest.raises(InputError, match="type: is required"):
        parse_event({"account_id": "a"})


def test_every_catalogue_type_has_a_schema():
    samples = {
        "trade.executed": TRADE["data"],
        "trade.cancelled": {"trade_id": "t", "order_id": "o", "reason": "user"},
        "account.created": {"owner": "Ada", "currency": "EUR"},
        "account.balance_changed": {
            "asset": "EUR",
            "delta": "-1.5",
            "balance": "10",
            "reason": "fee",
        },
        "account.closed": {"reason": "requested"},
    }
    assert set(samples) == set(EVENT_TYPES)
    for event_type, data in samples.items():
        assert parse_event({"type": event_type, "account_id": "a", "data": data}).type == event_type


def test_body_rendering_is_deterministic_and_parseable():
    envelope = Envelope(
        "evt_1", "account.closed", "a", 3, datetime(2026, 1, 1, tzinfo=UTC), {"reason": "x"}
    )
    body = render_body(envelope)
    assert body == render_body(envelope)
    assert body == (
        b'{"id":"evt_1","type":"account.closed","account_id":"a","sequence":3,'
        b'"occurred_at":"2026-01-01T00:00:00Z","data":{"reason":"x"}}'
    )
    facts = routing_facts(body)
    assert (facts.id, facts.type, facts.account_id) == ("evt_1", "account.closed", "a")
    with pytest.raises(PoisonMessageError, match="not JSON"):
        routing_facts(b"not json")
    with pytest.raises(PoisonMessageError, match="lacks id"):
        routing_facts(b'{"id": "x"}')


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"account_id": "acc\x00"}, "account_id: contains a control character (U+0000)"),
        ({"id": "evt\x00"}, "id: contains a control character (U+0000)"),
        (
            {"data": {**TRADE["data"], "instrument": "BTC\x1b[31m"}},
            "data.instrument: contains a control character (U+001B)",
        ),
        ({"data": {**TRADE["data"], "order_id": "o\u0085"}}, "data.order_id: contains a control"),
        ({"account_id": "acc\ud800"}, "account_id: is not valid Unicode"),
    ],
)
def test_nul_and_control_characters_are_refused_naming_the_field(change, message):
    # PostgreSQL cannot store a NUL; the others end up in subscribers' logs and terminals.
    with pytest.raises(InputError) as info:
        parse_event({**TRADE, **change})
    assert message in str(info.value)


@pytest.mark.parametrize(
    "raw",
    [
        {**TRADE, "type": "trade.\nexploded" * 100},
        {**TRADE, "data": {**TRADE["data"], "ev\nil\x1b[2J": 1}},
        {**TRADE, "data": {**TRADE["data"], "x" * 100_000: 1}},
    ],
)
def test_a_refusal_is_one_short_printable_line_whatever_the_input(raw):
    with pytest.raises(InputError) as info:
        parse_event(raw)
    message = str(info.value)
    assert message.isprintable() and len(message) < 400


def test_an_offset_that_carries_occurred_at_out_of_range_is_an_input_error():
    with pytest.raises(InputError, match="occurred_at: is out of range"):
        parse_event({**TRADE, "occurred_at": "9999-12-31T23:59:59-23:59"})


def test_a_new_event_built_by_hand_is_validated_like_an_envelope():
    good = NewEvent("evt_1", "account.closed", "a", datetime(2026, 1, 1, tzinfo=UTC), {"reason": "x"})
    assert check_new_event(good) == good
    for bad, message in [
        (replace(good, id="evt\x00"), "id: contains a control character"),
        (replace(good, account_id="a\x07"), "account_id: contains a control character"),
        (replace(good, type="trade.exploded"), "type: unknown event type"),
        (replace(good, data={"reason": 1}), "data.reason:"),
        (replace(good, occurred_at=datetime(2026, 1, 1)), "occurred_at:"),
        (replace(good, traceparent="00-zz"), "traceparent:"),
    ]:
        with pytest.raises(InputError, match=message):
            check_new_event(bad)
