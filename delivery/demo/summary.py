"""The summary on standard output: the table of deliveries per subscription, the timings, and
the verdict (every event delivered where it should go, every signature verified)."""

from __future__ import annotations

import math
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field

from delivery.demo.scenario import ACCOUNTS, STALL_TIMEOUT_S, _Route
from delivery.store.subscriptions import Subscription
from delivery.testing.receiver import Receiver

OK_LINE = "OK: every event delivered, every signature verified"


@dataclass(frozen=True)
class _BalanceCheck:
    """The live stream's rebuilt balances against the API's snapshot: lines to show, and
    what does not match."""

    lines: list[str] = field(default_factory=list)
    failures: list[str] = field(default_factory=list)


@dataclass(frozen=True)
class _RunTimes:
    commit_at: dict[str, float]  # event id -> time.time() just after its transaction committed
    first_publish_at: float
    published_in_s: float
    transactions: int
    stalled: bool
    balances: _BalanceCheck = field(default_factory=_BalanceCheck)


def _describe(sub: Subscription) -> str:
    text = ",".join(sub.event_patterns)
    return f"{text} (account {sub.account_id})" if sub.account_id else text


def out(line: str) -> None:
    sys.stdout.write(line + "\n")


def _percentile(ordered: list[float], fraction: float) -> float:
    """Nearest-rank percentile of an ascending list."""
    return ordered[max(0, math.ceil(fraction * len(ordered)) - 1)]


def _table(rows: list[tuple[str, ...]], right: set[int]) -> Iterator[str]:
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    for row in rows:
        cells = [
            c.rjust(w) if i in right else c.ljust(w)
            for i, (c, w) in enumerate(zip(row, widths, strict=True))
        ]
        yield "  ".join(cells).rstrip()


def _summary(
    receiver: Receiver,
    subs: dict[_Route, Subscription],
    expected: dict[_Route, set[str]],
    run: _RunTimes,
    began: float,
) -> int:
    rows, failures = _check(receiver, subs, expected)
    if run.stalled:
        failures.append(f"nothing arrived for {STALL_TIMEOUT_S:.0f} s; gave up waiting")
    failures += run.balances.failures
    out("")
    out(
        f"published {len(run.commit_at):,} events for {len(ACCOUNTS)} accounts in "
        f"{run.transactions:,} transactions over {run.published_in_s:.1f} s"
    )
    out("")
    for line in _table(rows, right={2, 3, 4, 5}):
        out(line)
    out("")
    for line in _timings(receiver, run):
        out(line)
    for line in run.balances.lines:
        out(line)
    out(f"wall time   {time.time() - began:.1f} s for the whole demo so far")
    out("FAILED: " + "; ".join(failures) if failures else OK_LINE)
    sys.stdout.flush()  # before the clean-up narration on standard error
    return 1 if failures else 0


def _check(
    receiver: Receiver, subs: dict[_Route, Subscription], expected: dict[_Route, set[str]]
) -> tuple[list[tuple[str, ...]], list[str]]:
    """The table's rows, and what is wrong: an event missing or sent where it should not
    go, a signature that does not verify, a request nobody should have sent."""
    failures: list[str] = []
    rows: list[tuple[str, ...]] = [
        ("subscription", "events", "expected", "delivered", "duplicates", "bad signatures")
    ]
    totals = [0, 0, 0, 0]
    for route, sub in subs.items():
        want = expected[route]
        got = receiver.unique_ids(route.path)
        dupes = sum(n - 1 for n in receiver.duplicates(route.path).values())
        bad = sum(1 for a in receiver.arrivals if a.path == route.path and not a.signature_ok)
        counts = (len(want), len(got & want), dupes, bad)
        rows.append((route.name, _describe(sub), *(f"{n:,}" for n in counts)))
        totals = [t + n for t, n in zip(totals, counts, strict=True)]
        if missing := len(want - got):
            failures.append(f"{route.name}: {missing:,} of {len(want):,} events not delivered")
        if unexpected := len(got - want):
            failures.append(f"{route.name}: {unexpected:,} events it did not subscribe to")
        if bad:
            failures.append(f"{route.name}: {bad:,} requests failed signature verification")
    rows.append(("total", "", *(f"{n:,}" for n in totals)))
    paths = {route.path for route in subs}
    if strays := sum(1 for a in receiver.arrivals if a.path not in paths):
        failures.append(f"{strays:,} requests to paths no subscription uses")
    return rows, failures


def _timings(receiver: Receiver, run: _RunTimes) -> Iterator[str]:
    delivered = receiver.delivered()
    if not delivered:
        return
    last_arrival = max(a.arrived_at for a in delivered)
    span_s = last_arrival - run.first_publish_at
    yield (
        f"throughput  {len(delivered):,} deliveries in {span_s:.1f} s = "
        f"{len(delivered) / span_s:,.0f} deliveries/s (first publish to last arrival)"
    )
    first_arrivals: dict[tuple[str, str], float] = {}
    for arrival in delivered:
        first_arrivals.setdefault((arrival.path, arrival.webhook_id), arrival.arrived_at)
    latencies = sorted(
        at - run.commit_at[webhook_id]
        for (_path, webhook_id), at in first_arrivals.items()
        if webhook_id in run.commit_at
    )
    if not latencies:
        return
    yield (
        "latency     publish commit -> subscriber's 2xx: "
        f"p50 {_percentile(latencies, 0.50) * 1000:,.0f} ms, "
        f"p99 {_percentile(latencies, 0.99) * 1000:,.0f} ms, "
        f"max {latencies[-1] * 1000:,.0f} ms"
    )
    if last_arrival - max(run.commit_at.values()) > 1.0:
        yield (
            "            (mostly time in line: the events were published faster than this"
            " machine delivered them)"
        )
