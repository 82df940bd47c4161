# ruff: noqa: RUF001, E501  (markdown: typographic signs meant, table rows read better unwrapped)
"""Render ``bench/results.json`` as ``bench/RESULTS.md``."""

from __future__ import annotations

import statistics
from pathlib import Path
from typing import Any

from bench.measure import Summary, summarize

# Reading of the profile by a person (suggestions for the code's owners), shown under the figures.
PROFILE_NOTES = Path(__file__).resolve().parent / "profile_notes.md"
# A person's summary of the figures, shown after the targets.
NOTES = Path(__file__).resolve().parent / "notes.md"

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

HOW_TO_RUN = """\
```bash
pip install -e '.[bench]'          # the peers: Celery, Dramatiq, psycopg, requests
pip install py-spy                 # only for the profile scenario (--only profile)
python -m bench run                # everything, 3 runs each; writes bench/results.json and this file
python -m bench run --quick        # a smoke of every scenario (a few hundred events, no figures)
python -m bench run --only flat,paced --systems ours,asyncio --merge   # a subset, kept beside the rest
python -m bench render             # this file again from bench/results.json
```
Services: `DELIVERY_DATABASE_URL` / `DELIVERY_AMQP_URL` when set (every system in its own
database and queue names, all removed afterwards), otherwise throwaway local servers.
`--own-postgres` starts a throwaway PostgreSQL with stock settings (fsync and autovacuum on)
whatever `DELIVERY_DATABASE_URL` says: this machine's shared server runs with autovacuum off,
under which the 1,000,000-event backlog is never vacuumed.
`tests/test_bench_smoke.py` runs the same code on 200 events per system (Celery and Dramatiq
are in the `dev` extra the test command installs; outside CI a missing one is skipped)."""


def _s(values: list[float]) -> Summary:
    return summarize(values)


def _vals(runs: list[dict[str, Any]], scenario: str, key: str) -> list[float]:
    return [float(r[scenario][key]) for r in runs if scenario in r]


def _met(ok: bool) -> str:
    return "**met**" if ok else "**not met**"


def _backlog_verdicts(b: dict[str, Any]) -> tuple[bool, bool]:
    """Memory flat: RSS after the first 10 s stays within 10 MB. Steady rate: no window of the
    table below under half the median window's rate (the last, partial window aside)."""
    samples = b.get("samples") or []
    rss = [x["rss_mb"] for x in samples if x["t_s"] >= 10] or [b["rss_peak_mb"]]
    rates = [r for _lo, _hi, _n, r, *_rest in _backlog_windows(samples)][:-1]
    median = statistics.median(rates) if rates else 0.0
    return max(rss) - min(rss) <= 10, bool(rates) and min(rates) >= median / 2


def render(results: dict[str, Any]) -> str:
    meta = results.get("meta", {})
    out: list[str] = ["# Benchmarks: ours against the frameworks people pick instead", ""]
    out += ["How to run (from the repository root, in the project's venv):", "", HOW_TO_RUN, ""]
    for inv in results.get("invocations", [meta]):
        code = inv.get("code") or {}
        dirty = code.get("uncommitted", "").replace("\n", ", ")
        out.append(
            f"* Run: `{inv.get('command', '?')}`, {inv.get('started', '?')} – "
            f"{inv.get('finished', '?')}; load average at start {_load(inv.get('load_at_start'))}, "
            f"at end {_load(inv.get('load_at_end'))}; code: `{code.get('commit', '?')}`"
            + (f" with uncommitted changes to {dirty}" if dirty else "")
            + (
                f"; PostgreSQL {inv['servers']['postgresql settings']}"
                if "postgresql settings" in inv.get("servers", {})
                else ""
            )
            + "."
        )
    out.append("")
    compare = results.get("compare", {})
    out += _summary(compare)
    out += _stages(results)
    out += _targets(results)
    if NOTES.exists():
        out += [NOTES.read_text().rstrip(), ""]
    out += _method(meta)
    out += _live(results)
    out += _tuned(results)
    out += _processes(results)
    out += _fanout(results)
    out += _relay(results)
    out += _backlog(results)
    out += _profile(results)
    out += _machine(meta, compare)
    return "\n".join(out) + "\n"


