"""The command line's numbers and ids are parsed strictly: ASCII digits, within a range; a bad
one is a usage error (exit 2), before any service is touched."""

import pytest

from delivery.cli.parser import build_parser
from delivery.errors import InputError
from delivery.store.dead_letters import ids_from_args
from delivery.store.subscriptions import parse_subscription_id


@pytest.mark.parametrize(
    "argv",
    [
        ["run", "--admin-port", "\u0669\u0666\u0660\u0660"],  # Arabic-Indic 9600: int() says yes
        ["worker", "--admin-port", "1_000"],  # int() says yes
        ["relay", "--admin-port", " 9600"],
        ["relay", "--admin-port", "70000"],
        ["dlq", "list", "--limit", "-1"],
        ["dlq", "list", "--limit", "0"],
        ["dlq", "list", "--limit", "10001"],
        ["demo", "--events", "0"],
        ["demo", "--events", "1e6"],
    ],
)
def test_bad_numbers_are_usage_errors(argv, capsys):
    with pytest.raises(SystemExit) as info:
        build_parser().parse_args(argv)
    assert info.value.code == 2
    assert "is not a whole number from" in capsys.readouterr().err


def test_good_numbers_parse():
    assert build_parser().parse_args(["run", "--admin-port", "0"]).admin_port == 0
    assert build_parser().parse_args(["dlq", "list", "--limit", "10000"]).limit == 10_000
    assert build_parser().parse_args(["dlq", "list"]).limit == 1000


@pytest.mark.parametrize("value", ["\u00b2", "\u0661\u0662", "1" * 19, "-1", "+1", " 1", "1.0", ""])
def test_dead_letter_ids_are_ascii_digits(value):
    with pytest.raises(InputError, match="is not a number"):
        ids_from_args([value])


def test_dead_letter_ids_parse():
    assert ids_from_args(["1", "007", "9" * 18]) == (1, 7, int("9" * 18))


@pytest.mark.parametrize("value", ["", "sub_x\n", "../etc", "sub x", "sub_\u00e9", "s" * 65])
def test_subscription_ids_are_refused_unless_they_could_be_one(value):
    with pytest.raises(InputError, match="is not a subscription id"):
        parse_subscription_id(value)
