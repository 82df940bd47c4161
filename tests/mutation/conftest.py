"""The mutation score, printed after the run.

Under pytest-xdist the check runs in a worker: the worker hands its lines to the controller
(``workeroutput``), and ``tests/conftest.py`` prints them there.
"""

from __future__ import annotations

import pytest

from tests.mutation.catalogue import MUTANTS
from tests.mutation.mutate import VERDICTS

WORKER_OUTPUT_KEY = "mutation_summary"


def summary_lines() -> list[str]:
    if not VERDICTS:
        return []
    ran = list(VERDICTS.values())
    killed = [v for v in ran if v.killed]
    guarded = [v for v in ran if v.mutant.guarantee]
    guarded_killed = [v for v in guarded if v.killed]
    equivalent = [m for m in MUTANTS if m.equivalent]
    lines = [
        "",
        f"mutation score: {len(killed)}/{len(ran)} killed "
        f"({100 * len(killed) / len(ran):.0f} %); guarantees: "
        f"{len(guarded_killed)}/{len(guarded)}; equivalent, not run: {len(equivalent)}",
    ]
    for verdict in ran:
        mark = "killed  " if verdict.killed else "SURVIVED"
        lines.append(f"  {mark} {verdict.mutant.id:<42} {verdict.duration_s:5.1f}s  {verdict.how}")
    lines.extend(f"  equivalent {m.id:<40} {m.equivalent}" for m in equivalent)
    return lines


def pytest_sessionfinish(session: pytest.Session) -> None:
    workeroutput = getattr(session.config, "workeroutput", None)
    if workeroutput is not None:
        workeroutput[WORKER_OUTPUT_KEY] = summary_lines()


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    for line in summary_lines():
        terminalreporter.write_line(line)
