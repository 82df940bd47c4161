"""Alerts proven by chaos, the pure half: what a scenario expects of the alert rules, the rules
scaled for short runs, the timeline read back from Prometheus's ``ALERTS`` series, and the
judgement (an expected alert that did not fire within its bound, or one that fired unasked).

Times are wall clock (``time.time()``), like the fault windows they are read against.

Scaling (short CI runs only; the long runs use the rules as they ship, ``scale`` 1): the ``for:``
of every alert the scenario expects to fire (and the lag alert's threshold, when that is one of
them) is multiplied by ``scale``, and so is each expected alert's bound (its ``slack_s`` is not),
and the relays refresh their backlog gauges ``1 / scale`` times as often. Every other rule keeps
its real clock: "stays quiet" is judged at the thresholds that ship, since a loaded machine's
stall does not shrink with the clock. What is proven short is then the wiring (the gauge, the
scrape, the rule, its ``for:``) on a proportionally faster clock, not the real durations; the
report says which scale ran.
"""

from __future__ import annotations

import re
from collections.abc import Collection, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

__all__ = [
    "AlertExpectation",
    "Episode",
    "episodes",
    "judge",
    "scale_rules",
    "timeline_lines",
]

# The lag rule's threshold (seconds of lag) is a duration too: it scales with the clock.
_LAG_THRESHOLD = re.compile(r"(max\(delivery_lag_seconds\) > )(\d+(?:\.\d+)?)")
_FOR = re.compile(r"^(\s+for: )(\d+)([smh])\s*$", re.MULTILINE)
_ALERT = re.compile(r"^\s+- alert: (\S+)\s*$")
_UNIT_S = {"s": 1, "m": 60, "h": 3600}


@dataclass(frozen=True)
class AlertExpectation:
    """``fire``: alert name -> seconds after the first fault's start by which it must fire
    (at scale 1). Every other alert must stay quiet, except those in ``tolerate`` (which a
    scenario's faults may or may not trip, e.g. the process-down alerts of a kill loop).

    ``slack_s`` is added to every bound unscaled: the part of an alert's delay that does not
    shrink with the rules' clock (a fault's own build-up, the scrape and evaluation, a loaded
    machine). ``short_scale``: the rules' clock of this scenario's short (CI) runs; an alert
    whose ``for:`` is 10 or 15 minutes needs a hundredth to fit a test's budget."""

    fire: Mapping[str, float] = field(default_factory=dict)
    tolerate: frozenset[str] = frozenset()
    slack_s: float = 0.0
    short_scale: float = 0.25

    def bound_s(self, name: str, scale: float) -> float:
        """Seconds after the first fault's start by which ``name`` must fire, at ``scale``."""
        return self.fire[name] * scale + self.slack_s


@dataclass
class Episode:
    """One alert instance (name + labels) from its first pending sample to its resolution."""

    alert: str
    labels: dict[str, str]
    pending_at: float
    firing_at: float | None = None
    resolved_at: float | None = None  # None: still active when the run ended

    def as_dict(self) -> dict[str, Any]:
        return {
            "alert": self.alert,
            "labels": self.labels,
            "pending_at": self.pending_at,
            "firing_at": self.firing_at,
            "resolved_at": self.resolved_at,
        }


def scale_rules(text: str, scale: float, only: Collection[str] | None = None) -> str:
    """alerts.yml with every ``for:`` and the lag threshold multiplied by ``scale``; with
    ``only``, just those of the alerts named there (the rest keep their real clock)."""
    if scale == 1 or (only is not None and not only):
        return text

    def for_(m: re.Match[str]) -> str:
        seconds = int(m.group(2)) * _UNIT_S[m.group(3)] * scale
        return f"{m.group(1)}{max(seconds, 0.5) * 1000:.0f}ms"

    def lag(m: re.Match[str]) -> str:
        return f"{m.group(1)}{float(m.group(2)) * scale:g}"

    def scaled(rule: str) -> str:
        return _LAG_THRESHOLD.sub(lag, _FOR.sub(for_, rule))

    if only is None:
        return scaled(text)
    # One alert's rule runs from its `- alert:` line to the next one (or the next group).
    out: list[str] = []
    current: str | None = None
    for line in text.splitlines():
        m = _ALERT.match(line)
        if m:
            current = m.group(1)
        elif line.lstrip().startswith("- name:"):
            current = None
        out.append(scaled(line) if current in only else line)
    return "\n".join(out) + ("\n" if text.endswith("\n") else "")


