"""Property tests of every parser that reads what others send us: the event envelope, the
publish command's line reader, the wire decoder, durations and ``Retry-After``. Whatever the
input, each either returns a well-formed value or refuses with the error its caller handles
(``InputError``, ``PoisonMessageError``, ``ValueError`` for the pure duration parser), in one
printable line; nothing else escapes.

Bounded and deterministic by default (a fixed seed, a few hundred examples each, seconds in
all), so CI never fails on a fresh random draw. ``FUZZ_EXAMPLES=20000 pytest
tests/unit/test_fuzz.py`` explores at random for longer.
"""

from __future__ import annotations

import io
import math
import os
from datetime import UTC, datetime, timedelta
from types import SimpleNamespace
from typing import Any

import orjson
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from delivery.broker.wire import PACK, SINGLE, WireEvent, decode, event_count
from delivery.cli.lines import parse_line, read_events
from delivery.durations import parse_duration_s, parse_schedule_s
from delivery.errors import InputError, PoisonMessageError
from delivery.events import EVENT_TYPES, NewEvent, check_new_event, parse_event
from delivery.worker.retry import parse_retry_after_s

_DEEP = int(os.environ.get("FUZZ_EXAMPLES", "0"))
FUZZ = settings(
    max_examples=_DEEP or 150,
    derandomize=not _DEEP,
    database=None,
    deadline=None,  # a loaded CI machine: no speed assertions
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)

# Any code point: printable text, C0/C1 controls, NUL and lone surrogates (which cannot be
# encoded as UTF-8, so PostgreSQL can never store them).
CHARS = st.characters(exclude_categories=()) | st.characters(categories=["Cs"])
TEXT = st.text(CHARS, max_size=30)
JSON = st.recursive(
    st.none()
    | st.booleans()
    | st.integers()
    | st.floats(allow_nan=True, allow_infinity=True)
    | TEXT,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(TEXT, inner, max_size=4),
    max_leaves=12,
)

SAMPLE_DATA: dict[str, dict[str, Any]] = {
    "trade.executed": {
        "trade_id": "t1",
        "order_id": "o1",
        "instrument": "BTC-USD",
        "side": "buy",
        "quantity": "0.25",
        "price": "64000.50",
        "executed_at": "2026-11-23T10:00:00Z",
    },
    "trade.cancelled": {"trade_id": "t1", "order_id": "o1", "reason": "user"},
    "account.created": {"owner": "Ada", "currency": "EUR"},
    "account.balance_changed": {"asset": "EUR", "delta": "-1.5", "balance": "10", "reason": "fee"},
    "account.closed": {"reason": "requested"},
}
ENVELOPE_KEYS = ["id", "type", "account_id", "occurred_at", "data", "traceparent", "sequence"]
# Values near the edges of what the envelope accepts, beside arbitrary JSON.
EDGY = st.sampled_from(
    [
        "",
        "x" * 300,
        "9999-12-31T23:59:59-23:59",
        "0001-01-01T00:00:00+23:59",
        "2026-01-01T00:00:00",
        "2026-02-30T00:00:00Z",
        "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01",
        "1e400",
        "-0",
        "0." + "1" * 40,
        10**20,
        -1,
        1.5,
    ]
)


@st.composite
def envelopes(draw: st.DrawFn) -> dict[str, Any]:
    """A valid envelope of a random type with up to four fields replaced, added or removed,
    at the top or inside ``data``."""
    kind = draw(st.sampled_from(EVENT_TYPES))
    data = dict(SAMPLE_DATA[kind])
    envelope: dict[str, Any] = {"type": kind, "account_id": "acc_1", "data": data}
    for _ in range(draw(st.integers(0, 4))):
        inside = draw(st.booleans())
        target = data if inside else envelope
        known = list(SAMPLE_DATA[kind]) if inside else ENVELOPE_KEYS
        key = draw(st.sampled_from(known) | TEXT)
        if draw(st.integers(0, 5)) == 0:
            target.pop(key, None)
        else:
            target[key] = draw(EDGY | TEXT | JSON)
    return envelope


