# ruff: noqa: RUF001, E501  (markdown: typographic signs meant, table rows read better unwrapped)
"""The sections on ours alone: a live producer, one setting changed, scaling with processes
and with fan-out, the relay's drain rate; the opt-in end-to-end and failure-handling runs."""

from __future__ import annotations

from typing import Any

from bench.measure import summarize
from bench.report.common import vals


def live(results: dict[str, Any]) -> list[str]:
    live = results.get("live")
    if not live:
        return []
    rate = summarize([r["events_per_s"] for r in live])
    cpu = summarize([r["cpu_ms_per_event"] for r in live])
    return [
        "## Ours with a live producer",
        "",
        f"{live[0]['events']:,} events published while the system runs (the producer shares the "
        f"two cores): **{rate.fmt(0)} events/s**, {cpu.fmt(2)} ms CPU/event, "
        f"runs: {len(live)}.",
        "",
    ]


def tuned(results: dict[str, Any]) -> list[str]:
    tuned = results.get("tuned")
    if not tuned or not tuned.get("runs"):
        return []
    runs = [r if "flat" in r else {"flat": r} for r in tuned["runs"]]
    env = ", ".join(f"`{k}={v}`" for k, v in tuned["env"].items())
    out = [
        "## Ours with one setting changed (not a default)",
        "",
        f"As above, one `delivery run`, with {env} (default 16). The per-subscriber request cap "
        "is a fairness knob (a slow subscriber holds at most its share; at 128 the subscriber's "
        "local queue is capped away, as one subscriber may hold a quarter of the process), and "
        "with a single subscriber it is the whole pipe. No guarantee depends on it.",
        "",
        "| runs | flat out events/s | CPU ms/event | peak RSS MB | paced p50 ms | p95 ms | p99 ms |",
        "|---|---|---|---|---|---|---|",
    ]
    row = [
        str(len(runs)),
        summarize(vals(runs, "flat", "events_per_s")).fmt(0),
        summarize(vals(runs, "flat", "cpu_ms_per_event")).fmt(2),
        summarize(vals(runs, "flat", "rss_max_mb")).fmt(0),
    ]
    paced_runs = [r for r in runs if "paced" in r]
    for key in ("p50_ms", "p95_ms", "p99_ms"):
        row.append(summarize(vals(paced_runs, "paced", key)).fmt(1) if paced_runs else "—")
    out += ["| " + " | ".join(row) + " |", ""]
    return out


def processes(results: dict[str, Any]) -> list[str]:
    data = results.get("processes")
    if not data:
        return []
    out = [
        "## Ours: scaling with processes",
        "",
        "N × `delivery run` (relay + worker each), one subscription, flat out (staged backlog).",
        "",
        "| processes | events/s | CPU ms/event | peak RSS MB/process |",
        "|---|---|---|---|",
    ]
    for n, runs in data.items():
        out.append(
            f"| {n} | {summarize([r['events_per_s'] for r in runs]).fmt(0)} | "
            f"{summarize([r['cpu_ms_per_event'] for r in runs]).fmt(2)} | "
            f"{summarize([r['rss_max_mb'] for r in runs]).fmt(0)} |"
        )
    out += ["", "The machine has 2 cores, shared with PostgreSQL, RabbitMQ and the receiver.", ""]
    return out


def fanout(results: dict[str, Any]) -> list[str]:
    data = results.get("fanout")
    if not data:
        return []
    out = [
        "## Ours: scaling with fan-out",
        "",
        "One `delivery run`, N subscriptions matching every event, flat out (staged backlog).",
        "",
        "| subscriptions | events | deliveries/s | events/s | CPU ms/delivery | peak RSS MB |",
        "|---|---|---|---|---|---|",
    ]
    for n, runs in data.items():
        out.append(
            f"| {n} | {runs[0]['events']:,} | {summarize([r['deliveries_per_s'] for r in runs]).fmt(0)} | "
            f"{summarize([r['events_per_s'] for r in runs]).fmt(0)} | "
            f"{summarize([r['cpu_ms_per_delivery'] for r in runs]).fmt(3)} | "
            f"{summarize([r['rss_max_mb'] for r in runs]).fmt(0)} |"
        )
    out.append("")
    return out


