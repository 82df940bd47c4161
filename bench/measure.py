"""Measuring from outside, through /proc: CPU of a whole process tree (children included), peak
and current RSS per process, how busy the whole machine is; percentiles and summaries of the
figures; the machine's facts. Every /proc reading and percentile of the figures lives here
(bench.receiver only lists its own file descriptors there)."""

from __future__ import annotations

import os
import platform
import statistics
import subprocess
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

CLK_TCK = os.sysconf("SC_CLK_TCK")
PAGE_BYTES = os.sysconf("SC_PAGE_SIZE")


def _stat_fields(pid: int) -> list[str] | None:
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return text.rsplit(")", 1)[1].split()


def tree_pids(roots: Iterable[int]) -> list[int]:
    """The roots and every live process below them."""
    parent: dict[int, int] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            fields = _stat_fields(int(entry))
            if fields is not None:
                parent[int(entry)] = int(fields[1])
    found = {r for r in roots if r in parent}
    grew = True
    while grew:
        grew = False
        for pid, ppid in parent.items():
            if ppid in found and pid not in found:
                found.add(pid)
                grew = True
    return sorted(found)


def cpu_s(pid: int) -> float:
    """utime + stime of the process and of its children it has reaped (0 when gone)."""
    fields = _stat_fields(pid)
    if fields is None:
        return 0.0
    # fields[0] is the state; utime, stime, cutime, cstime are stat fields 14-17.
    return sum(int(fields[i]) for i in (11, 12, 13, 14)) / CLK_TCK


def status_kb(pid: int, key: str) -> int:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith(key + ":"):
                return int(line.split()[1])
    except OSError:
        pass
    return 0


def rss_bytes(pid: int) -> int:
    return status_kb(pid, "VmRSS") * 1024


def peak_rss_bytes(pid: int) -> int:
    return status_kb(pid, "VmHWM") * 1024


@dataclass
class TreeSnapshot:
    cpu_s: dict[int, float]

    @property
    def total_cpu_s(self) -> float:
        return sum(self.cpu_s.values())


def snapshot(roots: Iterable[int]) -> TreeSnapshot:
    return TreeSnapshot({pid: cpu_s(pid) for pid in tree_pids(roots)})


def cpu_between(before: TreeSnapshot, after: TreeSnapshot) -> float:
    """CPU seconds the tree used between two snapshots. A process that exited and was reaped
    in between is in its parent's cutime/cstime; one that appeared started from zero. A
    process never counts less than nothing: one caught exiting reads as 0 (its /proc entry
    gone), which would otherwise subtract its whole past from the total."""
    return sum(
        max(used - before.cpu_s.get(pid, 0.0), 0.0) for pid, used in after.cpu_s.items()
    )


@dataclass
class RssReport:
    per_process_peak: dict[int, int]

    @property
    def max_bytes(self) -> int:
        return max(self.per_process_peak.values(), default=0)

    @property
    def sum_bytes(self) -> int:
        return sum(self.per_process_peak.values())

    @property
    def processes(self) -> int:
        return len(self.per_process_peak)


def peak_rss(roots: Iterable[int]) -> RssReport:
    return RssReport({pid: peak_rss_bytes(pid) for pid in tree_pids(roots)})


@dataclass
class Summary:
    median: float
    low: float
    high: float
    values: list[float] = field(default_factory=list)

    def fmt(self, digits: int = 0, unit: str = "") -> str:
        spec = f",.{digits}f"
        if len(self.values) < 2:
            return f"{self.median:{spec}}{unit}"
        return f"{self.median:{spec}}{unit} ({self.low:{spec}}\u2013{self.high:{spec}})"


def summarize(values: Sequence[float]) -> Summary:
    return Summary(statistics.median(values), min(values), max(values), list(values))


def percentile(sorted_values: Sequence[float], q: float) -> float:
    """Nearest-rank percentile of an ascending sequence: the one percentile of every scenario.

    The rank is ``round(q * n + 0.5)``; where ``q * n`` is an odd whole number Python's
    round-half-to-even picks the next value up (kept as it is, so the figures stay comparable
    with earlier runs)."""
    if not sorted_values:
        return float("nan")
    rank = max(0, min(len(sorted_values) - 1, round(q * len(sorted_values) + 0.5) - 1))
    return sorted_values[rank]


def _run(args: list[str]) -> str:
    try:
        return subprocess.run(args, capture_output=True, text=True, timeout=10, check=False).stdout
    except (OSError, subprocess.TimeoutExpired):
        return ""


def machine_facts() -> dict[str, str]:
    cpu_model = ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu_model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {
        "nproc": _run(["nproc"]).strip(),
        "cpu_model": cpu_model,
        "free_h": _run(["free", "-h"]).rstrip(),
        "kernel": platform.release(),
        "python": platform.python_version(),
    }


def loadavg() -> tuple[float, float, float]:
    return os.getloadavg()


def machine_cpu_ticks() -> tuple[int, int]:
    """(busy, total) CPU ticks of the whole machine since boot, from /proc/stat; the busy share
    between two readings is how busy it was meanwhile (idle and iowait count as not busy)."""
    fields = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    idle = fields[3] + fields[4]  # idle + iowait
    return sum(fields) - idle, sum(fields)