def _summary(compare: dict[str, list[dict[str, Any]]]) -> list[str]:  # noqa: PLR0912
    if not compare:
        return []
    ours = compare.get("ours", [])
    ours_rate = _s(_vals(ours, "flat", "events_per_s")).median if ours else None
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
            rate = _s(_vals(runs, "flat", "events_per_s"))
            row.append(rate.fmt(0))
            row.append(
                "—" if name == "ours" or ours_rate is None else f"{ours_rate / rate.median:.2f}×"
            )
            row.append(_s(_vals(runs, "flat", "cpu_ms_per_event")).fmt(2))
            rss = _s(_vals(runs, "flat", "rss_max_mb"))
            total = _s(_vals(runs, "flat", "rss_sum_mb"))
            procs = int(statistics.median(_vals(runs, "flat", "processes")))
            row.append(f"{rss.median:.0f} ({total.median:.0f}, {procs})")
        else:
            row += ["—"] * 4
        if any("paced" in r for r in runs):
            for key in ("p50_ms", "p95_ms", "p99_ms"):
                row.append(_s(_vals(runs, "paced", key)).fmt(1))
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


def _stages(results: dict[str, Any]) -> list[str]:
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


def _targets(results: dict[str, Any]) -> list[str]:
    compare = results.get("compare", {})
    ours = [r for r in compare.get("ours", []) if "flat" in r]
    out = ["## Targets", "", "| target | measured | |", "|---|---|---|"]
    if ours:
        ours_rate = _s(_vals(ours, "flat", "events_per_s")).median
        for name, factor in RATIO_TARGETS.items():
            runs = [r for r in compare.get(name, []) if "flat" in r]
            if not runs:
                out.append(f"| e2e flat out ≥ {factor}× {name} | not measured | |")
                continue
            ratio = ours_rate / _s(_vals(runs, "flat", "events_per_s")).median
            out.append(
                f"| e2e flat out ≥ {factor}× {name} | {ratio:.2f}× | {_met(ratio >= factor)} |"
            )
        cpu = _s(_vals(ours, "flat", "cpu_ms_per_event"))
        out.append(
            f"| worker CPU ≤ {CPU_TARGET_MS} ms/event | {cpu.fmt(2)} | {_met(cpu.median <= CPU_TARGET_MS)} |"
        )
        rss = _s(_vals(ours, "flat", "rss_max_mb"))
        out.append(
            f"| RSS ≤ {RSS_TARGET_MB:.0f} MB/process | {rss.fmt(0)} | {_met(rss.median <= RSS_TARGET_MB)} |"
        )
    paced_runs = [r for r in compare.get("ours", []) if "paced" in r]
    if paced_runs:
        p99 = _s(_vals(paced_runs, "paced", "p99_ms"))
        out.append(
            f"| paced 500 ev/s p99 ≤ {P99_TARGET_MS:.0f} ms | {p99.fmt(1)} ms | {_met(p99.median <= P99_TARGET_MS)} |"
        )
    relay = results.get("relay")
    if relay and relay.get("rates"):
        rate = _s(relay["rates"])
        out.append(
            f"| relay drain ≥ {RELAY_TARGET:,.0f} rows/s | {rate.fmt(0)} rows/s | {_met(rate.median >= RELAY_TARGET)} |"
        )
    backlog = results.get("backlog")
    if backlog:
        done = backlog.get("completed", True)
        delivered = backlog.get("delivered", backlog["events"])
        flat, steady = _backlog_verdicts(backlog)
        out.append(
            f"| backlog of 1,000,000 events drained, memory flat, steady rate | ran {backlog['events']:,}: "
            + (
                "drained"
                if done
                else f"{delivered:,} delivered by the {backlog['timeout_s']:.0f} s deadline"
            )
            + f", {backlog['events_per_s']:,.0f} events/s, peak RSS {backlog['rss_peak_mb']:.0f} MB"
            f" | memory {_met(flat)}; steady rate {_met(steady)} (see Large backlog)"
            + ("" if backlog["events"] >= 1_000_000 else "; 1,000,000 not run")
            + " |"
        )
    out.append("")
    return out


