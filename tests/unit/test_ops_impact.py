"""On-call's list: only unhealthy subscriptions, the most stuck work first."""

from __future__ import annotations

from typing import Any

from delivery.api.ops import by_impact, is_unhealthy


def _sub(id_: str, **over: Any) -> dict[str, Any]:
    base = {
        "id": id_,
        "state": "active",
        "circuit": "closed",
        "consecutive_failures": 0,
        "failing_since": None,
        "pending": 0,
        "retrying": 0,
        "dead": 0,
    }
    return base | over


def test_a_healthy_or_merely_paused_subscription_is_left_out():
    assert not is_unhealthy(_sub("a", pending=40))  # busy is not unhealthy
    assert not is_unhealthy(_sub("b", state="paused", pending=5))
    assert is_unhealthy(_sub("c", circuit="open"))
    assert is_unhealthy(_sub("d", state="disabled"))
    assert is_unhealthy(_sub("e", dead=1))


def test_sorted_by_stuck_work_then_by_how_long_it_has_been_failing():
    subs = [
        _sub("small", dead=1),
        _sub("healthy", pending=100),
        _sub("big", retrying=30, pending=5, consecutive_failures=3),
        _sub("later", dead=2, failing_since="2026-12-07T10:00:00Z"),
        _sub("earlier", dead=2, failing_since="2026-12-07T09:00:00Z"),
    ]
    assert [s["id"] for s in by_impact(subs)] == ["big", "earlier", "later", "small"]
