# ruff: noqa: E501  (markdown: table rows read better unwrapped)
"""The profile section: py-spy's sample shares, then a person's reading of them."""

from __future__ import annotations

from pathlib import Path
from typing import Any

# Reading of the profile by a person (suggestions for the code's owners), shown under the figures.
PROFILE_NOTES = Path(__file__).resolve().parent.parent / "profile_notes.md"


def profile(results: dict[str, Any]) -> list[str]:
    p = results.get("profile")
    if not p:
        return []
    flat = p["flat"]
    out = [
        "## Profile findings",
        "",
        f"py-spy 0.4 (`record --nonblocking --rate 200 --format raw`) on one `delivery run` during a "
        f"flat-out run of {flat['events']:,} events ({flat['events_per_s']:,.0f} events/s, "
        f"{flat['cpu_ms_per_event']:.2f} ms CPU/event under the profiler); "
        f"{p['samples']:,} samples (py-spy's default idle filter). Shares are of those samples. "
        "Frames without Python code (uvloop's C loop, asyncpg's and aiohttp's Cython parts, "
        "syscalls) are charged to the nearest Python frame that called them; with uvloop some "
        "waiting in epoll may also land on `Runner.run`, so its self share is an upper bound.",
        "",
        "By package (self time of the innermost Python frame):",
        "",
        "| package | share |",
        "|---|---|",
    ]
    out += [f"| {name} | {pct:.1f} % |" for name, _c, pct in p["packages"]]
    out += ["", "Hottest frames (self):", "", "| frame | share |", "|---|---|"]
    out += [f"| `{name}` | {pct:.1f} % |" for name, _c, pct in p["self_top"][:15]]
    out += [
        "",
        "Our code, inclusive (the frame or anything it calls):",
        "",
        "| frame | share |",
        "|---|---|",
    ]
    out += [f"| `{name}` | {pct:.1f} % |" for name, _c, pct in p["inclusive_ours"][:15]]
    if p.get("inclusive_libraries"):
        out += ["", "Client libraries, inclusive:", "", "| frame | share |", "|---|---|"]
        out += [f"| `{name}` | {pct:.1f} % |" for name, _c, pct in p["inclusive_libraries"][:12]]
    out.append("")
    if PROFILE_NOTES.exists():
        out += [PROFILE_NOTES.read_text().rstrip(), ""]
    return out
