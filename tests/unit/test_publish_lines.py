"""The publish command's line reader: bytes in, one event or one named refusal per line."""

from __future__ import annotations

import io
import json

import pytest

from delivery.cli.lines import MAX_LINE_BYTES, read_events
from delivery.errors import InputError
from delivery.events import NewEvent

GOOD = json.dumps(
    {"type": "account.closed", "account_id": "acc_1", "data": {"reason": "requested"}}
).encode()


def outcomes(data: bytes) -> list[tuple[int, str]]:
    """``(line, "ok")`` for an event, ``(line, message)`` for a refusal."""
    return [
        (number, str(outcome) if isinstance(outcome, InputError) else "ok")
        for number, outcome in read_events(io.BytesIO(data))
    ]


def test_good_lines_become_events_and_blank_lines_are_skipped():
    found = list(read_events(io.BytesIO(b"\n".join([GOOD, b"", b"  \r", GOOD + b"\r"]))))
    assert [n for n, _ in found] == [1, 4]
    assert all(isinstance(event, NewEvent) for _, event in found)


@pytest.mark.parametrize(
    ("line", "message"),
    [
        (GOOD.replace(b"requested", b"req\\u0000uested"), "line 2: data.reason: contains a control character (U+0000)"),
        (GOOD.replace(b"acc_1", b"acc\\u001b_1"), "line 2: account_id: contains a control character (U+001B)"),
        (GOOD.replace(b"requested", b"req\x00uested"), "line 2: invalid JSON: Invalid control character at (column"),
        (GOOD.replace(b"requested", b"req\xffuested"), "line 2: is not valid UTF-8 (byte 0xff at column"),
        (GOOD.replace(b"requested", b"req\xc3"), "line 2: is not valid UTF-8 (byte 0xc3"),
        (GOOD.replace(b"requested", b"\xed\xa0\x80"), "line 2: is not valid UTF-8 (byte 0xed"),  # a surrogate
        (GOOD.replace(b"requested", b"\\ud800"), "line 2: data.reason: is not valid Unicode"),
        (GOOD[:-1] + b', "type": "trade.executed"}', "line 2: invalid JSON: duplicate key 'type'"),
        (GOOD.replace(b'"requested"', b'"x", "reason": "y"'), "line 2: invalid JSON: duplicate key 'reason'"),
        (GOOD[:-1] + b', "n": NaN}', "line 2: invalid JSON: NaN is not a JSON number"),
        (b"[" * 100_000 + b"]" * 100_000, "line 2: invalid JSON: nested too deeply"),
        (b'{"n": ' + b"9" * 5000 + b"}", "line 2: invalid JSON: a number is too long"),
        (b"{", "line 2: invalid JSON: Expecting property name enclosed in double quotes (column 2)"),
        (b"[1]", "line 2: an event must be a JSON object"),
    ],
)
def test_a_bad_line_is_named_with_the_reason_and_the_others_still_read(line, message):
    found = outcomes(b"\n".join([GOOD, line, GOOD]))
    assert [n for n, _ in found] == [1, 2, 3]
    assert found[0][1] == found[2][1] == "ok"
    assert found[1][1].startswith(message), found[1][1]


def test_a_line_over_1_mb_is_refused_without_being_kept_and_numbering_goes_on():
    padded = GOOD[:-1] + b" " * (MAX_LINE_BYTES - len(GOOD)) + b"}"
    assert len(padded) == MAX_LINE_BYTES
    huge = b"x" * (3 * MAX_LINE_BYTES)
    data = b"\n".join([GOOD, padded, padded + b" ", huge, GOOD])
    assert outcomes(data) == [
        (1, "ok"),
        (2, "ok"),  # exactly 1 MB is allowed
        (3, "line 3: is longer than 1 MB (1,000,000 bytes)"),
        (4, "line 4: is longer than 1 MB (1,000,000 bytes)"),
        (5, "ok"),
    ]
    assert outcomes(huge) == [(1, "line 1: is longer than 1 MB (1,000,000 bytes)")]


def test_a_byte_order_mark_before_the_first_line_is_ignored():
    assert outcomes(b"\xef\xbb\xbf" + GOOD + b"\n" + GOOD) == [(1, "ok"), (2, "ok")]
    assert outcomes(GOOD + b"\n\xef\xbb\xbf" + GOOD)[1][1].startswith("line 2: invalid JSON")
