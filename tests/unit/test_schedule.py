"""The file order the suite's two xdist workers take work in (tests/schedule.py): heaviest file
first, each file kept whole and in its own order, and every weight naming a file that exists."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from tests.schedule import DEFAULT_S, WEIGHTS_S, longest_first

ROOT = Path(__file__).resolve().parents[2]


@dataclass(frozen=True)
class _Item:
    nodeid: str


def test_files_start_heaviest_first_and_each_stays_whole_and_in_its_order():
    items = [
        _Item("tests/a.py::one"),
        _Item("tests/a.py::two"),
        _Item("tests/b.py::one"),
        _Item("tests/c.py::one[x]"),
        _Item("tests/c.py::one[y]"),
        _Item("tests/d.py::one"),
    ]
    weights = {"tests/c.py": 300.0, "tests/a.py": 1.0, "tests/d.py": DEFAULT_S}
    ordered = [i.nodeid for i in longest_first(items, weights)]
    assert ordered == [
        "tests/c.py::one[x]",
        "tests/c.py::one[y]",
        "tests/b.py::one",  # unlisted: DEFAULT_S, before d.py (equal) as collected
        "tests/d.py::one",
        "tests/a.py::one",
        "tests/a.py::two",
    ]


def test_every_weight_names_a_test_file_that_exists():
    assert WEIGHTS_S, "no weights: the order would be collection order"
    missing = [name for name in WEIGHTS_S if not (ROOT / name).is_file()]
    assert missing == []
