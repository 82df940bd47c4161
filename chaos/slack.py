"""Fault-window slack: how near a fault window a moment must fall for the fault to explain
what happened then (a duplicate's first arrival, a redriven message's publish)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from chaos.context import FaultWindow

__all__ = ["Slack", "explained", "window_of"]


@dataclass(frozen=True)
class Slack:
    """How far from a fault window a duplicate's first arrival may be and still be explained:
    an attempt in flight when the fault began (before), a lease or retry that ends after it."""

    before_s: float = 5.0
    after_s: float = 15.0


def explained(at: float, faults: Sequence[FaultWindow], slack: Slack) -> bool:
    """True when ``at`` falls in some fault window or its slack."""
    for w in faults:
        end = w.end if w.end is not None else float("inf")
        if w.start - slack.before_s <= at <= end + slack.after_s:
            return True
    return False


def window_of(at: float | None, faults: Sequence[FaultWindow], slack: Slack) -> int | None:
    """The index of the fault window ``at`` falls in (the nearest, if it is only near some),
    None when it is outside every window and its slack."""
    best: int | None = None
    best_distance = float("inf")
    for i, w in enumerate(faults):
        end = w.end if w.end is not None else float("inf")
        if at is None or not w.start - slack.before_s <= at <= end + slack.after_s:
            continue
        distance = max(w.start - at, at - end, 0.0)
        if distance < best_distance:
            best, best_distance = i, distance
    return best
