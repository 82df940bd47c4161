"""The mutation score, printed after the run."""

from __future__ import annotations

import pytest

from tests.mutation.catalogue import MUTANTS
from tests.mutation.mutate import VERDICTS


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    if not VERDICTS:
        return
    ran = list(VERDICTS.values())
    killed = [v for v in ran if v.killed]
    guarded = [v for v in ran if v.mutant.guarantee]
    guarded_killed = [v for v in guarded if v.killed]
    equivalent = [m for m in MUTANTS if m.equivalent]
    write = terminalreporter.write_line
    write("")
    write(
        f"mutation score: {len(killed)}/{len(ran)} killed "
        f"({100 * len(killed) / len(ran):.0f} %); guarantees: "
        f"{len(guarded_killed)}/{len(guarded)}; equivalent, not run: {len(equivalent)}"
    )
    for verdict in ran:
        mark = "killed  " if verdict.killed else "SURVIVED"
        write(f"  {mark} {verdict.mutant.id:<42} {verdict.duration_s:5.1f}s  {verdict.how}")
    for mutant in equivalent:
        write(f"  equivalent {mutant.id:<40} {mutant.equivalent}")
