# ruff: noqa: RUF001  (markdown: typographic signs meant)
"""The large-backlog section, and its verdicts (memory flat, steady rate) for the targets."""

from __future__ import annotations

import statistics
from typing import Any


def backlog_verdicts(b: dict[str, Any]) -> tuple[bool, bool]:
    """Memory flat: RSS after the first 10 s stays within 10 MB. Steady rate: no window of the
    table below under half the median window's rate (the last, partial window aside)."""
    samples = b.get("samples") or []
    rss = [x["rss_mb"] for x in samples if x["t_s"] >= 10] or [b["rss_peak_mb"]]
    rates = [r for _lo, _hi, _n, r, *_rest in backlog_windows(samples)][:-1]
    median = statistics.median(rates) if rates else 0.0
    return max(rss) - min(rss) <= 10, bool(rates) and min(rates) >= median / 2


def backlog(results: dict[str, Any]) -> list[str]:
    b = results.get("backlog")
    if not b:
        return []
    samples = b["samples"]
    rss = [s["rss_mb"] for s in samples]
    delivered = b.get("delivered", b["events"])
    if b.get("completed", True):
        outcome = (
            f"Drained in {b['wall_s']:.0f} s: **{b['events_per_s']:,.0f} events/s** overall "
            f"({b['events_per_s_after_first']:,.0f} from the first delivery, "
            f"{b['first_delivery_s']:.1f} s after start)."
        )
    else:
        outcome = (
            f"**Not drained**: the bench stopped at its deadline of {b['timeout_s']:.0f} s with "
            f"{delivered:,} of {b['events']:,} delivered, **{b['events_per_s']:,.0f} events/s** "
            "on average."
        )
    flat, steady = backlog_verdicts(b)
    out = [
        "## Large backlog",
        "",
        f"The issue asks for 1,000,000 events; this run used **{b['events']:,}**. All "
        f"were in the outbox before one `delivery run` started. {outcome} RSS sampled "
        f"every second: min {min(rss):.0f} MB, max {max(rss):.0f} MB, last {rss[-1]:.0f} MB "
        f"(peak VmHWM {b['rss_peak_mb']:.0f} MB). Recorded deliveries: {b['recorded']:,}.",
        "",
        "| window | delivered in window | events/s | RSS MB at end | CPU % (one core = 100) |",
        "|---|---|---|---|---|",
    ]
    for lo, hi, n, rate, rss_mb, cpu in backlog_windows(samples):
        out.append(f"| {lo:.0f}–{hi:.0f} s | {n:,} | {rate:,.0f} | {rss_mb:.0f} | {cpu:.0f} |")
    out += [
        "",
        f"Verdicts: memory {'flat' if flat else 'not flat'} (RSS after the first 10 s within "
        f"10 MB); rate {'steady' if steady else 'not steady'} (no window, the last aside, under "
        "half the median window's rate).",
        "",
    ]
    return out


def backlog_windows(
    samples: list[dict[str, float]],
) -> list[tuple[float, float, int, float, float, float]]:
    """About twelve windows: (from s, to s, delivered, events/s, RSS MB at end, CPU %)."""
    rows = []
    step = max(1, len(samples) // 12)
    prev = {"t_s": 0.0, "delivered": 0, "cpu_s": samples[0]["cpu_s"] if samples else 0.0}
    for i in [*range(step - 1, len(samples) - 1, step), len(samples) - 1] if samples else []:
        s = samples[i]
        dt = s["t_s"] - prev["t_s"]
        if dt <= 0:
            continue
        n = int(s["delivered"] - prev["delivered"])
        cpu = 100 * (s["cpu_s"] - prev["cpu_s"]) / dt
        rows.append((prev["t_s"], s["t_s"], n, n / dt, s["rss_mb"], cpu))
        prev = s
    return rows
