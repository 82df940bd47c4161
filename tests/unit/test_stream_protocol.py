"""The stream's subscribe message: what is accepted, and one line naming the field otherwise."""

from __future__ import annotations

import pytest

from delivery.api.stream_protocol import parse_subscribe
from delivery.errors import InputError


def test_a_full_subscribe_message_is_read():
    sub = parse_subscribe(
        '{"op": "subscribe", "accounts": ["a1", "a2"], "types": ["trade.*"], "after": {"a1": 7}}'
    )
    assert sub.accounts == frozenset({"a1", "a2"})
    assert sub.after == {"a1": 7}
    assert sub.wants("a1", "trade.executed")
    assert not sub.wants("a1", "account.closed")
    assert not sub.wants("a3", "trade.executed")


def test_absent_accounts_and_types_mean_every_one():
    sub = parse_subscribe('{"op": "subscribe"}')
    assert sub.wants("anything", "account.closed")
    assert sub.after == {}


@pytest.mark.parametrize(
    ("raw", "names"),
    [
        ("not json", "subscribe"),
        ('{"op": "unsubscribe"}', "op"),
        ('{"op": "subscribe", "accounts": []}', "accounts"),
        ('{"op": "subscribe", "types": ["nope.*"]}', "types: "),
        ('{"op": "subscribe", "after": {"a1": -1}}', "after.a1"),
        ('{"op": "subscribe", "accounts": ["a1"], "after": {"a2": 1}}', "after"),
        ('{"op": "subscribe", "extra": 1}', "extra"),
    ],
)
def test_a_bad_message_is_one_line_naming_the_field(raw, names):
    with pytest.raises(InputError) as refused:
        parse_subscribe(raw)
    assert names in str(refused.value)
    assert "\n" not in str(refused.value)
