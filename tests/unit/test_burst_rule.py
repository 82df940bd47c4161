"""What burst mode counts as work left, and how it says so (pure)."""

from __future__ import annotations

import pytest

from delivery.worker.burst import Remaining


def test_nothing_left_is_idle_and_says_nothing():
    assert Remaining().idle
    assert str(Remaining()) == "nothing"


@pytest.mark.parametrize("part", ["unpublished", "undispatched", "queued", "deliveries"])
def test_any_one_part_left_is_not_idle_and_is_named(part):
    left = Remaining(**{part: 3})
    assert not left.idle
    assert str(left) == f"3 {part}"


def test_what_is_left_is_listed_part_by_part():
    assert str(Remaining(unpublished=2, deliveries=1)) == "2 unpublished, 1 deliveries"