def relay(results: dict[str, Any]) -> list[str]:
    relay = results.get("relay")
    if not relay or not relay.get("rates"):
        return []
    return [
        "## Relay drain",
        "",
        f"`bench/scenarios/relay.py`: {relay['rows']:,} rows prepared in the outbox, one relay "
        f"(batch {relay['batch']}, default settings, in the bench process), timed by the rows' "
        "own `published_at` marks from the first batch's commit to the last one's (the bench "
        "polls lightly, every 100 ms, so it does not compete for PostgreSQL): "
        f"**{summarize(relay['rates']).fmt(0)} rows/s** ({len(relay['rates'])} runs).",
        "",
    ]


def e2e(results: dict[str, Any]) -> list[str]:
    runs = results.get("e2e")
    if not runs:
        return []
    first = runs[0]
    pace = f"at {first['rate']:,.0f} events/s" if first["rate"] else "flat out"
    out = [
        "## Ours end to end, producer in batches (opt-in `e2e`)",
        "",
        f"{first['events']:,} events committed in batches of 100 {pace} while "
        f"{first['processes']} × `delivery run` delivers each to {_count(first['subscriptions'], 'subscription')}; "
        "latency from each batch's commit to each arrival (nearest rank), CPU and peak RSS of "
        "the system's processes from the end of the warm-up.",
        "",
        "| runs | events/s | deliveries/s | p50 ms | p95 ms | p99 ms | CPU ms/event | peak RSS MB | bad signatures, duplicates |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    row = [
        str(len(runs)),
        summarize([r["events_per_s"] for r in runs]).fmt(0),
        summarize([r["deliveries_per_s"] for r in runs]).fmt(0),
        *(summarize([r[key] for r in runs]).fmt(1) for key in ("p50_ms", "p95_ms", "p99_ms")),
        summarize([r["cpu_ms_per_event"] for r in runs]).fmt(2),
        summarize([r["peak_rss_mb"] for r in runs]).fmt(0),
        f"{sum(r['bad_signatures'] for r in runs)}, {sum(r['duplicates'] for r in runs)}",
    ]
    out += ["| " + " | ".join(row) + " |", ""]
    return out


def failures(results: dict[str, Any]) -> list[str]:
    f = results.get("failures")
    if not f:
        return []
    flaky = f["flaky"]
    out = [
        "## Failure handling (opt-in `failures`)",
        "",
        f"One `delivery run`, {f['events']:,} events, started once the subscriptions exist "
        "(start-up included).",
        "",
        f"* **A subscriber failing 50 % of requests** (HTTP 500) next to a healthy one, retry "
        f"schedule `{f['schedule']}` (±20 % jitter), circuit breaker out of the way: "
        f"{flaky['attempts_per_event']:.2f} attempts per event (ideal for p = 0.5: 2.00), "
        f"{flaky['failed_attempts']:,} failed, {_count(flaky['dead'], 'dead letter')} once the schedule was "
        f"used up. Latency from commit to the first 2xx: healthy p50 {flaky['healthy_p50_ms']:,.0f} "
        f"ms, p99 {flaky['healthy_p99_ms']:,.0f} ms; failing p50 {flaky['flaky_p50_ms']:,.0f} ms, "
        f"p99 {flaky['flaky_p99_ms']:,.0f} ms (the extra scales with the schedule).",
    ]
    hang = f.get("hang")
    if hang:
        out.append(
            "* **A hanging subscriber** (never answers; `DELIVERY_HTTP_TIMEOUT_S=30`) next to a "
            f"healthy one: the healthy one got {hang['with_hang_per_s']:,.0f} deliveries/s, "
            f"against {hang['alone_per_s']:,.0f} alone ({hang['change_pct']:+.0f} %)."
        )
    out.append("")
    return out


def _count(n: int, noun: str) -> str:
    return f"{n:,} {noun}" + ("" if n == 1 else "s")