def episodes(series: Iterable[Mapping[str, Any]], step_s: float, end: float) -> list[Episode]:
    """Episodes from a ``query_range`` of ``ALERTS`` (``series``: its ``result``, each with
    ``metric`` and ``values`` [[t, "1"], ...]). Samples of one instance closer than three steps
    belong to one episode; one whose last sample is within three steps of ``end`` is active."""
    samples: dict[tuple[str, tuple[tuple[str, str], ...]], list[tuple[float, str]]] = {}
    for s in series:
        metric = dict(s["metric"])
        metric.pop("__name__", None)
        name, state = metric.pop("alertname"), metric.pop("alertstate")
        key = (name, tuple(sorted(metric.items())))
        samples.setdefault(key, []).extend((float(t), state) for t, _v in s["values"])
    found: list[Episode] = []
    gap_s = 3 * step_s
    for (name, labels), points in samples.items():
        points.sort()
        current: Episode | None = None
        last = 0.0
        for t, state in points:
            if current is None or t - last > gap_s:
                if current is not None:
                    current.resolved_at = last + step_s
                current = Episode(name, dict(labels), pending_at=t)
                found.append(current)
            if state == "firing" and current.firing_at is None:
                current.firing_at = t
            last = t
        if current is not None and end - last > gap_s:
            current.resolved_at = last + step_s
    found.sort(key=lambda e: e.pending_at)
    return found


def judge(
    seen: Sequence[Episode], expectation: AlertExpectation, anchor: float | None, scale: float
) -> list[str]:
    """What went wrong: an expected alert that did not fire within its (scaled) bound after
    ``anchor`` (the first fault's start), or an alert that fired though nobody expected it."""
    problems: list[str] = []
    for name in expectation.fire:
        bound_s = expectation.bound_s(name, scale)
        fired = [e.firing_at for e in seen if e.alert == name and e.firing_at is not None]
        if anchor is None:
            problems.append(f"alert {name}: expected, but the run injected no fault")
        elif not any(anchor <= t <= anchor + bound_s for t in fired):
            after = [round(t - anchor, 1) for t in fired if t >= anchor]
            problems.append(
                f"alert {name} did not fire within {bound_s:g} s of the fault"
                + (f" (fired at +{after[0]} s)" if after else " (never fired)")
            )
    allowed = set(expectation.fire) | expectation.tolerate
    for e in seen:
        if e.firing_at is not None and e.alert not in allowed:
            problems.append(f"alert {e.alert} fired unexpectedly ({_labels(e.labels)})")
    return problems


def _labels(labels: Mapping[str, str]) -> str:
    shown = {k: v for k, v in labels.items() if k not in ("severity", "job")}
    return ", ".join(f"{k}={v}" for k, v in sorted(shown.items())) or "no labels"


def _at(t: float | None, origin: float) -> str:
    return "-" if t is None else f"+{t - origin:.1f} s"


def timeline_lines(
    seen: Sequence[Episode], faults: Sequence[Mapping[str, Any]], origin: float
) -> list[str]:
    """Markdown rows, faults and alert episodes in time order, relative to ``origin``."""
    rows: list[tuple[float, str]] = []
    for f in faults:
        end = f.get("end")
        rows.append(
            (
                f["start"],
                f"| {_at(f['start'], origin)} | {_at(end, origin)} | fault {f['kind']} "
                f"({f['target']}{', ' + f['detail'] if f.get('detail') else ''}) | | |",
            )
        )
    for e in seen:
        rows.append(
            (
                e.pending_at,
                f"| {_at(e.pending_at, origin)} | {_at(e.resolved_at, origin)} | alert {e.alert} "
                f"({_labels(e.labels)}) | {_at(e.firing_at, origin)} | "
                f"{'still active' if e.resolved_at is None else 'resolved'} |",
            )
        )
    rows.sort(key=lambda r: r[0])
    header = [
        "| from (pending) | until (resolved) | what | fired | end |",
        "|---:|---:|---|---:|---|",
    ]
    return header + [r for _t, r in rows]