def _method(meta: dict[str, Any]) -> list[str]:
    return [
        "## Method",
        "",
        "* **One job everywhere.** Consume from RabbitMQ; dedupe in PostgreSQL on an inbox table "
        "keyed by the event id (`INSERT … ON CONFLICT DO NOTHING`); POST the event with Standard "
        "Webhooks headers (`webhook-id`, `webhook-timestamp`, `webhook-signature`, signed by "
        "`delivery.signing`); record a row per delivery; ack. The peers do all of it in one "
        "transaction per message (inbox row, POST, delivery row, COMMIT, then ack; a failed POST "
        "rolls back and is not acked) — `bench/peers/`. Ours runs its real path: "
        "`delivery.publish_many` into the outbox → relay (publisher confirms, mandatory, quorum "
        "queue) → dispatch (inbox + delivery rows, one statement per batch, then ack) → "
        "deliverer (POST, outcome recorded with group commit), with default settings.",
        "* **Peers.** Celery: prefork, `acks_late=True`, concurrency 4, default prefetch "
        "multiplier, no result backend, psycopg 3 + requests. Dramatiq: `RabbitmqBroker`, "
        "default middleware, 4 processes × 8 threads, psycopg 3 + requests. Hand-written "
        "asyncio: aio-pika + aiohttp + asyncpg on uvloop, prefetch 100, a semaphore of 32 "
        "(one pooled connection each). Their queues are classic durable queues, as each framework "
        "declares them; messages are persistent.",
        "* **Entry points.** The peers' job starts at their queue: the orchestrator publishes "
        "with each framework's own client (`send_task`, `broker.enqueue`, aio-pika). Ours starts "
        "at the outbox, one hop earlier, and pays for the relay and a second RabbitMQ pass.",
        "* **Flat out.** Each system is started and warmed up (20 events through), then every "
        "one of its processes is paused (SIGSTOP), the backlog is staged at its entry point, the "
        "CPU counters are read, and the clock starts at SIGCONT. Events/s = events ÷ (last "
        "arrival − release). The run ends when every delivery has arrived *and* is recorded in "
        "PostgreSQL. *Live producer* (ours only): the same without the pause, the producer "
        "publishing in batches of 1,000 while the system runs.",
        "* **Paced.** 500 events/s, 10 s; ours: one event per producer transaction "
        "(`publish_many(conn, [event])`), latency from commit; peers: one publish per event, "
        "latency from the publish call returning. Nearest-rank percentiles over all events.",
        "* **Measured from outside**, via /proc: CPU = utime+stime (plus reaped children's) summed "
        "over the whole process tree of the system (Celery's and Dramatiq's children included); "
        "RSS = each process's VmHWM. The subscriber is `bench/receiver.py` (aiohttp + uvloop) in "
        "its own process: answers 200, records arrival times, verifies every signature; its CPU "
        "is not counted. PostgreSQL's and RabbitMQ's CPU are not counted for anyone.",
        "* **Shared machine.** Before each session the bench waits (bounded) for the 1-minute load "
        "to drop; the load seen is in the table at the end. Systems are interleaved run by run "
        "(ours, asyncio, Dramatiq, Celery, then again) so a load change hits all of them.",
        "",
    ]


def _live(results: dict[str, Any]) -> list[str]:
    live = results.get("live")
    if not live:
        return []
    rate = _s([r["events_per_s"] for r in live])
    cpu = _s([r["cpu_ms_per_event"] for r in live])
    return [
        "## Ours with a live producer",
        "",
        f"{live[0]['events']:,} events published while the system runs (the producer shares the "
        f"two cores): **{rate.fmt(0)} events/s**, {cpu.fmt(2)} ms CPU/event, "
        f"runs: {len(live)}.",
        "",
    ]


def _tuned(results: dict[str, Any]) -> list[str]:
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
        _s(_vals(runs, "flat", "events_per_s")).fmt(0),
        _s(_vals(runs, "flat", "cpu_ms_per_event")).fmt(2),
        _s(_vals(runs, "flat", "rss_max_mb")).fmt(0),
    ]
    paced_runs = [r for r in runs if "paced" in r]
    for key in ("p50_ms", "p95_ms", "p99_ms"):
        row.append(_s(_vals(paced_runs, "paced", key)).fmt(1) if paced_runs else "—")
    out += ["| " + " | ".join(row) + " |", ""]
    return out


