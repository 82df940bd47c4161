"""Parsing of human durations (``5s``, ``250ms``, ``2h``) used by settings and the CLI."""

from __future__ import annotations

import re

_UNITS_S = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0}
_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(ms|s|m|h|d)\s*$")


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
    return tuple(parse_duration_s(p) for p in parts)


def format_duration_s(seconds: float) -> str:
    """The inverse of ``parse_duration_s`` for display: ``300.0`` -> ``"5m"``."""
    for unit, size in (("d", 86400.0), ("h", 3600.0), ("m", 60.0), ("s", 1.0)):
        if seconds >= size and (seconds / size).is_integer():
            return f"{int(seconds / size)}{unit}"
    return f"{round(seconds * 1000)}ms"


def format_schedule(schedule_s: tuple[float, ...]) -> str:
    return ",".join(format_duration_s(s) for s in schedule_s)
