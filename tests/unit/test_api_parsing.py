"""The HTTP API's pure parts: publish bodies (the failing event named by index and field),
opaque cursors, error fields. No server, no services."""

from __future__ import annotations

from datetime import UTC, datetime

import pytest
from pydantic import ValidationError

from delivery.api import pagination
from delivery.api.app import where
from delivery.api.events import parse_body
from delivery.api.models import EventsQuery
from delivery.api.problems import ApiError, field_of
from delivery.testing.factories import trade


def test_a_single_event_takes_its_id_from_the_idempotency_key():
    [event] = parse_body(trade(1), "evt_key")
    assert event.id == "evt_key"
    [same] = parse_body(trade(1, id="evt_key"), "evt_key")
    assert same.id == "evt_key"


@pytest.mark.parametrize(
    ("body", "key", "field"),
    [
        (trade(1, id="evt_a"), "evt_b", "id"),
        ({"events": [trade(1)]}, "evt_k", "Idempotency-Key"),
        (trade(1), "has space", "Idempotency-Key"),
        ({"events": []}, None, "events"),
        ({"events": "no"}, None, "events"),
        ({"events": [trade(1)], "more": 1}, None, "more"),
        ({"events": [trade(0), trade(1), {**trade(2), "sequence": 3}]}, None, "events[2].sequence"),
        ({**trade(1), "type": "trade.unknown"}, None, "type"),
        ({"events": [trade(0), {**trade(1), "account_id": 7}]}, None, "events[1].account_id"),
    ],
)
def test_a_refused_body_names_the_field_and_the_index(body, key, field):
    with pytest.raises(ApiError) as refused:
        parse_body(body, key)
    assert refused.value.status == 400
    assert refused.value.field == field


def test_a_float_price_in_the_fourth_event_is_named_events_3_data_price():
    events = [trade(i) for i in range(5)]
    events[3] = {**events[3], "data": {**events[3]["data"], "price": 1.5}}
    with pytest.raises(ApiError) as refused:
        parse_body({"events": events}, None)
    assert refused.value.field == "events[3].data.price"


def test_a_cursor_round_trips_and_a_forged_one_is_refused_naming_cursor():
    moment = datetime(2026, 12, 7, 21, 0, tzinfo=UTC)
    assert pagination.decode(pagination.encode(moment, "sub_1"), datetime, str) == (moment, "sub_1")
    assert pagination.decode(pagination.encode(42), int) == (42,)
    for forged in ("0", "bm9wZQ", pagination.encode("x"), pagination.encode(2**63), "!!"):
        with pytest.raises(ApiError) as refused:
            pagination.decode(forged, int)
        assert refused.value.field == "cursor"


def test_a_page_knows_whether_another_follows():
    assert pagination.page([1, 2, 3], 2) == ([1, 2], True)
    assert pagination.page([1, 2], 2) == ([1, 2], False)


def test_the_next_cursor_continues_after_the_last_row_shown():
    shown, cursor = pagination.next_page([{"id": 7}, {"id": 5}, {"id": 3}], 2, lambda r: (r["id"],))
    assert shown == [{"id": 7}, {"id": 5}]
    assert cursor is not None and pagination.decode(cursor, int) == (5,)
    assert pagination.next_page([{"id": 7}], 2, lambda r: (r["id"],)) == ([{"id": 7}], None)


def test_fields_are_written_as_a_client_reads_them():
    assert where(["events", 3, "data", "price"]) == "events[3].data.price"
    assert field_of("data.price: must be a decimal string") == "data.price"
    assert field_of("an event must be a JSON object") is None


@pytest.mark.parametrize(
    "moment", ["0001-01-01T18:32:55.0491+20:07", "9999-12-31T23:00:00-05:00"]
)
def test_a_time_window_outside_years_1_to_9999_in_utc_is_bad_input_not_an_overflow(moment):
    # Given an RFC 3339 time whose UTC value falls outside what datetime (and the database) holds
    # When it is a listing's since/until, Then it is refused as input (400), naming the range.
    with pytest.raises(ValidationError, match="within years 1 to 9999 in UTC"):
        EventsQuery.model_validate({"until": moment})
    assert EventsQuery.model_validate({"until": "0001-01-02T00:00:00+20:00"}).until is not None
