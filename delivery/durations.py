"""Parsing of human durations (``5s``, ``250ms``, ``2h``) used by settings and the CLI."""

from __future__ import annotations

import math
import re

_UNITS_S = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0}
_DURATION = re.compile(r"^\s*([0-9]{1,12}(?:\.[0-9]{1,9})?)\s*(ms|s|m|h|d)\s*$")
# A retry schedule's bounds: a step longer than a week parks a delivery past any sane outage
# (and a huge one overflows PostgreSQL's intervals); more steps than this is a typo.
MAX_STEP_S = 7 * 86400.0
MAX_STEPS = 50


def parse_duration_s(text: str) -> float:
    """``"5m"`` -> ``300.0``. Raises ``ValueError`` naming the bad token."""
    match = _DURATION.match(text)
    if match is None:
        raise ValueError(f"{text.strip()!r} is not a duration like 500ms, 5s, 5m, 2h")
    return float(match.group(1)) * _UNITS_S[match.group(2)]


def parse_schedule_s(text: str) -> tuple[float, ...]:
    """``"5s,5m,30m"`` -> ``(5.0, 300.0, 1800.0)``: the delays before attempts 2, 3, 4..."""
    if not text.strip():
        raise ValueError("the retry schedule is empty; give delays like 5s,5m,30m")
    parts = text.split(",")
    if any(not p.strip() for p in parts):
        raise ValueError(f"{text.strip()!r} has an empty step; give delays like 5s,5m,30m")
    return check_schedule_s(tuple(parse_duration_s(p) for p in parts))


def check_schedule_s(schedule_s: tuple[float, ...]) -> tuple[float, ...]:
    """The schedule itself, if every step is 0 to 7 days and it has 1 to 50 steps."""
    if not 1 <= len(schedule_s) <= MAX_STEPS:
        raise ValueError(f"a retry schedule has 1 to {MAX_STEPS} steps, not {len(schedule_s)}")
    for step in schedule_s:
        if not 0 <= step <= MAX_STEP_S:  # also refuses nan
            shown = format_duration_s(step) if math.isfinite(step) and step > 0 else repr(step)
            raise ValueError(f"a retry step of {shown} is not between 0s and 7d")
    return schedule_s


def format_duration_s(seconds: float) -> str:
    """The inverse of ``parse_duration_s`` for display: ``300.0`` -> ``"5m"``."""
    for unit, size in (("d", 86400.0), ("h", 3600.0), ("m", 60.0), ("s", 1.0)):
        if seconds >= size and (seconds / size).is_integer():
            return f"{int(seconds / size)}{unit}"
    return f"{round(seconds * 1000)}ms"


def format_schedule(schedule_s: tuple[float, ...]) -> str:
    return ",".join(format_duration_s(s) for s in schedule_s)
