"""What the sections of the report share: a figure across runs, and a verdict."""

from __future__ import annotations

from typing import Any


def vals(runs: list[dict[str, Any]], scenario: str, key: str) -> list[float]:
    return [float(r[scenario][key]) for r in runs if scenario in r]


def met(ok: bool) -> str:
    return "**met**" if ok else "**not met**"
