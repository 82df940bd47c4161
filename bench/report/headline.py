# ruff: noqa: RUF001, E501  (markdown: typographic signs meant, table rows read better unwrapped)
"""The headline sections: the side-by-side results, where ours' paced latency went, and the
targets of the issue met or not."""

from __future__ import annotations

import statistics
from typing import Any

from bench.measure import summarize
from bench.report.backlog import backlog_verdicts
from bench.report.common import met, vals

# Figures the issue quotes, measured earlier on a machine of this kind (not by this bench).
REFERENCE = {
    "asyncio": {"events_per_s": 1428, "cpu_ms_per_event": 0.43, "rss_mb": 47, "p99_ms": 5.4},
    "dramatiq": {"events_per_s": 951, "cpu_ms_per_event": 1.27, "rss_mb": 229, "p99_ms": 98},
    "celery": {"events_per_s": 624, "cpu_ms_per_event": 1.80, "rss_mb": 278, "p99_ms": 167},
}
RATIO_TARGETS = {"asyncio": 1.4, "dramatiq": 2.0, "celery": 3.0}
P99_TARGET_MS = 25.0
CPU_TARGET_MS = 0.5
RSS_TARGET_MB = 80.0
RELAY_TARGET = 15_000.0


def summary(compare: dict[str, list[dict[str, Any]]]) -> list[str]:  # noqa: PLR0912
    if not compare:
        return []
    ours = compare.get("ours", [])
    ours_rate = summarize(vals(ours, "flat", "events_per_s")).median if ours else None
    out = [
        "## Results",
        "",
        "Medians of the runs, (min–max) in brackets. *Flat out*: 10,000 events (unless stated) "
        "staged at each system's entry point, clock from release to the last arrival. *Paced*: "
        "published at 500 events/s for 10 s, latency from the producer's call returning "
        "(commit, for ours) to arrival at the subscriber. CPU: all processes of the system, "
        "children included, over the flat-out run. RSS: peak (VmHWM) of the largest process; "
        "in brackets the sum over processes.",
        "",
        "| system | runs | flat out events/s | ours ÷ it | CPU ms/event | peak RSS MB/process (sum, procs) | paced p50 ms | p95 ms | p99 ms |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for name, runs in compare.items():
        if not runs:
            continue
        flat = [r for r in runs if "flat" in r]
        row = [runs[0]["system"], str(len(runs))]
        if flat:
            rate = summarize(vals(runs, "flat", "events_per_s"))
            row.append(rate.fmt(0))
            row.append(
                "—" if name == "ours" or ours_rate is None else f"{ours_rate / rate.median:.2f}×"
            )
            row.append(summarize(vals(runs, "flat", "cpu_ms_per_event")).fmt(2))
            rss = summarize(vals(runs, "flat", "rss_max_mb"))
            total = summarize(vals(runs, "flat", "rss_sum_mb"))
            procs = int(statistics.median(vals(runs, "flat", "processes")))
            row.append(f"{rss.median:.0f} ({total.median:.0f}, {procs})")
        else:
            row += ["—"] * 4
        if any("paced" in r for r in runs):
            for key in ("p50_ms", "p95_ms", "p99_ms"):
                row.append(summarize(vals(runs, "paced", key)).fmt(1))
        else:
            row += ["—"] * 3
        out.append("| " + " | ".join(row) + " |")
    out.append("")
    problems = []
    for name, runs in compare.items():
        for r in runs:
            for scenario in ("flat", "paced"):
                if scenario in r and (r[scenario]["bad_signatures"] or r[scenario]["duplicates"]):
                    problems.append(
                        f"{name} {scenario}: {r[scenario]['bad_signatures']} bad signatures, "
                        f"{r[scenario]['duplicates']} duplicates"
                    )
    out.append(
        "Every arrival's Standard Webhooks signature was verified by the receiver; every "
        "delivery was recorded in PostgreSQL before the run counted as done. "
        + (
            "Problems: " + "; ".join(problems) + "."
            if problems
            else "No bad signature and no duplicate in any run."
        )
    )
    rates = [r["paced"].get("achieved_rate") for rs in compare.values() for r in rs if "paced" in r]
    if rates:
        out.append(
            f"Achieved publish rate in the paced runs: {min(rates):.0f}–{max(rates):.0f} events/s."
        )
    out.append("")
    out += ["Reference figures quoted by the issue (measured earlier, not by this bench):", ""]
    out += ["| peer | events/s | CPU ms/event | RSS MB | paced p99 ms |", "|---|---|---|---|---|"]
    for name, ref in REFERENCE.items():
        out.append(
            f"| {name} | {ref['events_per_s']:,} | {ref['cpu_ms_per_event']} | {ref['rss_mb']} | "
            f"{ref['p99_ms']} |"
        )
    out.append("")
    return out


def stages(results: dict[str, Any]) -> list[str]:
    """Where ours' paced latency went, run by run (from the rows' timestamps)."""
    rows = []
    for label, runs in (
        ("default", results.get("compare", {}).get("ours", [])),
        ("share 128", (results.get("tuned") or {}).get("runs", [])),
    ):
        for i, r in enumerate(runs, start=1):
            stages = r.get("paced", {}).get("stages")
            if stages:
                rows.append((f"{label} #{i}", r["paced"], stages))
    if not rows:
        return []
    names = list(rows[0][2])
    out = [
        "### Ours, paced: where the latency went",
        "",
        "p50 / p99 ms per stage, from the rows' own timestamps: the producer's commit → the relay "
        "marked the row published (after the broker's confirm; a consumer can see the message "
        "first, hence small negative values in the next stage) → dispatch inserted the inbox row "
        "→ the attempt started → the subscriber got the POST → the outcome committed.",
        "",
        "| run | end to end | " + " | ".join(names) + " |",
        "|---" * (len(names) + 2) + "|",
    ]
    for label, paced_result, stages in rows:
        cells = [f"{stages[n]['p50_ms']:.1f} / {stages[n]['p99_ms']:.1f}" for n in names]
        total = f"{paced_result['p50_ms']:.1f} / {paced_result['p99_ms']:.1f}"
        out.append(f"| {label} | {total} | " + " | ".join(cells) + " |")
    out.append("")
    return out


def targets(results: dict[str, Any]) -> list[str]:
    compare = results.get("compare", {})
    ours = [r for r in compare.get("ours", []) if "flat" in r]
    out = ["## Targets", "", "| target | measured | |", "|---|---|---|"]
    if ours:
        ours_rate = summarize(vals(ours, "flat", "events_per_s")).median
        for name, factor in RATIO_TARGETS.items():
            runs = [r for r in compare.get(name, []) if "flat" in r]
            if not runs:
                out.append(f"| e2e flat out ≥ {factor}× {name} | not measured | |")
                continue
            ratio = ours_rate / summarize(vals(runs, "flat", "events_per_s")).median
            out.append(
                f"| e2e flat out ≥ {factor}× {name} | {ratio:.2f}× | {met(ratio >= factor)} |"
            )
        cpu = summarize(vals(ours, "flat", "cpu_ms_per_event"))
        out.append(
            f"| worker CPU ≤ {CPU_TARGET_MS} ms/event | {cpu.fmt(2)} | {met(cpu.median <= CPU_TARGET_MS)} |"
        )
        rss = summarize(vals(ours, "flat", "rss_max_mb"))
        out.append(
            f"| RSS ≤ {RSS_TARGET_MB:.0f} MB/process | {rss.fmt(0)} | {met(rss.median <= RSS_TARGET_MB)} |"
        )
    paced_runs = [r for r in compare.get("ours", []) if "paced" in r]
    if paced_runs:
        p99 = summarize(vals(paced_runs, "paced", "p99_ms"))
        out.append(
            f"| paced 500 ev/s p99 ≤ {P99_TARGET_MS:.0f} ms | {p99.fmt(1)} ms | {met(p99.median <= P99_TARGET_MS)} |"
        )
    relay = results.get("relay")
    if relay and relay.get("rates"):
        rate = summarize(relay["rates"])
        out.append(
            f"| relay drain ≥ {RELAY_TARGET:,.0f} rows/s | {rate.fmt(0)} rows/s | {met(rate.median >= RELAY_TARGET)} |"
        )
    backlog = results.get("backlog")
    if backlog:
        done = backlog.get("completed", True)
        delivered = backlog.get("delivered", backlog["events"])
        flat, steady = backlog_verdicts(backlog)
        out.append(
            f"| backlog of 1,000,000 events drained, memory flat, steady rate | ran {backlog['events']:,}: "
            + (
                "drained"
                if done
                else f"{delivered:,} delivered by the {backlog['timeout_s']:.0f} s deadline"
            )
            + f", {backlog['events_per_s']:,.0f} events/s, peak RSS {backlog['rss_peak_mb']:.0f} MB"
            f" | memory {met(flat)}; steady rate {met(steady)} (see Large backlog)"
            + ("" if backlog["events"] >= 1_000_000 else "; 1,000,000 not run")
            + " |"
        )
    out.append("")
    return out