def _processes(results: dict[str, Any]) -> list[str]:
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
            f"| {n} | {_s([r['events_per_s'] for r in runs]).fmt(0)} | "
            f"{_s([r['cpu_ms_per_event'] for r in runs]).fmt(2)} | "
            f"{_s([r['rss_max_mb'] for r in runs]).fmt(0)} |"
        )
    out += ["", "The machine has 2 cores, shared with PostgreSQL, RabbitMQ and the receiver.", ""]
    return out


def _fanout(results: dict[str, Any]) -> list[str]:
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
            f"| {n} | {runs[0]['events']:,} | {_s([r['deliveries_per_s'] for r in runs]).fmt(0)} | "
            f"{_s([r['events_per_s'] for r in runs]).fmt(0)} | "
            f"{_s([r['cpu_ms_per_delivery'] for r in runs]).fmt(3)} | "
            f"{_s([r['rss_max_mb'] for r in runs]).fmt(0)} |"
        )
    out.append("")
    return out


def _relay(results: dict[str, Any]) -> list[str]:
    relay = results.get("relay")
    if not relay or not relay.get("rates"):
        return []
    return [
        "## Relay drain",
        "",
        f"`bench/relay_drain.py`: {relay['rows']:,} rows prepared in the outbox, one relay "
        f"(batch {relay['batch']}, default settings, in the bench process), timed by the rows' "
        "own `published_at` marks from the first batch's commit to the last one's (the bench "
        "polls lightly, every 100 ms, so it does not compete for PostgreSQL): "
        f"**{_s(relay['rates']).fmt(0)} rows/s** ({len(relay['rates'])} runs).",
        "",
    ]


def _backlog(results: dict[str, Any]) -> list[str]:
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
    flat, steady = _backlog_verdicts(b)
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
    for lo, hi, n, rate, rss_mb, cpu in _backlog_windows(samples):
        out.append(f"| {lo:.0f}–{hi:.0f} s | {n:,} | {rate:,.0f} | {rss_mb:.0f} | {cpu:.0f} |")
    out += [
        "",
        f"Verdicts: memory {'flat' if flat else 'not flat'} (RSS after the first 10 s within "
        f"10 MB); rate {'steady' if steady else 'not steady'} (no window, the last aside, under "
        "half the median window's rate).",
        "",
    ]
    return out


def _backlog_windows(
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


def _profile(results: dict[str, Any]) -> list[str]:
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


def _machine(meta: dict[str, Any], compare: dict[str, list[dict[str, Any]]]) -> list[str]:
    m = meta.get("machine", {})
    servers = meta.get("servers", {})
    own_pg = meta.get("params", {}).get("own_postgres", False)
    out = [
        "## Machine, versions, load",
        "",
        f"* CPU: {m.get('cpu_model', '?')}, `nproc` = {m.get('nproc', '?')}; kernel "
        f"{m.get('kernel', '?')}; Python {m.get('python', '?')}",
        f"* Servers: PostgreSQL {servers.get('postgresql', '?')}, RabbitMQ "
        f"{servers.get('rabbitmq', '?')}, every system isolated by database and queue names. "
        + (
            f"PostgreSQL's settings: {servers['postgresql settings']}"
            + (" (a throwaway server started by `--own-postgres`)" if own_pg else "")
            + "."
            if "postgresql settings" in servers
            else ""
        ),
        "* Packages: " + ", ".join(f"{k} {v}" for k, v in meta.get("versions", {}).items()),
        "",
        "`free -h` at start:",
        "",
        "```",
        m.get("free_h", ""),
        "```",
        "",
    ]
    loads = [
        (name, i + 1, r.get("busy"), r.get("load"), r.get("waited_s"))
        for name, runs in compare.items()
        for i, r in enumerate(runs)
    ]
    if loads:
        out.append(
            "Other engineers' work on the machine when each comparison session started (CPU busy "
            "over 2-5 s with nothing of ours running, and the 1-minute load average; the bench "
            "waited, up to a limit, for it to drop under the threshold): "
            + ", ".join(
                f"{n} #{i}: {b:.0%} busy, load {ld:.2f}" + (f" (waited {w}s)" if w else "")
                for n, i, b, ld, w in loads
                if b is not None
            )
            + "."
        )
        out.append("")
    return out


def _load(value: Any) -> str:
    if not value:
        return "?"
    return ", ".join(f"{v:.2f}" for v in value)
