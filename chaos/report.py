"""Per-run records: one JSON file per scenario run, and a Markdown table over a set of runs."""

from __future__ import annotations

import csv
import gzip
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import orjson

from chaos.alerts import Episode, timeline_lines
from chaos.records import Arrival

__all__ = ["RunReport", "alert_timelines", "markdown_table", "write_arrivals", "write_summary"]


@dataclass
class RunReport:
    scenario: str
    summary: str
    seed: int
    events: int
    rate: float
    started_at: float
    wall_s: float
    expect_valid: bool
    passed: bool
    problems: list[str]
    verdict: dict[str, Any]
    faults: list[dict[str, Any]]
    processes: dict[str, dict[str, Any]] = field(default_factory=dict)
    proxies: dict[str, dict[str, int]] = field(default_factory=dict)
    producer: dict[str, Any] = field(default_factory=dict)
    metrics: dict[str, float] = field(default_factory=dict)
    notes: dict[str, Any] = field(default_factory=dict)
    # Scenarios with alert expectations: the rules' scale, the episodes, what was wrong.
    alerts: dict[str, Any] = field(default_factory=dict)
    out_dir: str = ""

    @property
    def faults_injected(self) -> int:
        return len(self.faults)

    def fault_kinds(self) -> str:
        counts = Counter(f["kind"] for f in self.faults)
        return ", ".join(f"{k} x{n}" for k, n in sorted(counts.items())) or "none"

    def as_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["faults_injected"] = self.faults_injected
        return data

    def write(self, directory: Path) -> Path:
        directory.mkdir(parents=True, exist_ok=True)
        path = directory / "report.json"
        path.write_bytes(orjson.dumps(self.as_dict(), option=orjson.OPT_INDENT_2))
        (directory / "report.md").write_text(markdown_table([self]) + alert_timelines([self]))
        return path


def write_arrivals(
    path: Path,
    arrivals: Sequence[Arrival],
    committed_at: Mapping[str, float],
) -> None:
    """Every arrival as a gzipped CSV (event id, path, status, arrival and commit times), so a
    failed or slow run can be examined after the fact."""
    with gzip.open(path, "wt", newline="") as out:
        writer = csv.writer(out)
        writer.writerow(["webhook_id", "path", "status", "arrived_at", "committed_at"])
        for a in arrivals:
            commit = committed_at.get(a.webhook_id)
            writer.writerow(
                [
                    a.webhook_id,
                    a.path,
                    a.status,
                    f"{a.at:.4f}",
                    "" if commit is None else f"{commit:.4f}",
                ]
            )


_HEADER = (
    "| scenario | events | faults injected | lost | duplicates (count, ratio) | unexplained dup. "
    "| redrives (by; healed / spare) | unexplained redrives "
    "| unexpected | stuck | max lag | time to recover | wall time | verdict |\n"
    "|---|---:|---|---:|---|---:|---|---:|---:|---:|---:|---:|---:|---|\n"
)


def _seconds(value: float | None) -> str:
    return "-" if value is None else f"{value:.1f} s"


def _redrives_cell(v: dict[str, Any]) -> str:
    """``12 (sweep 10, poison 2; 11 / 1)``: how many, by whom; healed a loss / spare copies."""
    total = v.get("redrives", 0)
    if not total:
        return "0"
    by = ", ".join(f"{k} {n}" for k, n in v.get("redrives_by", {}).items())
    return f"{total} ({by}; {v.get('redrives_healed', 0)} / {v.get('redrives_spare', 0)})"


def _row(r: RunReport) -> str:
    v = r.verdict
    if r.passed:
        verdict = "PASS" if r.expect_valid else "PASS (caught: invalid as expected)"
    else:
        verdict = "FAIL: " + "; ".join(r.problems)[:200]
    return (
        f"| {r.scenario} | {v['events_committed']} | {r.faults_injected}: {r.fault_kinds()} "
        f"| {v['lost']} | {v['duplicates']} ({v['duplicate_ratio']:.4%}) "
        f"| {v['duplicates_unexplained']} | {_redrives_cell(v)} "
        f"| {v.get('redrives_unexplained', 0)} | {v['unexpected']} | {v['stuck']} "
        f"| {_seconds(v['lag_max_s'])} | {_seconds(v['recovery_s'])} | {_seconds(r.wall_s)} "
        f"| {verdict} |\n"
    )


def markdown_table(reports: Sequence[RunReport]) -> str:
    return _HEADER + "".join(_row(r) for r in reports)


def alert_timelines(reports: Sequence[RunReport]) -> str:
    """Per scenario with alert expectations: faults and alert episodes, from production start."""
    out: list[str] = []
    for r in reports:
        if not r.alerts:
            continue
        a = r.alerts
        expected = ", ".join(f"{k} within {v:g} s" for k, v in a["expected"].items()) or "none"
        episodes = [Episode(**e) for e in a["episodes"]]
        out += [
            "",
            f"### Alerts: {r.scenario} (rules at scale {a['scale']:g}, evaluated every "
            f"{a['interval_s']:g} s)",
            "",
            f"Expected to fire: {expected}; tolerated: {', '.join(a['tolerated']) or 'none'}; "
            f"every other alert must stay quiet. Judgement: "
            + ("; ".join(a["problems"]) if a["problems"] else "as expected."),
            "",
            *timeline_lines(episodes, r.faults, r.started_at),
        ]
    return "\n".join(out) + ("\n" if out else "")


def write_summary(reports: Sequence[RunReport], directory: Path) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "summary.json").write_bytes(
        orjson.dumps([r.as_dict() for r in reports], option=orjson.OPT_INDENT_2)
    )
    path = directory / "summary.md"
    path.write_text(markdown_table(reports) + alert_timelines(reports))
    return path