def _storable(text: str) -> bool:
    """What PostgreSQL's text and jsonb accept: encodable as UTF-8, no NUL."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return "\x00" not in text


def _assert_one_printable_line(exc: Exception) -> None:
    message = str(exc)
    assert message and message.isprintable(), repr(message)


def _assert_well_formed(event: NewEvent) -> None:
    """An accepted event can be written and read back as it is, and validates again unchanged."""
    assert event.type in EVENT_TYPES
    assert event.occurred_at.tzinfo is not None
    for text in (event.id, event.account_id, orjson.dumps(event.data).decode()):
        assert _storable(text), repr(text)
        assert not any(ord(c) < 0x20 or 0x7F <= ord(c) <= 0x9F for c in text), repr(text)
    assert check_new_event(event) == event


@FUZZ
@given(envelopes())
def test_the_envelope_parser_returns_a_storable_event_or_refuses_in_one_line(raw):
    try:
        event = parse_event(raw)
    except InputError as exc:
        _assert_one_printable_line(exc)
    else:
        _assert_well_formed(event)


@FUZZ
@given(JSON)
def test_the_envelope_parser_refuses_any_other_json_value_in_one_line(raw):
    try:
        event = parse_event(raw)
    except InputError as exc:
        _assert_one_printable_line(exc)
    else:
        _assert_well_formed(event)


@FUZZ
@given(envelopes(), st.data())
def test_a_new_event_built_by_hand_is_validated_or_refused_in_one_line(raw, data):
    # Any field of a NewEvent replaced by anything: check_new_event is what publish_many runs.
    try:
        event = parse_event({**raw, "id": "evt_1"})
    except InputError:
        return
    field = data.draw(st.sampled_from(["id", "type", "account_id", "occurred_at", "data"]))
    fields = {
        "id": event.id,
        "type": event.type,
        "account_id": event.account_id,
        "occurred_at": event.occurred_at,
        "data": event.data,
    }
    fields[field] = data.draw(EDGY | TEXT | JSON)
    try:
        checked = check_new_event(NewEvent(**fields))
    except InputError as exc:
        _assert_one_printable_line(exc)
    else:
        _assert_well_formed(checked)


def _lines(envelope: dict[str, Any]) -> bytes:
    try:
        return orjson.dumps(envelope)
    except TypeError:  # a lone surrogate or an integer orjson refuses: the bytes are still input
        return repr(envelope).encode("utf-8", "surrogatepass")


LINE = (
    st.builds(_lines, envelopes())
    | st.binary(max_size=200)
    | st.builds(lambda s: s.encode("utf-8", "surrogatepass"), TEXT)
)


@st.composite
def inputs(draw: st.DrawFn) -> bytes:
    """A publish input: lines of envelopes, bytes and text, some with a byte flipped, joined by
    LF or CRLF."""
    lines = draw(st.lists(LINE, max_size=6))
    out = []
    for line in lines:
        flipped = line
        if line and draw(st.integers(0, 3)) == 0:
            at = draw(st.integers(0, len(line) - 1))
            flipped = line[:at] + bytes([draw(st.integers(0, 255))]) + line[at + 1 :]
        out.append(flipped)
    return draw(st.sampled_from([b"\n", b"\r\n"])).join(out)


@FUZZ
@given(inputs())
def test_the_line_reader_names_every_refusal_by_line_and_never_raises(data):
    numbers = []
    for number, outcome in read_events(io.BytesIO(data)):
        numbers.append(number)
        if isinstance(outcome, InputError):
            _assert_one_printable_line(outcome)
            assert str(outcome).startswith(f"line {number}: ")
        else:
            _assert_well_formed(outcome)
    # Every non-blank line is accounted for, once, in order.
    expected = [n for n, line in enumerate(data.split(b"\n"), start=1) if line.strip()]
    if data.startswith(b"\xef\xbb\xbf") and not data[3:].split(b"\n")[0].strip():
        expected = expected[1:]
    assert numbers == expected


@FUZZ
@given(st.binary(max_size=300) | st.builds(_lines, envelopes()))
def test_one_line_parses_to_a_storable_event_or_an_input_error(content):
    try:
        event = parse_line(content)
    except InputError as exc:
        _assert_one_printable_line(exc)
    else:
        _assert_well_formed(event)


HEADER_VALUE = (
    st.none()
    | st.booleans()
    | st.integers()
    | st.floats()
    | st.binary(max_size=8)
    | TEXT
    | st.lists(st.none() | st.integers() | st.floats() | TEXT | st.booleans(), max_size=4)
)
BODY = (
    st.binary(max_size=120)
    | st.builds(lambda e: _lines({**e, "id": "evt_1", "sequence": 1}), envelopes())
    | st.builds(
        b"\n".join,
        st.lists(st.builds(lambda e: _lines({**e, "sequence": 1}), envelopes()), max_size=3),
    )
)


@st.composite
def messages(draw: st.DrawFn) -> SimpleNamespace:
    # What decode reads of an incoming message: its body, content type and headers.
    headers = draw(
        st.none()
        | st.dictionaries(
            st.sampled_from(["x-created-at-us", "x-created-at", "traceparent"]) | TEXT,
            HEADER_VALUE,
            max_size=3,
        )
    )
    content_type = draw(st.sampled_from([SINGLE, PACK, None, "text/plain"]))
    return SimpleNamespace(body=draw(BODY), content_type=content_type, headers=headers)


@FUZZ
@given(messages())
def test_the_wire_decoder_returns_events_or_poison_and_nothing_else(message):
    assert event_count(message) >= 1
    try:
        events = decode(message)
    except PoisonMessageError as exc:
        _assert_one_printable_line(exc)
    else:
        assert events and all(isinstance(e, WireEvent) for e in events)
        assert all(e.facts.id and e.facts.type and e.facts.account_id for e in events)


DURATION = (
    st.builds(
        "{0}{1}{2}{3}{0}".format,
        st.sampled_from(["", " ", "\t"]),
        st.integers(0, 10**400).map(str) | st.text(st.characters(categories=["Nd"]), max_size=3),
        st.sampled_from(["", ".5", ".", ".000000000001"]),
        st.sampled_from(["ms", "s", "m", "h", "d", "", "w", "S"]),
    )
    | TEXT
)


@FUZZ
@given(DURATION)
def test_a_duration_is_a_non_negative_number_of_seconds_or_a_value_error(text):
    try:
        seconds = parse_duration_s(text)
    except ValueError as exc:
        _assert_one_printable_line(exc)
    else:
        assert 0 <= seconds < math.inf  # a 400-digit duration was float("inf") before its bound


@FUZZ
@given(st.lists(DURATION, max_size=5).map(",".join) | TEXT)
def test_a_schedule_is_a_tuple_of_durations_or_a_value_error(text):
    try:
        schedule = parse_schedule_s(text)
    except ValueError as exc:
        _assert_one_printable_line(exc)
    else:
        assert schedule and all(0 <= s < math.inf for s in schedule)


HTTP_DATE = st.builds(
    "{}, {:02d} {} {:04d} {:02d}:{:02d}:{:02d} {}".format,
    st.sampled_from(["Mon", "Thu", "Xyz", ""]),
    st.integers(0, 99),
    st.sampled_from(["Jan", "Feb", "Dec", "Foo"]),
    st.integers(0, 9999),
    st.integers(0, 99),
    st.integers(0, 99),
    st.integers(0, 99),
    st.sampled_from(["GMT", "UTC", "+2359", "-2359", "+9999", "", "EST"]),
)
RETRY_AFTER = (
    st.none()
    | TEXT
    | HTTP_DATE
    | st.integers(0, 10**30).map(str)
    | st.text(st.characters(categories=["Nd", "No"]), min_size=1, max_size=4)  # "²", "٣"
)


@FUZZ
@given(RETRY_AFTER, st.datetimes(timezones=st.just(UTC)))
def test_retry_after_is_a_non_negative_delay_or_none_and_never_raises(value, now):
    delay = parse_retry_after_s(value, now=now)
    assert delay is None or (isinstance(delay, float) and delay >= 0), delay


def test_retry_after_a_digit_python_calls_a_digit_but_float_refuses_is_ignored():
    # "²".isdigit() is True and float("²") raises: the worker's attempt loop used to crash on it.
    assert parse_retry_after_s("²") is None
    assert parse_retry_after_s("3²") is None
    now = datetime(2026, 1, 1, tzinfo=UTC)
    assert parse_retry_after_s("Thu, 01 Jan 2026 00:00:30 GMT", now=now) == 30
    assert parse_retry_after_s("30", now=now - timedelta(days=1)) == 30


def test_a_pack_that_claims_no_events_still_counts_as_one_message_to_answer():
    # Found by the decoder property: an empty header list counted as 0 events.
    empty = SimpleNamespace(body=b"", content_type=PACK, headers={"x-created-at-us": []})
    assert event_count(empty) == 1
